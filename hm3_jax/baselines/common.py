"""Shared pieces of the path-space baselines: pool geometry and a budgeted, caching evaluation wrapper.

The baselines never touch model code. The caller supplies a host-side callback

    evaluate_fn(paths, junction_scales) -> scores
      paths:           np.ndarray int32 [N, T_max], pool indices m * L + l, -1 = padding (padding at the end)
      junction_scales: np.ndarray float32 [N, T_max] (1.0 on padding) or None (plain stacking)
      scores:          np.ndarray [N, K] normalised task scores, maximised

and a budget counted in path evaluations: one row sent to ``evaluate_fn`` is one evaluation. A candidate
identical to one already evaluated in the same run (same path and same float32 scales) is answered from a
cache and costs nothing, like HM3's own path cache. ``BudgetedEvaluator`` never sends more rows than the
budget allows; a batch that would overflow it is cut to the candidates that still fit.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

EvaluateFn = Callable[[np.ndarray, np.ndarray | None], np.ndarray]


class PathGeometry(NamedTuple):
    """The block pool a path indexes: ``num_sources`` models of ``num_layers`` blocks, paths of <= ``t_max``."""

    num_sources: int
    num_layers: int
    t_max: int

    @property
    def pool_size(self) -> int:
        return self.num_sources * self.num_layers


def check_geometry(geometry) -> PathGeometry:
    """Returns ``geometry`` as a ``PathGeometry`` with positive integer fields, else raises ``ValueError``."""
    try:
        g = PathGeometry(*(int(v) for v in geometry))
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"geometry must be (num_sources, num_layers, t_max) integers, got {geometry!r}"
        ) from e
    if min(g) < 1:
        raise ValueError(f"geometry fields must all be >= 1, got {g}")
    return g


def check_budget(budget, minimum: int = 1) -> int:
    if int(budget) != budget or int(budget) < minimum:
        raise ValueError(f"budget must be an integer >= {minimum} (path evaluations), got {budget!r}")
    return int(budget)


class BudgetedEvaluator:
    """Host-side wrapper of ``evaluate_fn``: validation, per-run cache, exact budget, archive, progress bar.

    Attributes:
      evaluations: rows sent to ``evaluate_fn`` so far (never more than ``budget``).
      archive_paths / archive_scales / archive_scores: every distinct evaluated candidate, in order.
    """

    def __init__(self, evaluate_fn: EvaluateFn, geometry: PathGeometry, budget: int, progress: bool = True):
        if not callable(evaluate_fn):
            raise ValueError(f"evaluate_fn must be callable, got {type(evaluate_fn).__name__}")
        self.evaluate_fn = evaluate_fn
        self.geometry = geometry
        self.budget = budget
        self.evaluations = 0
        self.num_objectives: int | None = None
        self._cache: dict[bytes, np.ndarray] = {}
        self.archive_paths: list[np.ndarray] = []
        self.archive_scales: list[np.ndarray | None] = []
        self.archive_scores: list[np.ndarray] = []
        self._bar = tqdm(total=budget, desc="path evaluations", disable=not progress, leave=False)

    @property
    def remaining(self) -> int:
        return self.budget - self.evaluations

    @staticmethod
    def _key(path: np.ndarray, scales: np.ndarray | None) -> bytes:
        return path.tobytes() + (b"" if scales is None else b"|" + scales.tobytes())

    def __call__(self, paths: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
        """Scores of the longest prefix of the candidates that fits in the remaining budget.

        Args:
          paths: int32 ``[N, T_max]``.
          scales: float32 ``[N, T_max]`` or None.

        Returns:
          ``[M, K]`` float64 scores for candidates ``0..M-1``, ``M <= N``; ``M < N`` only when the budget ran
          out (the caller then stops).
        """
        paths = np.asarray(paths, dtype=np.int32)
        if paths.ndim != 2 or paths.shape[1] != self.geometry.t_max:
            raise ValueError(f"paths must be [N, t_max={self.geometry.t_max}], got shape {paths.shape}")
        if np.any(paths < -1) or np.any(paths >= self.geometry.pool_size):
            raise ValueError(f"paths hold pool indices in [0, {self.geometry.pool_size}) or -1 padding")
        scales = None if scales is None else np.asarray(scales, dtype=np.float32)
        if scales is not None and scales.shape != paths.shape:
            raise ValueError(f"junction scales have shape {scales.shape}, paths {paths.shape}")
        row_scales = [None] * len(paths) if scales is None else list(scales)
        keys = [self._key(p, s) for p, s in zip(paths, row_scales, strict=True)]
        new_rows: list[int] = []
        new_keys: set[bytes] = set()
        accepted = 0
        for i, key in enumerate(keys):
            if key not in self._cache and key not in new_keys:
                if len(new_rows) == self.remaining:
                    break
                new_rows.append(i)
                new_keys.add(key)
            accepted = i + 1
        if new_rows:
            sub_scales = None if scales is None else scales[new_rows]
            scores = np.asarray(self.evaluate_fn(paths[new_rows], sub_scales), dtype=np.float64)
            if scores.ndim != 2 or scores.shape[0] != len(new_rows):
                raise ValueError(
                    f"evaluate_fn must return [N, K] scores for N={len(new_rows)} paths, got shape {scores.shape}"
                )
            if self.num_objectives is None:
                self.num_objectives = scores.shape[1]
            elif scores.shape[1] != self.num_objectives:
                raise ValueError(
                    f"evaluate_fn returned K={scores.shape[1]} scores, earlier K={self.num_objectives}"
                )
            if not np.all(np.isfinite(scores)):
                raise ValueError("evaluate_fn returned NaN or inf scores")
            for row, score in zip(new_rows, scores, strict=True):
                self._cache[keys[row]] = score
                self.archive_paths.append(paths[row])
                self.archive_scales.append(None if scales is None else scales[row])
                self.archive_scores.append(score)
            self.evaluations += len(new_rows)
            self._bar.update(len(new_rows))
        return (
            np.stack([self._cache[k] for k in keys[:accepted]])
            if accepted
            else np.zeros((0, self.num_objectives or 0))
        )

    def archive(self) -> dict:
        """Every distinct evaluated candidate: ``paths [A, T_max]``, ``junction_scales [A, T_max] | None``,
        ``scores [A, K]``."""
        t_max = self.geometry.t_max
        paths = np.stack(self.archive_paths) if self.archive_paths else np.zeros((0, t_max), np.int32)
        has_scales = bool(self.archive_scales) and self.archive_scales[0] is not None
        scales = np.stack(self.archive_scales) if has_scales else None
        k = self.num_objectives or 0
        scores = np.stack(self.archive_scores) if self.archive_scores else np.zeros((0, k))
        return {"paths": paths, "junction_scales": scales, "scores": scores}

    def close(self):
        self._bar.close()


def select_rows(archive: dict, rows) -> dict:
    """The sub-archive at ``rows`` (indices or a bool mask)."""
    scales = archive["junction_scales"]
    return {
        "paths": archive["paths"][rows],
        "junction_scales": None if scales is None else scales[rows],
        "scores": archive["scores"][rows],
    }


def strong_types(tree):
    """Copies every jax array leaf with a strong (non-weak) dtype.

    evosax 0.3's ``init`` returns some weakly typed scalars that ``tell`` returns strongly typed, so the
    second ``ask``/``tell`` would be traced and compiled again; canonicalising the initial state avoids it.
    """
    return jax.tree.map(lambda x: jnp.array(x, dtype=x.dtype) if isinstance(x, jax.Array) else x, tree)
