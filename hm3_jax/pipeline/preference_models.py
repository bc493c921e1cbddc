"""Theta(lambda) per preference, built when a stage needs it: memory that does not grow with the preferences.

Every stage after the parameter level needs, per preference i, the merged model Theta(lambda_i) as a path model:
its shell (embeddings, final norm, head) and its pool (the K experts' blocks, then Theta's own; `problem.pool_for`,
pool index m * L + l). Holding all N of them costs N shells and N (K + 1) L blocks: with 15 preferences and three
7B experts, hundreds of GB. `PreferenceModels` keeps each Theta(lambda_i) as its recipe (the parameter level's
entry: preference, merge key, hyperparameters; `param_level.merged_for`) and builds shell and pool on first use,
holding at most `resident` of them at once (least recently used dropped first; 0 = hold every one once built,
the default for small models). A merge is a pure function of its recipe, so a dropped model is rebuilt bit for
bit and no result depends on `resident` (tests/test_confirm.py, tests/test_hm3_distributed.py). Peak memory with `resident = 1`: the
sources (base and K experts), one pool ((K + 1) L blocks), one shell and one merge's temporaries, whatever N.
Above `problem.SCORE_POOL_COPY_MAX_BYTES` the pools are parted (`problem.uses_parts`): a preference's pool is the
experts' own block arrays plus Theta's, so it adds only Theta's L blocks to the sources.

The per-preference engines (`PathEngine.with_model`, which also hold the pool and, on a mesh, its placed copy)
live with their preference's entry (`engine`), so dropping an entry frees everything it holds.

    bank = PreferenceModels(problem, param_entries, variant, resident=1)
    shells, pools = bank.shells, bank.pools    # lazy sequences: len(), [i], iteration
    engine = bank.engine(problem.engines["search"], i, pool_id)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import jax

from hm3_jax import models
from hm3_jax.paths import engine as engine_lib
from hm3_jax.search import param_level
from hm3_jax.search.problem import Problem, place_own_part, pool_for


def resident_preferences(config) -> int:
    """`config.memory.resident_preferences` of a run config (0 = every preference's model held: the default,
    also for a config without the key or no config)."""
    memory = None if config is None else config.get("memory")
    return int(memory.get("resident_preferences", 0)) if memory is not None else 0


class LazySequence(Sequence):
    """A read-only sequence whose item i is `fn(i)`, computed on each access (a `PreferenceModels` bank caches);
    `bank` is the bank it reads, if any (`PathScorer` asks it for engines)."""

    def __init__(self, length: int, fn: Callable[[int], Any], bank: PreferenceModels | None = None):
        self._length, self._fn, self.bank = length, fn, bank

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._length))]
        if not -self._length <= index < self._length:
            raise IndexError(f"preference index {index} out of range for {self._length} preferences")
        return self._fn(index % self._length)


class PreferenceModels:
    """Theta(lambda_i)'s shell and pool per preference, rebuilt from the parameter level's recipes on demand.

    Args:
      problem: the Problem (its base and experts are the merge's sources).
      entries: the parameter level's N entries (`param_level.run_param_level`), one per preference.
      variant: "paper" or "tuned" (`param_level.merged_for`).
      resident: how many preferences' shell + pool (+ engines) are held at once; 0 = all of them.
    """

    def __init__(self, problem: Problem, entries: Sequence[dict], variant: str, resident: int = 0):
        if resident < 0:
            raise ValueError(f"memory.resident_preferences must be >= 0 (0 = all), got {resident}")
        self.problem, self.entries, self.variant = problem, list(entries), variant
        self.resident = int(resident)
        self._held: OrderedDict[int, dict] = OrderedDict()  # i -> {"shell", "pool", "engines"}
        self.builds = 0  # merges run so far (a preference dropped and needed again is merged again)
        n = len(self.entries)
        self.shells = LazySequence(n, lambda i: self._entry(i)["shell"], self)
        self.pools = LazySequence(n, lambda i: self._entry(i)["pool"], self)

    def __len__(self) -> int:
        return len(self.entries)

    def merged(self, index: int) -> dict:
        """Theta(lambda_index) as full params (merged again on every call: hold it only as long as needed)."""
        self.builds += 1
        return param_level.merged_for(self.problem, self.entries[index], self.variant)

    def _entry(self, index: int) -> dict:
        held = self._held.get(index)
        if held is not None:
            self._held.move_to_end(index)
            return held
        if self.resident and len(self._held) >= self.resident:
            self._held.popitem(last=False)  # before building the next one: never resident + 1 pools at once
        merged = self.merged(index)
        shell, pool = models.shell_of(merged), pool_for(self.problem, merged)
        # its blocks are in the pool (copied, or its own part of a parted pool); the shell keeps the rest
        del merged
        search = self.problem.engines["search"]
        if search.strategy == "shard" and jax.process_count() == 1:
            # placed once for every split's engine of this preference; the unplaced pool leaves device 0 (one
            # process only: on several, the export and alignment code read the pool as a local array)
            if models.is_parted(pool) and models.is_parted(search.pool):
                # the experts' parts are already placed (the sources' pool): place only Theta's own part
                shell, pool = place_own_part(search, shell, pool, len(self.problem.experts))
            else:
                shell, pool = engine_lib.place_model(shell, pool, search.mesh)
        held = {"shell": shell, "pool": pool, "engines": {}}
        self._held[index] = held
        return held

    def engine(self, base_engine, index: int, pool_id: str):
        """`base_engine.with_model(shell_index, pool_index, pool_id)`, held with the preference's entry."""
        held = self._entry(index)
        key = (id(base_engine), pool_id)
        if key not in held["engines"]:
            held["engines"][key] = base_engine.with_model(held["shell"], held["pool"], pool_id=pool_id)
        return held["engines"][key]
