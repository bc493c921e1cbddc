"""Preference vectors on the probability simplex (HM3_SPEC "Objectives and preferences").

A preference ``lambda`` has ``lambda_k >= 0`` and ``sum_k lambda_k = 1``; row ``i`` of a ``[n, k]`` array is
one preference. HM3 samples N of them from Dirichlet(1, ..., 1) with an explicit key, or uses a uniform
Das-Dennis lattice.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

_SUM_TOLERANCE = 1e-5


def dirichlet(key: jax.Array, n: int, k: int, concentration: float = 1.0) -> jax.Array:
    """Samples ``n`` preferences uniformly on the simplex (Dirichlet(alpha, ..., alpha), alpha=1 is uniform).

    Args:
      key: PRNG key.
      n: number of preference vectors (>= 1).
      k: number of objectives (>= 1).
      concentration: the symmetric Dirichlet parameter alpha (> 0).

    Returns:
      ``[n, k]`` float32 array, rows non-negative and summing to 1.
    """
    if int(n) < 1 or int(k) < 1:
        raise ValueError(f"dirichlet needs n >= 1 and k >= 1, got n={n}, k={k}")
    if not concentration > 0:
        raise ValueError(f"dirichlet concentration must be > 0, got {concentration}")
    alpha = jnp.full((int(k),), float(concentration), dtype=jnp.float32)
    return jax.random.dirichlet(key, alpha, shape=(int(n),))


def das_dennis(k: int, divisions: int) -> np.ndarray:
    """The Das-Dennis (simplex-lattice) design: every ``w`` with ``w_j = c_j / divisions``, integers c_j >= 0.

    There are ``C(divisions + k - 1, k - 1)`` such points. Rows are in lexicographic order of ``c``
    (descending first coordinate), so the result is deterministic.

    Args:
      k: number of objectives (>= 1).
      divisions: lattice resolution H (>= 1); ``k=3, divisions=4`` gives 15 preferences.

    Returns:
      ``[C(H + k - 1, k - 1), k]`` float64 array on the simplex.
    """
    k, divisions = int(k), int(divisions)
    if k < 1 or divisions < 1:
        raise ValueError(f"das_dennis needs k >= 1 and divisions >= 1, got k={k}, divisions={divisions}")
    rows = []
    # Stars and bars: choose k-1 bar positions among divisions + k - 1 slots.
    for bars in itertools.combinations(range(divisions + k - 1), k - 1):
        edges = (-1, *bars, divisions + k - 1)
        rows.append([edges[j + 1] - edges[j] - 1 for j in range(k)])
    counts = np.asarray(rows, dtype=np.float64)[::-1]
    assert counts.shape[0] == math.comb(divisions + k - 1, k - 1)
    return counts / divisions


def validate_preference(pref, k: int | None = None, normalize: bool = False) -> np.ndarray:
    """Checks that ``pref`` (``[k]`` or ``[n, k]``) lies on the simplex; returns it as float64.

    Args:
      pref: one preference ``[k]`` or a batch ``[n, k]``.
      k: expected number of objectives, or None to accept any.
      normalize: if True, a non-negative preference with a positive sum is divided by its sum instead of
        being rejected for not summing to 1.

    Returns:
      float64 array of the same shape whose rows sum to 1.

    Raises:
      ValueError: wrong rank or length, NaN/inf, a negative entry, an all-zero row, or (without
        ``normalize``) a row whose sum differs from 1 by more than 1e-5.
    """
    arr = np.asarray(pref, dtype=np.float64)
    if arr.ndim not in (1, 2) or arr.shape[-1] == 0:
        raise ValueError(f"preference must have shape [k] or [n, k] with k >= 1, got shape {arr.shape}")
    if k is not None and arr.shape[-1] != int(k):
        raise ValueError(f"preference has {arr.shape[-1]} entries but there are k={k} objectives")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"preference contains NaN or inf: {arr.tolist()}")
    if np.any(arr < 0):
        raise ValueError(f"preference has a negative entry (all must be >= 0): {arr.tolist()}")
    sums = arr.sum(axis=-1, keepdims=True)
    if np.any(sums <= 0):
        raise ValueError(f"preference has a row that is all zeros: {arr.tolist()}")
    if normalize:
        return arr / sums
    if np.any(np.abs(sums - 1.0) > _SUM_TOLERANCE):
        raise ValueError(
            f"preference rows must sum to 1 (got sums {np.ravel(sums).tolist()}); pass normalize=True to rescale"
        )
    return arr
