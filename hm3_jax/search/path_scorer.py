"""The architecture level's host score function: `PathScorer` sends each path to the engine of its preference's
pool (one split), optionally with junction alignment, and returns normalised scores `f_k / z*_k`. It remembers
every scored (preference, path) in an archive that is saved with the RL checkpoints, so a resumed run sees the
same archive (and counts the cost of the work before the kill).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from hm3_jax.io import atomic
from hm3_jax.paths.cache import canonicalize
from hm3_jax.search.problem import Problem


class PathScorer:
    """Host score function `(paths [N, T_max], preferences [N, K], preference_index [N] or None) -> normalised
    scores [N, K]`.

    Args:
      problem: the Problem; split: "search" (what the RL sees) or "heldout" (reports only).
      preferences: [N, K] the preference vectors (rows of the episode preferences).
      shells, pools: per preference, the path model's shell and block pool.
      tag: cache namespace (keeps HM3 and its ablation apart in the engine cache).
      aligners: None or per preference an `hm3_jax.paths.alignment.Aligner`.
      shared_pool_id: None (each preference its own model), or the engine cache identity of the one model that
        every preference's shell and pool are (the no-parameter-level ablation: the experts' blocks under every
        preference). A path's raw scores then do not depend on the preference, so a path scored under one
        preference answers it under every other without the engine; it is still charged to each preference
        (`archive`, the search's evaluation count) as if evaluated. The scores are the same as without sharing
        (the engine's cache would answer the same bytes); only the work and `flops` / `seconds` shrink.
    """

    def __init__(
        self,
        problem: Problem,
        split: str,
        preferences,
        shells,
        pools,
        tag: str,
        aligners=None,
        shared_pool_id: str | None = None,
    ):
        self.problem = problem
        self.split = split
        self.preferences = np.asarray(preferences, np.float32)
        if len(shells) != len(pools) or len(pools) != len(self.preferences):
            raise ValueError(
                f"PathScorer: {len(self.preferences)} preferences, {len(shells)} shells, {len(pools)} pools"
            )
        self.shells, self.pools, self.tag = shells, pools, tag
        if shared_pool_id is not None and aligners is not None:
            raise ValueError(
                "PathScorer: a shared model (shared_pool_id) takes no aligners (junctions are fitted per preference)"
            )
        self.shared_pool_id = shared_pool_id
        # Engines are made on first use: a `PreferenceModels` bank holds them with its preference's pool (and
        # drops both together); plain lists of shells and pools keep one engine per preference here.
        self._engines: dict[int, object] = {}
        self.aligners = aligners
        self.evaluations = 0
        self.flops = 0.0
        self.seconds = 0.0
        self.archive: dict[tuple[int, bytes], np.ndarray] = {}  # (preference, path bytes) -> scores [K]
        # the same by (model, canonical path) (`__call__`); the model is the preference, or 0 when shared
        self.scored: dict[tuple[int, bytes], np.ndarray] = {}

    def model_index(self, index: int) -> int:
        """Which model preference `index` scores with: itself, or 0 when every preference shares one."""
        return 0 if self.shared_pool_id is not None else int(index)

    def pool_id(self, index: int) -> str:
        """The engine cache identity of preference `index`'s model (`scorer_pool_id`, or the shared one)."""
        return self.shared_pool_id if self.shared_pool_id is not None else scorer_pool_id(self.tag, index)

    def engine(self, index: int):
        """The split's engine over preference `index`'s shell and pool (cache identity `pool_id`)."""
        index = self.model_index(index)
        base, pool_id = self.problem.engines[self.split], self.pool_id(index)
        bank = getattr(self.pools, "bank", None)
        if bank is not None:
            return bank.engine(base, index, pool_id)
        if index not in self._engines:
            self._engines[index] = base.with_model(self.shells[index], self.pools[index], pool_id=pool_id)
        return self._engines[index]

    def preference_index(self, prefs: np.ndarray, index=None) -> np.ndarray:
        """[N] which of the preference vectors each row of `prefs` [N, K] is: `index` [N] when the caller knows it
        (the trainer's batch carries it; checked against `prefs`), else the nearest preference vector.
        ValueError when a row is not one of the preference vectors."""
        prefs = np.asarray(prefs, np.float32)
        if index is not None and np.all(np.asarray(index) >= 0):
            idx = np.asarray(index)
            if np.any(np.abs(prefs - self.preferences[idx]).sum(-1) > 1e-4):
                raise ValueError("PathScorer got a preference that is not one of its preference vectors")
            return idx
        d = np.abs(prefs[:, None, :] - self.preferences[None]).sum(-1)
        idx = d.argmin(1)
        if np.any(d[np.arange(len(idx)), idx] > 1e-4):
            raise ValueError("PathScorer got a preference that is not one of its preference vectors")
        return idx

    def raw(self, index: int, paths: np.ndarray) -> np.ndarray:
        """Raw scores [N, K] of paths under preference `index`'s pool (cached by the engine)."""
        junction = None if self.aligners is None else self.aligners[index].junctions(paths)
        res = self.engine(index).evaluate(paths, junction)
        self.evaluations += res.cost.num_evaluations
        self.flops += res.cost.flops
        self.seconds += res.cost.seconds
        return res.scores

    def __call__(self, paths: np.ndarray, prefs: np.ndarray, preference_index=None) -> np.ndarray:
        """Normalised scores [N, K] of `paths` [N, T_max] under `prefs` [N, K] (each one of the preferences, row
        `preference_index` [N] of them when given: a `HostScoreFn` of `hm3_jax.arch.scoring`).

        A path scored before under the same preference (under any preference when the model is shared; padding
        placed anywhere: the engine's cache key) is answered from `scored` without the engine, as the engine's
        cache would answer it, and archived (charged) under this preference; `scored` is restored
        from the archive after a resume (`load_archive`), where the engine's cache is empty, so a resumed run
        spends (and counts) the FLOPs of the uninterrupted one.
        """
        paths = np.asarray(paths, np.int32)
        canonical = canonicalize(paths)[0]  # [N, T_max]
        idx = self.preference_index(prefs, preference_index)
        out = np.zeros((len(paths), self.problem.num_tasks), np.float32)
        for i in np.unique(idx):
            rows, m = np.nonzero(idx == i)[0], self.model_index(i)
            new = [r for r in rows if (m, canonical[r].tobytes()) not in self.scored]
            if new:
                norm = self.problem.normalise(self.raw(int(i), paths[new]), self.split)
                for r, s in zip(new, norm, strict=True):
                    self.scored[(m, canonical[r].tobytes())] = s
            for r in rows:
                s = self.scored[(m, canonical[r].tobytes())]
                out[r] = s
                self.archive[(int(i), paths[r].tobytes())] = s
        return out

    # Archive persistence (saved beside the RL checkpoints).
    def save_archive(self, path: str, wall_seconds: float = 0.0) -> None:
        """Writes the archive with the cost so far (FLOPs, engine seconds, and `wall_seconds` of the caller), so
        that a resumed run's cost accounting includes the work before the kill."""
        if (
            not self.archive or jax.process_index() != 0
        ):  # multi-process: every process holds the same archive
            return
        keys = list(self.archive)
        idx = np.array([k[0] for k in keys], np.int32)
        paths = np.stack([np.frombuffer(k[1], np.int32) for k in keys])
        scores = np.stack([self.archive[k] for k in keys])
        cost = np.array([self.flops, self.seconds, wall_seconds], np.float64)  # [3]
        with atomic.atomic_file(path, "wb") as f:
            np.savez(f, index=idx, paths=paths, scores=scores, cost=cost)

    def load_archive(self, path: str) -> float:
        """Restores the archive and the cost of `save_archive`; returns the wall seconds it recorded (0 when
        there is no archive: a fresh run)."""
        if not os.path.exists(path):
            return 0.0
        with np.load(path) as z:
            for i, p, s in zip(z["index"], z["paths"], z["scores"], strict=True):
                self.archive[(int(i), np.asarray(p, np.int32).tobytes())] = s
                canonical = canonicalize(np.asarray(p, np.int32)[None])[0][0]
                self.scored[(self.model_index(int(i)), canonical.tobytes())] = s
            flops, seconds, wall_seconds = z["cost"] if "cost" in z else (0.0, 0.0, 0.0)
        self.flops, self.seconds = float(flops), float(seconds)
        return float(wall_seconds)


def scorer_pool_id(tag: str, index: int) -> str:
    """The engine cache identity of a PathScorer's model for preference `index` (the same on every split: each
    split's engine keeps its own cache); a `model_spec` with this id reads the statistics kept when it scored."""
    return f"{tag}/pref{index}"
