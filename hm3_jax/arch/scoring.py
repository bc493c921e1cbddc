"""Score functions of finished paths for the trainer: ``score_fn(paths [N, t_max] int32 -1 padded,
preferences [N, K], preference_index [N] int32) -> normalised scores [N, K]`` (maximised). ``preference_index``
is the row of the trainer's preference vectors each episode drew (``rollout.Batch.preference_index``; -1 for a
Dirichlet draw), so a score function that keeps one model per preference needs no search for it.

A jittable function (synthetic / planted problems) is called inside the training step as it is; a host (numpy)
function, e.g. the path-evaluation engine, is wrapped by :func:`host_score_fn` (``jax.pure_callback``) and
usually put behind :class:`CachedScoreFn`, which never re-scores a (path, preference) pair it has seen. A
jittable ``score_fn`` is not cached (inside jit there is no mutable state; a synthetic score is cheaper than a
lookup anyway).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

ScoreFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
HostScoreFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def host_score_fn(fn: HostScoreFn, num_tasks: int) -> ScoreFn:
    """Wraps a host (numpy) score function so it can be called inside jit via ``jax.pure_callback``.

    ``fn(paths [N, t_max] int32, preferences [N, K] float32, preference_index [N] int32) -> [N, K]``. Extra
    leading axes (from vmap) are flattened before the call. Wrap ``fn`` in :class:`CachedScoreFn` to avoid
    re-scoring paths.
    """

    def host(paths, preferences, preference_index):
        paths = np.asarray(paths)
        prefs = np.asarray(preferences)
        lead = paths.shape[:-1]
        index = np.asarray(preference_index).reshape(-1)
        out = np.asarray(
            fn(paths.reshape(-1, paths.shape[-1]), prefs.reshape(-1, prefs.shape[-1]), index), np.float32
        )
        if out.shape != (int(np.prod(lead)), num_tasks):
            raise ValueError(
                f"score function returned shape {out.shape}, expected {(int(np.prod(lead)), num_tasks)}"
            )
        return out.reshape(lead + (num_tasks,))

    def score(paths: jax.Array, preferences: jax.Array, preference_index: jax.Array) -> jax.Array:
        shape = jax.ShapeDtypeStruct(paths.shape[:-1] + (num_tasks,), jnp.float32)
        return jax.pure_callback(
            host, shape, paths, preferences, preference_index, vmap_method="broadcast_all"
        )

    return score


class CachedScoreFn:
    """Host-side cache in front of an expensive score function: a (path, preference) pair is scored once.

    ``fn(paths [M, t_max], preferences [M, K]) -> [M, K]`` is called only on the rows never seen before, each
    distinct row once per call. ``hits`` / ``misses`` count rows served from the cache / scored. Called as a
    :data:`HostScoreFn`; ``preference_index`` is accepted and not used (the key holds the preference itself).
    The key includes the preference because the merged source Theta(lambda) depends on it. ``preference_free=True``
    drops it from the key when the caller's scores do not depend on lambda (e.g. an expert-only pool).
    """

    def __init__(self, fn: Callable[[np.ndarray, np.ndarray], np.ndarray], preference_free: bool = False):
        self.fn = fn
        self.preference_free = preference_free
        self.cache: dict[bytes, np.ndarray] = {}
        self.hits = 0
        self.misses = 0

    def _key(self, path: np.ndarray, pref: np.ndarray) -> bytes:
        head = np.asarray(path, np.int32).tobytes()
        return head if self.preference_free else head + b"|" + np.asarray(pref, np.float32).tobytes()

    def __call__(self, paths: np.ndarray, preferences: np.ndarray, preference_index=None) -> np.ndarray:
        del preference_index
        paths = np.asarray(paths, np.int32)
        preferences = np.asarray(preferences, np.float32)
        keys = [self._key(p, w) for p, w in zip(paths, preferences, strict=True)]
        todo: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            if k not in self.cache and k not in todo:
                todo[k] = i
        if todo:
            rows = np.array(list(todo.values()))
            scores = np.asarray(self.fn(paths[rows], preferences[rows]), np.float32)
            for k, s in zip(todo, scores, strict=True):
                self.cache[k] = s
        self.misses += len(todo)
        self.hits += len(keys) - len(todo)
        return np.stack([self.cache[k] for k in keys]).astype(np.float32)
