"""Input validation shared by the host-side multi-objective functions (numpy in, clear errors out)."""

import numpy as np


def as_points(points, name: str = "points", allow_empty: bool = False) -> np.ndarray:
    """Returns ``points`` as a float64 ``[n, k]`` array, or raises ``ValueError`` naming ``name``.

    Rejects: a rank other than 2, ``k == 0``, non-finite entries (NaN or inf), and ``n == 0`` unless
    ``allow_empty``.
    """
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n, k] of objective values, got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has no objectives (shape {arr.shape}); expected [n, k] with k >= 1")
    if arr.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty (shape {arr.shape}); at least one point is required")
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(
            f"{name} contains a non-finite value (NaN or inf) at index {tuple(int(i) for i in bad)}"
        )
    return arr


def as_vector(vector, k: int | None, name: str) -> np.ndarray:
    """Returns ``vector`` as a finite float64 ``[k]`` array, or raises ``ValueError`` naming ``name``."""
    arr = np.asarray(vector, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array [k], got shape {arr.shape}")
    if k is not None and arr.shape[0] != k:
        raise ValueError(f"{name} has {arr.shape[0]} entries but the points have k={k} objectives")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains a non-finite value (NaN or inf): {arr.tolist()}")
    return arr
