"""Normalisation by the ideal point and the hypervolume reference point (HM3_SPEC "Objectives", "Output").

* Ideal point: ``z*_k = max_m score_{m,k}``, the best score any source model reaches on task k.
* Normalised score: ``f_k / z*_k`` (1 = as good as the best expert on task k; may exceed 1).
* Reference point, "1.1 past the worst normalised value on every axis". With maximised, ideal-normalised
  scores the ideal is 1 on every axis and we read "1.1 past the worst" as 1.1 times the worst distance to
  the ideal, the maximisation twin of the usual minimisation rule ``r = 1.1 * nadir`` applied to the
  normalised regret ``1 - f``:

      reference_k = ideal_k - factor * (ideal_k - worst_k) = worst_k - (factor - 1) * (ideal_k - worst_k),

  ``worst_k`` the smallest normalised value over the union of ALL methods' points (one shared reference, so
  hypervolumes of different methods are comparable). If ``worst_k >= ideal_k`` (no spread below the ideal)
  we fall back to ``worst_k - (factor - 1)`` (an absolute margin of 0.1 for factor 1.1) so every point still
  strictly dominates the reference. A user-given ``fixed`` reference overrides all of this.
"""

import numpy as np

from hm3_jax.moo._checks import as_points, as_vector


def ideal_point(source_scores) -> np.ndarray:
    """Ideal point ``z*_k = max_m source_scores[m, k]``.

    Args:
      source_scores: ``[num_sources, k]`` raw scores of the source models (experts, base) on each task.

    Returns:
      ``[k]`` float64 ideal point.
    """
    return as_points(source_scores, "source_scores").max(axis=0)


def normalize_by_ideal(points, ideal) -> np.ndarray:
    """Divides each objective by the ideal point: ``points[:, k] / ideal[k]``.

    Args:
      points: ``[n, k]`` raw scores (n may be 0).
      ideal: ``[k]`` ideal point; every entry must be > 0 (a task no source solves cannot be normalised).

    Returns:
      ``[n, k]`` normalised scores.
    """
    p = as_points(points, allow_empty=True)
    z = as_vector(ideal, p.shape[1], "ideal")
    if np.any(z <= 0):
        raise ValueError(f"ideal point must be > 0 on every task to normalise by it, got {z.tolist()}")
    return p / z


def reference_point(point_sets, ideal=None, factor: float = 1.1, fixed=None) -> np.ndarray:
    """The hypervolume reference point shared by all methods (see the module docstring for the rule).

    Args:
      point_sets: one ``[n, k]`` array or a list/dict of them (all methods' normalised points).
      ideal: ``[k]`` ideal point in the same units as the points (default: ones, i.e. ideal-normalised).
      factor: how far past the worst value, as a multiple of the worst distance to the ideal (> 1).
      fixed: a user-given ``[k]`` reference; returned (validated) as is.

    Returns:
      ``[k]`` float64 reference point.
    """
    if isinstance(point_sets, dict):
        point_sets = list(point_sets.values())
    if not isinstance(point_sets, list | tuple):
        point_sets = [point_sets]
    sets = [as_points(s, f"point_sets[{i}]", allow_empty=True) for i, s in enumerate(point_sets)]
    if not sets:
        raise ValueError("point_sets is empty; give at least one [n, k] array of points")
    ks = {s.shape[1] for s in sets}
    if len(ks) != 1:
        raise ValueError(f"point sets disagree on the number of objectives: {sorted(ks)}")
    k = ks.pop()
    if fixed is not None:
        return as_vector(fixed, k, "fixed reference")
    union = np.concatenate(sets, axis=0)
    if union.shape[0] == 0:
        raise ValueError("all point sets are empty; cannot derive a reference point")
    if not factor > 1:
        raise ValueError(f"factor must be > 1 so the reference lies past the worst point, got {factor}")
    z = np.ones(k) if ideal is None else as_vector(ideal, k, "ideal")
    worst = union.min(axis=0)
    span = z - worst
    margin = (factor - 1.0) * np.where(span > 0, span, 1.0)
    return worst - margin
