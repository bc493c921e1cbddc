"""Exact hypervolume of a set of maximised points with respect to a reference point.

``HV(P; r) = volume( union_{p in P} [r_1, p_1] x ... x [r_k, p_k] )``.

Only points that strictly dominate the reference (``p_k > r_k`` on every axis) span a box of positive
volume; every other point contributes nothing and is dropped silently (this is documented behaviour, not an
error). Algorithms, all exact:

* k = 1: ``max_p (p - r)``.
* k = 2: a vectorised sweep (sort by the first objective, running maximum of the second).
* k = 3: slicing along the third objective, each slice's area by the 2-D sweep (O(n^2 log n)).
* k >= 4: WFG (While, Bradstreet & Barone, IEEE TEC 2012): ``HV(S) = sum_i exclusive(p_i)``, the points
  sorted worst-first on the last objective so that each "limited set" ``{min(p_i, q) : q after p_i}`` lies
  in one slab and its hypervolume is ``p_{i,k} * HV_{k-1}`` of its projection; dominated points are filtered
  out of every limited set. Meant for fronts of a few hundred points up to k ~ 8.
"""

import numpy as np

from hm3_jax.moo._checks import as_points, as_vector


def hypervolume(points, reference) -> float:
    """Hypervolume dominated by ``points`` (maximised) and bounded by ``reference``.

    Args:
      points: ``[n, k]`` objective values, higher is better, n >= 1.
      reference: ``[k]`` reference point; points not strictly better than it on every axis contribute 0.

    Returns:
      The hypervolume as a Python float (0.0 if no point strictly dominates the reference).

    Raises:
      ValueError: NaN/inf in points or reference, wrong shapes or an empty point set.
    """
    p = as_points(points)
    r = as_vector(reference, p.shape[1], "reference")
    u = p - r  # boxes [0, u] anchored at the origin
    u = u[np.all(u > 0, axis=1)]
    if u.shape[0] == 0:
        return 0.0
    return float(_hv(_nondominated(u)))


def _nondominated(u: np.ndarray) -> np.ndarray:
    """Removes dominated rows and all but the first copy of duplicate rows (duplicates add no volume)."""
    if u.shape[0] <= 1:
        return u
    ge = (u[:, None, :] >= u[None, :, :]).all(axis=-1)  # [j, i]: u_j weakly dominates u_i
    dominated = (ge & ~ge.T).any(axis=0)
    duplicate = np.triu(ge & ge.T, 1).any(axis=0)
    return u[~(dominated | duplicate)]


def _hv2(u: np.ndarray) -> float:
    order = np.argsort(-u[:, 0], kind="stable")
    x, y = u[order, 0], np.maximum.accumulate(u[order, 1])
    return float(np.sum(x * np.diff(y, prepend=0.0)))


def _hv3(u: np.ndarray) -> float:
    order = np.argsort(-u[:, 2], kind="stable")
    u = u[order]
    heights = np.append(u[:, 2], 0.0)
    total = 0.0
    for i in range(u.shape[0]):
        slab = heights[i] - heights[i + 1]
        if slab > 0:
            total += slab * _hv2(u[: i + 1, :2])
    return total


def _hv(u: np.ndarray) -> float:
    """Hypervolume of boxes [0, u_i] for positive, mutually non-dominated rows ``u``."""
    n, k = u.shape
    if n == 1:
        return float(np.prod(u[0]))
    if k == 1:
        return float(u.max())
    if k == 2:
        return _hv2(u)
    if k == 3:
        return _hv3(u)
    if n == 2:
        return float(np.prod(u[0]) + np.prod(u[1]) - np.prod(np.minimum(u[0], u[1])))
    u = u[np.argsort(u[:, -1], kind="stable")]  # worst-first on the last objective
    total = 0.0
    for i in range(n):
        total += float(np.prod(u[i]))
        if i + 1 < n:
            limited = np.minimum(u[i + 1 :, :-1], u[i, :-1])
            total -= float(u[i, -1]) * _hv(_nondominated(limited))
    return total
