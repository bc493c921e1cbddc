"""Paired bootstrap over held-out examples: intervals on hypervolume and on its differences between methods.

With a few hundred held-out examples per task a single example moves a score by a point, and hypervolumes of
two methods can differ by sampling alone. The bootstrap (Efron & Tibshirani 1993, the percentile interval)
resamples each task's held-out examples with replacement, B times, and recomputes every reported quantity on
each resample:

* per-example statistics of every point (`Objective.example_fn`): exact match (teacher-forced or generated),
  multiple choice and accuracy are 0/1 per example (score = 100 * mean);
  chrF is corpus-level, so each example contributes its sentence statistics (character and word n-gram match
  counts, sacrebleu's `CHRF._extract_corpus_statistics`) and the score of a resample is chrF of the summed
  statistics, exactly as sacrebleu computes the corpus score (its own paired-bootstrap test does the same);
* **paired**: every method and the ideal point (the experts' own scores) use the same resampled example indices
  `idx [B, N_k]` per task, so differences between methods are not blurred by independent noise;
* per resample b: points_b / ideal_b (the normalisation of `normalize_by_ideal`), the hypervolume against the
  run's fixed reference point (so all resamples are measured with the same yardstick).

Outputs are percentile intervals and `P(HV_a > HV_b)`, the share of resamples where method a's hypervolume is
strictly larger.
"""

from __future__ import annotations

import numpy as np
from sacrebleu.metrics import CHRF

from hm3_jax.moo.hypervolume import hypervolume


def resample_indices(seed: int, sizes, num_samples: int) -> list[np.ndarray]:
    """Per task an int array [B, N_k] of example indices drawn with replacement (numpy Generator, `seed`)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    rng = np.random.default_rng(seed)
    out = []
    for k, n in enumerate(sizes):
        if n < 1:
            raise ValueError(f"task {k} has no held-out examples to resample")
        out.append(rng.integers(0, n, size=(num_samples, n)))
    return out


def chrf_from_stats(stats) -> float:
    """sacrebleu chrF (defaults) of summed sentence statistics [S] (or [N, S], summed over N)."""
    s = np.asarray(stats)
    if s.ndim == 2:
        s = s.sum(0)
    return float(CHRF()._compute_score_from_stats(s.astype(np.int64).tolist()).score)


def chrf_sentence_stats(hypotheses, references) -> np.ndarray:
    """[N, S] int sentence statistics whose column sums give sacrebleu's corpus chrF (`chrf_from_stats`)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    return np.asarray(CHRF()._extract_corpus_statistics(list(hypotheses), [list(references)]), np.int64)


def _mean_resampled(stats, idx):
    return 100.0 * stats.astype(np.float64)[idx].mean(1)


def _chrf_resampled(stats, idx):
    summed = stats[idx].sum(1)  # [B, S]
    return np.array([chrf_from_stats(row) for row in summed])


def _mean_full(stats):
    return 100.0 * float(stats.astype(np.float64).mean())


# metrics whose per-example statistic is 0/1 correctness and whose score is 100 * its mean (so the standard
# error of a score difference has the closed form 100 sd(x_a - x_b) / sqrt(N))
MEAN_METRICS = ("exact_match", "generated_exact_match", "multiple_choice", "accuracy")

# metric -> (resampled scores [B] of per-example statistics and indices [B, N], full-sample score): 0/1
# correctness per example (score = 100 * mean), or chrF sentence statistics (score = chrF of their sum)
AGGREGATES = {
    **{m: (_mean_resampled, _mean_full) for m in MEAN_METRICS},
    "chrf": (_chrf_resampled, chrf_from_stats),
}


def _aggregate(metric: str):
    if metric not in AGGREGATES:
        raise ValueError(f"unknown metric {metric!r} (known: {sorted(AGGREGATES)})")
    return AGGREGATES[metric]


def resampled_scores(stats, metric: str, idx: np.ndarray) -> np.ndarray:
    """Scores [B] in [0, 100] of one model on one task for each resample `idx [B, N]`.

    `stats`: [N] 0/1 correctness for the mean metrics of `AGGREGATES`, or [N, S] chrF sentence statistics.
    """
    stats = np.asarray(stats)
    if stats.shape[0] != idx.shape[1]:
        raise ValueError(f"{stats.shape[0]} per-example statistics but resamples of {idx.shape[1]} examples")
    return _aggregate(metric)[0](stats, idx)


def paired_difference_samples(stats_a, stats_b, metrics, weights, idx) -> np.ndarray:
    """[B] `sum_k w_k (score_a,k - score_b,k)` on each paired resample: models a and b scored on the same
    resampled examples `idx` (per task [B, N_k]); stats_a / stats_b: per task per-example statistics."""
    out = 0.0
    for a, b, m, w, i in zip(stats_a, stats_b, metrics, weights, idx, strict=True):
        if w:
            out = out + float(w) * (resampled_scores(a, m, i) - resampled_scores(b, m, i))
    return np.broadcast_to(np.asarray(out, np.float64), (idx[0].shape[0],)).copy()


def full_score(stats, metric: str) -> float:
    """The score on all examples (must equal the reported point: a consistency check)."""
    return _aggregate(metric)[1](np.asarray(stats))


def hypervolume_samples(method_points: dict, ideal: np.ndarray, reference) -> dict:
    """Hypervolume per resample for every method.

    Args:
      method_points: {name: [B, P, K] raw resampled scores of the method's P points}.
      ideal: [B, K] resampled ideal point (the experts' own-task scores on the same resamples).
      reference: [K] fixed reference point in normalised units.
    Returns: {name: [B] hypervolumes}.
    """
    ideal = np.maximum(np.asarray(ideal, np.float64), 1e-12)
    out = {}
    for name, pts in method_points.items():
        pts = np.asarray(pts, np.float64) / ideal[:, None, :]
        out[name] = np.array([hypervolume(p, reference) for p in pts])
    return out


def summarise(samples: dict, point_estimates: dict, against: str = "hm3", level: float = 0.95) -> dict:
    """{name: {"hypervolume", "interval": [lo, hi], "p_against_greater": P(HV_against > HV_name)}}."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    out = {}
    for name, s in samples.items():
        entry = {
            "hypervolume": float(point_estimates[name]),
            "interval": [float(np.percentile(s, lo_q)), float(np.percentile(s, hi_q))],
        }
        if against in samples and name != against:
            entry[f"p_{against}_greater"] = float(np.mean(samples[against] > s))
        out[name] = entry
    return out
