"""Host-side metrics on strings: chrF (sacrebleu) and exact match.

Scores are in [0, 100], higher is better.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from sacrebleu.metrics import CHRF
from sacrebleu.utils import sum_of_lists


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus-level chrF (sacrebleu's `CHRF()` defaults: char n-grams up to 6, beta 2) in [0, 100].

    Args:
      hypotheses: system outputs, one per example.
      references: one reference per example (same length).
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"chrf: {len(hypotheses)} hypotheses but {len(references)} references")
    if not references:
        raise ValueError("chrf: no examples")
    return float(CHRF().corpus_score(list(hypotheses), [list(references)]).score)


def make_chrf_scorer(references: Sequence[str], max_cached: int = 200_000):
    """`score(hypotheses) -> float`, equal to `chrf(hypotheses, references)` bit for bit, for scoring many
    systems (layer paths) against the same references: ``chrf_from_counts(make_chrf_counter(references)(.))``.
    """
    counts = make_chrf_counter(references, max_cached)
    return lambda hypotheses: chrf_from_counts(counts(hypotheses))


def make_chrf_counter(references: Sequence[str], max_cached: int = 200_000):
    """`counts(hypotheses) -> [N][S] int`: sacrebleu chrF's sentence statistics of each (hypothesis, reference)
    segment (equal to `CHRF()._extract_corpus_statistics`), memoised.

    sacrebleu's corpus chrF is `_compute_score_from_stats(sum of the segments' integer [hyp, ref, match]
    n-gram counts)`, each segment's counts a function of (hypothesis, reference) only. `corpus_score`
    recomputes the references' n-grams and every segment's counts on every call; this counter computes the
    references' n-grams once and memoises each segment's counts by (segment index, hypothesis);
    `chrf_from_counts` then calls the same two sacrebleu functions on the summed counts (`sum_of_lists` and
    `_compute_score_from_stats`, as `CHRF._aggregate_and_compute` does). Paths of a search produce the same
    hypothesis for many segments, so most counts are looked up (tiny3_v5, 100 segments, 32 distinct archive
    paths in a fresh process: 6.8-13.5 -> 4.0 ms of CPU per path, detokenising included; docs/path_eval.md,
    third pass). Tested equal to `chrf`. The per-segment counts are also the statistics of a paired bootstrap
    (`hm3_jax.moo.bootstrap`).

    Args: references: one per example; max_cached: the memo is cleared when it holds more segments (~270
      bytes each, measured on tiny3-like sentences: the default bounds it near 55 MB per objective; a whole
      tiny3 HM3 search scores ~700 paths x 100 segments).
    Raises ValueError on an empty reference list or a hypothesis list of another length.
    """
    refs = list(references)
    if not refs:
        raise ValueError("chrf: no examples")
    metric = CHRF()
    ref_cache = metric._cache_references([refs])
    memo: dict = {}

    def counts(hypotheses: Sequence[str]) -> list[list[int]]:
        if len(hypotheses) != len(refs):
            raise ValueError(f"chrf: {len(hypotheses)} hypotheses but {len(refs)} references")
        if len(memo) > max_cached:
            memo.clear()
        stats = []
        for i, hyp in enumerate(hypotheses):
            key = (i, hyp)
            c = memo.get(key)
            if c is None:
                c = metric._compute_segment_statistics(metric._preprocess_segment(hyp), ref_cache[i])
                memo[key] = c
            stats.append(c)
        return stats

    return counts


def chrf_from_counts(counts: Sequence[Sequence[int]]) -> float:
    """sacrebleu corpus chrF (defaults) from per-segment statistics [N][S] (`make_chrf_counter`)."""
    return float(CHRF()._compute_score_from_stats(sum_of_lists(list(counts))).score)


def final_number(text: str) -> str | None:
    """The last integer in `text` (with sign), as written, or None when there is none."""
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
