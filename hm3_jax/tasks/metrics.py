"""Host-side metrics on strings: chrF (sacrebleu) and exact match.

Scores are in [0, 100], higher is better.
"""

from __future__ import annotations

from collections.abc import Sequence


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus-level chrF (sacrebleu's `CHRF()` defaults: char n-grams up to 6, beta 2) in [0, 100].

    Args:
      hypotheses: system outputs, one per example.
      references: one reference per example (same length).
    """
    from sacrebleu.metrics import CHRF

    if len(hypotheses) != len(references):
        raise ValueError(f"chrf: {len(hypotheses)} hypotheses but {len(references)} references")
    if not references:
        raise ValueError("chrf: no examples")
    return float(CHRF().corpus_score(list(hypotheses), [list(references)]).score)


def final_number(text: str) -> str | None:
    """The last integer in `text` (with sign), as written, or None when there is none."""
    import re

    found = re.findall(r"-?\d+", text)
    return found[-1] if found else None


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Percentage of predictions equal to their reference after stripping surrounding whitespace."""
    if len(predictions) != len(references):
        raise ValueError(f"exact_match: {len(predictions)} predictions but {len(references)} references")
    if not references:
        raise ValueError("exact_match: no examples")
    hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True))
    return 100.0 * hits / len(references)
