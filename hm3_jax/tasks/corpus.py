"""Text corpus for the base model: Python documentation prose plus a small share of every task's format."""

from __future__ import annotations

from collections.abc import Sequence
from pydoc_data import topics

import numpy as np


def documentation_paragraphs(min_chars: int = 40) -> list[str]:
    """English prose from the standard library's documentation (`pydoc_data.topics`), one paragraph per item.

    Paragraphs are split on blank lines, whitespace-normalised, and kept when they have at least `min_chars`
    characters and are mostly letters (code listings and tables are dropped). Order is the sorted topic order,
    so the result is deterministic.
    """
    paragraphs = []
    for name in sorted(topics.topics):
        for block in topics.topics[name].split("\n\n"):
            text = " ".join(block.split())
            if len(text) < min_chars:
                continue
            letters = sum(ch.isalpha() or ch == " " for ch in text)
            if letters / len(text) < 0.85:
                continue
            paragraphs.append(text)
    return paragraphs


def base_corpus(
    rng: np.random.Generator,
    task_examples: Sequence[dict],
    task_share: float,
    max_prose_chars: int | None = None,
) -> list[str]:
    """Documents for base-model pretraining: documentation prose mixed with task-formatted text.

    Args:
      rng: numpy generator for the mixing order.
      task_examples: example dicts (from the *train* parts only) rendered as ``prompt + target``.
      task_share: fraction of the corpus's characters that comes from task examples (e.g. 0.1).
      max_prose_chars: optional cap on the documentation prose (for smoke builds).

    Returns:
      Shuffled list of documents (strings).
    """
    if not 0.0 <= task_share < 1.0:
        raise ValueError(f"task_share must be in [0, 1), got {task_share}")
    prose = documentation_paragraphs()
    if max_prose_chars is not None:
        kept, total = [], 0
        for paragraph in prose:
            if total >= max_prose_chars:
                break
            kept.append(paragraph)
            total += len(paragraph)
        prose = kept
    prose_chars = sum(len(p) for p in prose)
    wanted_task_chars = task_share / (1.0 - task_share) * prose_chars
    task_docs, total = [], 0
    for i in rng.permutation(len(task_examples)):
        if total >= wanted_task_chars:
            break
        doc = task_examples[i]["prompt"] + task_examples[i]["target"]
        task_docs.append(doc)
        total += len(doc)
    docs = prose + task_docs
    return [docs[i] for i in rng.permutation(len(docs))]
