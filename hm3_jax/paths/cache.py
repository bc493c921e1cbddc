"""Path canonicalisation, fingerprints and the score cache of the path-evaluation engine.

A path is an int32 row of pool indices with -1 as padding; padding steps leave the hidden state unchanged and
apply no junction, so `[3, -1, 5]` and `[3, 5, -1]` are the same model. `canonicalize` moves every real step
to the front (carrying its junction row along), which makes equal models byte-equal and lets the prefix tree
see shared prefixes.

Cache key of one path = sha1(model fingerprint, real steps, junction rows of the real steps or b"none"). The
model fingerprint is an explicit `pool_id` string when given, otherwise a hash of the bytes of every shell and
pool leaf; so a path scored for one preference's merged model is never reused for another.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import jax
import numpy as np


def canonicalize(paths, junction=None, pool_size: int | None = None):
    """Validates paths and moves padding (-1) to the end of every row.

    Args:
      paths: int array [N, T_max] of pool indices, -1 = padding.
      junction: None or {"scale": [N, T_max, D], "shift": [N, T_max, D]}.
      pool_size: if given, every real step must be < pool_size.
    Returns:
      (paths [N, T_max] int32 with real steps first, junction with rows moved alike (or None),
       lengths [N] int32).
    """
    paths = np.asarray(paths)
    if paths.ndim != 2:
        raise ValueError(f"paths must be a 2-D int array [num_paths, t_max], got shape {paths.shape}")
    if not np.issubdtype(paths.dtype, np.integer):
        raise TypeError(f"paths must hold integer pool indices, got dtype {paths.dtype}")
    if paths.size and paths.min() < -1:
        raise ValueError(f"paths may hold -1 (padding) and pool indices >= 0, found {paths.min()}")
    if pool_size is not None and paths.size and paths.max() >= pool_size:
        raise ValueError(f"paths hold pool index {paths.max()} but the pool has only {pool_size} blocks")
    paths = paths.astype(np.int32)
    real = paths >= 0
    # stable argsort of "is padding" puts the real steps first in their original order
    order = np.argsort(~real, axis=1, kind="stable")
    out = np.take_along_axis(paths, order, axis=1)
    lengths = real.sum(axis=1).astype(np.int32)
    if junction is None:
        return out, None, lengths
    if not isinstance(junction, dict) or set(junction) != {"scale", "shift"}:
        raise ValueError("junction must be None or a dict with exactly the keys 'scale' and 'shift'")
    new = {}
    for name in ("scale", "shift"):
        arr = np.asarray(junction[name], np.float32)
        if arr.ndim != 3 or arr.shape[:2] != paths.shape:
            raise ValueError(
                f"junction[{name!r}] must have shape [num_paths, t_max, D] = [{paths.shape[0]}, "
                f"{paths.shape[1]}, D], got {arr.shape}"
            )
        arr = np.take_along_axis(arr, order[:, :, None], axis=1)
        # padding rows are never used; make them identity so equal models stay byte-equal
        arr = np.where(out[:, :, None] >= 0, arr, np.float32(1.0 if name == "scale" else 0.0))
        new[name] = np.ascontiguousarray(arr, np.float32)
    return out, new, lengths


def tree_fingerprint(*trees) -> str:
    """sha1 of the structure, shapes, dtypes and bytes of every leaf of the given pytrees."""
    digest = hashlib.sha1()
    for tree in trees:
        leaves, treedef = jax.tree.flatten(tree)
        digest.update(str(treedef).encode())
        for leaf in leaves:
            arr = np.ascontiguousarray(np.asarray(leaf))
            digest.update(f"{arr.shape}{arr.dtype}".encode())
            digest.update(arr.reshape(-1).view(np.uint8))  # the bytes in place (`tobytes` copied every leaf)
    return digest.hexdigest()


def path_keys(model_id: str, paths: np.ndarray, lengths: np.ndarray, junction: dict | None) -> list[bytes]:
    """One cache key per canonical path: sha1(model_id, real steps, junction rows of real steps)."""
    keys = []
    for i in range(paths.shape[0]):
        n = int(lengths[i])
        digest = hashlib.sha1(model_id.encode())
        digest.update(paths[i, :n].tobytes())
        if junction is None:
            digest.update(b"none")
        else:
            digest.update(junction["scale"][i, :n].tobytes())
            digest.update(junction["shift"][i, :n].tobytes())
        keys.append(digest.digest())
    return keys


class Cost(NamedTuple):
    """Cost of one `evaluate` call (or a running total).

    num_paths: rows asked for; num_unique: distinct (path, junction) rows among them; num_cache_hits: distinct
    rows already scored before this call; num_evaluations: rows actually evaluated (cache misses);
    block_steps: block applications run on device (per data batch; with prefix sharing this counts tree
    nodes); block_steps_plain: what plain evaluation of the misses would have run; flops: analytic forward
    FLOPs spent; flops_plain: the same for plain evaluation of the misses; seconds: wall time.
    """

    num_paths: int = 0
    num_unique: int = 0
    num_cache_hits: int = 0
    num_evaluations: int = 0
    block_steps: int = 0
    block_steps_plain: int = 0
    flops: float = 0.0
    flops_plain: float = 0.0
    seconds: float = 0.0

    def __add__(self, other: Cost) -> Cost:  # running totals
        return Cost(*(a + b for a, b in zip(self, other, strict=True)))


class EvalResult(NamedTuple):
    """Scores of a batch: `scores` float64 [N, num_tasks] (raw task scores in [0, 100]) and its `cost`."""

    scores: np.ndarray
    cost: Cost
