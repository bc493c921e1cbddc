"""Exact hypervolume of a set of maximised points with respect to a reference point.

``HV(P; r) = volume( union_{p in P} [r_1, p_1] x ... x [r_k, p_k] )``.

Only points that strictly dominate the reference (``p_k > r_k`` on every axis) span a box of positive
volume; every other point contributes nothing and is dropped silently (this is documented behaviour, not an
error).

`hypervolume` computes it with moocore (López-Ibáñez et al., C): 2-D and 3-D sweeps in O(n log n), HV4D+
for k = 4, inclusion-exclusion for small sets and Fonseca-Paquete-López-Ibáñez's recursion with 4-D base cases
for k >= 5. On tiny8-sized fronts (k = 8, 15-60 points) it is 11-66x faster than our own exact implementation
(`benchmarks/hypervolume.py`), and it is the function every caller uses. The ratio shrinks as fronts grow
(4x at 100, 1.4x at 150 points; past ~200 points in 8-D our WFG is the faster one, docs/moo.md); every front
HM3 reports has one point per preference.

`hypervolume_reference` is our own, independent exact implementation, kept as the reference the tests compare
moocore against (and the fallback above moocore's dimension limit):

* k = 1: ``max_p (p - r)``.
* k = 2: a vectorised sweep (sort by the first objective, running maximum of the second).
* k = 3: slicing along the third objective, each slice's area by the 2-D sweep (O(n^2 log n)).
* k >= 4: WFG (While, Bradstreet & Barone, IEEE TEC 2012): ``HV(S) = sum_i exclusive(p_i)``, the points
  sorted worst-first on the last objective so that each "limited set" ``{min(p_i, q) : q after p_i}`` lies
  in one slab and its hypervolume is ``p_{i,k} * HV_{k-1}`` of its projection; dominated points are filtered
  out of every limited set.
"""

import moocore
import numpy as np

from hm3_jax.moo._checks import as_points, as_vector

# moocore's C code takes at most this many objectives (moocore._moocore.HV_DIMENSION_MAX, 31 in moocore 0.3)
MOOCORE_MAX_OBJECTIVES = 31


def hypervolume(points, reference) -> float:
    """Hypervolume dominated by ``points`` (maximised) and bounded by ``reference``, computed by moocore.

    Args:
      points: ``[n, k]`` objective values, higher is better, n >= 1.
      reference: ``[k]`` reference point; points not strictly better than it on every axis contribute 0.

    Returns:
      The hypervolume as a Python float (0.0 if no point strictly dominates the reference).

    Raises:
      ValueError: NaN/inf in points or reference, wrong shapes or an empty point set.
    """
    u = _boxes(points, reference)
    if u.shape[0] == 0:
        return 0.0
    if u.shape[1] > MOOCORE_MAX_OBJECTIVES:
        return float(_hv(_nondominated(u)))
    # boxes [0, u_i], minimised as -u against the origin: moocore's own convention, so it copies nothing
    return float(moocore.hypervolume(-u, ref=np.zeros(u.shape[1])))


def hypervolume_reference(points, reference) -> float:
    """`hypervolume` by our own exact algorithms (module docstring), independent of moocore.

    Same arguments, result (to rounding) and errors as `hypervolume`; slower from k = 4 on.
    """
    u = _boxes(points, reference)
    if u.shape[0] == 0:
        return 0.0
    return float(_hv(_nondominated(u)))


def _boxes(points, reference) -> np.ndarray:
    """``[m, k]`` positive corners ``p - r`` of the boxes of the points that strictly dominate ``reference``."""
    p = as_points(points)
    r = as_vector(reference, p.shape[1], "reference")
    u = p - r  # boxes [0, u] anchored at the origin
    return u[np.all(u > 0, axis=1)]


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
