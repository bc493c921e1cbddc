"""Pareto dominance for maximised objectives: non-dominated masks, ranks, crowding, dominance matrices.

``a`` dominates ``b`` (maximisation) iff ``a_k >= b_k`` for every k and ``a_k > b_k`` for at least one k.

Duplicates: two identical points do not dominate each other, so ``pareto_mask`` keeps every copy of a
non-dominated point by default; ``keep_duplicates=False`` keeps only the first occurrence (lowest index).

Cost: the pairwise comparisons are vectorised, O(n^2 k) time and memory (fine for the few thousand points of
a merging run; 10^4 points in 8 objectives need about 1 GB).
"""

import numpy as np

from hm3_jax.moo._checks import as_points


def _dominates(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[n_a, n_b]`` bool: entry [i, j] is True iff ``a[i]`` dominates ``b[j]`` (maximisation)."""
    ge = np.all(a[:, None, :] >= b[None, :, :], axis=-1)
    gt = np.any(a[:, None, :] > b[None, :, :], axis=-1)
    return ge & gt


def dominance_matrix(set_a, set_b) -> np.ndarray:
    """Entry ``[i, j]`` is True iff point ``set_a[i]`` dominates point ``set_b[j]`` (all objectives maximised).

    Args:
      set_a: ``[n_a, k]`` points.
      set_b: ``[n_b, k]`` points.

    Returns:
      ``[n_a, n_b]`` bool array.
    """
    a = as_points(set_a, "set_a")
    b = as_points(set_b, "set_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"set_a has k={a.shape[1]} objectives but set_b has k={b.shape[1]}")
    return _dominates(a, b)


def dominance_summary(set_a, set_b) -> dict:
    """Summarises how two point sets dominate each other (Zitzler's set-coverage C-metric, both ways).

    Returns:
      dict with ``num_a``, ``num_b``, ``b_dominated_by_a`` = fraction of B's points dominated by at least one
      point of A (C(A, B)), ``a_dominated_by_b`` = C(B, A), and the raw count ``num_dominating_pairs``
      (pairs (i, j) with a_i dominating b_j) and ``num_dominated_pairs`` (b_j dominating a_i).
    """
    m = dominance_matrix(set_a, set_b)
    m_rev = dominance_matrix(set_b, set_a)
    return {
        "num_a": int(m.shape[0]),
        "num_b": int(m.shape[1]),
        "b_dominated_by_a": float(np.mean(np.any(m, axis=0))),
        "a_dominated_by_b": float(np.mean(np.any(m_rev, axis=0))),
        "num_dominating_pairs": int(m.sum()),
        "num_dominated_pairs": int(m_rev.sum()),
    }


def pareto_mask(points, keep_duplicates: bool = True) -> np.ndarray:
    """Marks the non-dominated points (maximisation).

    Args:
      points: ``[n, k]`` objective values.
      keep_duplicates: if True every copy of a non-dominated point is marked; if False only the first.

    Returns:
      ``[n]`` bool mask, True where no other point dominates the point.
    """
    p = as_points(points)
    mask = ~np.any(_dominates(p, p), axis=0)
    if not keep_duplicates:
        _, first = np.unique(p, axis=0, return_index=True)
        is_first = np.zeros(p.shape[0], dtype=bool)
        is_first[first] = True
        mask &= is_first
    return mask


def non_dominated_ranks(points) -> np.ndarray:
    """Non-dominated sorting (Deb et al. 2002, NSGA-II): rank 0 is the Pareto front, rank 1 the front of the
    rest, and so on.

    Args:
      points: ``[n, k]`` objective values (maximised).

    Returns:
      ``[n]`` int array of front indices.
    """
    p = as_points(points)
    dom = _dominates(p, p)  # [i, j]: i dominates j
    num_dominators = dom.sum(axis=0)
    ranks = np.full(p.shape[0], -1, dtype=np.int64)
    current = np.flatnonzero(num_dominators == 0)
    rank = 0
    while current.size:
        ranks[current] = rank
        num_dominators = num_dominators - dom[current].sum(axis=0)
        num_dominators[ranks >= 0] = -1
        current = np.flatnonzero(num_dominators == 0)
        rank += 1
    return ranks


def crowding_distance(points) -> np.ndarray:
    """NSGA-II crowding distance within one front (Deb et al. 2002).

    For each objective the points are sorted; the two extremes get ``inf`` and each inner point adds
    ``(f_{next} - f_{prev}) / (f_max - f_min)`` (objectives with zero range add nothing).

    Args:
      points: ``[n, k]`` points of one front.

    Returns:
      ``[n]`` float array, larger = less crowded.
    """
    p = as_points(points)
    n, k = p.shape
    distance = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for j in range(k):
        order = np.argsort(p[:, j], kind="stable")
        values = p[order, j]
        span = values[-1] - values[0]
        distance[order[0]] = distance[order[-1]] = np.inf
        if span > 0:
            distance[order[1:-1]] += (values[2:] - values[:-2]) / span
    return distance
