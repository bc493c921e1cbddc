"""The path-evaluation engine: raw task scores of many layer paths over one block pool (HM3_SPEC "Path
evaluation engine"; DESIGN.md "Architecture search").

    engine = make_engine(config, shell, pool, objectives, strategy="auto")
    result = engine.evaluate(paths)            # paths int32 [N, T_max], -1 = padding
    result.scores                              # [N, num_tasks] raw scores in [0, 100]
    result.cost                                # Cost: evaluations, cache hits, block steps, FLOPs, seconds
    engine = engine.with_model(shell2, pool2)  # a new preference's merged model: same compiled code and cache

Score of path alpha on task k: `f_k(alpha) = host_fn_k(device_fn_k(forward_alpha))` with
`forward_alpha(x) = head(run_path(alpha, embed(x)))` (teacher-forced objectives) or greedy decoding along
alpha (chrF). The pool and shell are arguments of the compiled functions (not closed-over constants), so a
new preference's merged model and new paths reuse the compiled code.

Pipeline of `evaluate` (one file per step):
1. canonicalise (padding to the end of each row, junction rows moved along) and validate (cache.py);
2. cache: key = (model fingerprint or `pool_id`, real steps, junction rows); distinct rows that were scored
   before (in this or an earlier call, for this model) are not evaluated again, nor are duplicates in a batch
   (cache.py);
3. teacher-forced objectives of the misses: prefix tree (`prefix_sharing=True`, tree_eval.py and
   prefix_tree.py) or plain; decode objectives (chrF) of the misses: plain;
4. plain evaluation runs fixed-size chunks of paths with the batching strategy "map", "vmap" or "shard"
   (plain.py; "shard" on a device mesh: sharded.py), on `num_threads` host threads (default 2; the tree of
   step 3 runs on the calling thread meanwhile). Strategy "auto" times each available strategy on one chunk
   of random paths at construction (after its compilation) and keeps the fastest; the timings are in
   `engine.strategy_timings`. On this 2-core CPU "map" wins (vmapping paths with different weights was
   measured 1.4-3.3x slower);
5. `host_fn` per path and task (chrF decodes strings and calls sacrebleu there), cost accounting (FLOP
   formulas: flops.py).

Objectives follow DESIGN.md: `name`, `metric` (e.g. "exact_match", "multiple_choice", or one of
`DECODE_METRICS`: "chrf", "generated_exact_match"), `device_fn(forward)` and `host_fn`. At construction every
`device_fn` is called once eagerly with a recording forward, to learn its input batches (recording.py, which
also gives the forward's signatures).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging

from hm3_jax import models
from hm3_jax.models.config import ModelConfig
from hm3_jax.paths.cache import tree_fingerprint
from hm3_jax.paths.path_engine import PathEngine
from hm3_jax.paths.recording import DECODE_METRICS, group_matrix, record_objectives
from hm3_jax.paths.sharded import place_model

STRATEGIES = ("auto", "map", "vmap", "shard")

__all__ = ["DECODE_METRICS", "STRATEGIES", "PathEngine", "group_matrix", "make_engine", "place_model"]


def make_engine(
    config: ModelConfig,
    shell: dict,
    pool: dict,
    objectives: Sequence,
    strategy: str = "auto",
    *,
    chunk_size: int = 8,
    node_chunk_size: int = 16,
    prefix_sharing: bool = True,
    pool_id: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    auto_key: jax.Array | None = None,
    t_max: int | None = None,
    num_threads: int = 2,
    groups: Sequence[int] | None = None,
) -> PathEngine:
    """Builds a path-evaluation engine (see the module docstring).

    Args:
      config: ModelConfig of the shell and of every pool block.
      shell: params without "blocks" (embeddings, final norm, head): Theta(lambda)'s in HM3.
      pool: stacked blocks [P, ...] (`models.make_pool`) or a parted pool (`models.make_parted_pool`: the
        sources' own blocks, no copy), pool index m * L + l.
      objectives: sequence of Objective (name, metric, device_fn, host_fn); one score column each.
      strategy: "auto" | "map" | "vmap" | "shard" (batching of plain evaluation across paths).
      chunk_size: paths per compiled call of plain evaluation (rounded up to a multiple of the mesh size).
      node_chunk_size: prefix-tree nodes per compiled call.
      prefix_sharing: evaluate teacher-forced objectives as a prefix tree (exactly the same scores).
      pool_id: explicit cache identity of (shell, pool); default: a hash of their bytes.
      mesh: Mesh with an axis "paths" (and optionally "data", "model": `hm3_jax.distributed.make_mesh`) for
        strategy "shard" (default: a 1-D mesh of all devices). Paths are split over "paths", the examples of
        every batch over "data"; on more than one device the prefix tree is replaced by path-parallel plain
        evaluation (see the module docstring). Other strategies ignore it (they run on the default device).
      auto_key: PRNG key of the random paths timed by strategy="auto" (default PRNGKey(0)).
      t_max: path length used by strategy="auto" (default config.num_layers).
      num_threads: host threads that run chunks of plain evaluation concurrently, the prefix tree running
        on the calling thread meanwhile (1 = everything in sequence; strategy "shard" always uses 1). The
        scores do not depend on it.
      groups: None (one score column per objective) or, per objective, the index of the column it counts
        towards: `evaluate` then returns per column the mean of its objectives' scores (a spec's objective is
        the mean of its tasks, `hm3_jax.tasks.spec`); the cache keeps the per-objective scores.
    Returns: a PathEngine.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not one of {STRATEGIES}")
    if chunk_size < 1 or node_chunk_size < 1:
        raise ValueError("chunk_size and node_chunk_size must be >= 1")
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    if not objectives:
        raise ValueError("make_engine needs at least one objective")
    if models.is_parted(pool):
        models.check_parted_pool(pool)
    for o in objectives:
        for attr in ("name", "metric", "device_fn", "host_fn"):
            if not hasattr(o, attr):
                raise TypeError(f"objective {o!r} lacks {attr!r} (see DESIGN.md, Objective)")
    if "blocks" in shell:
        shell = {k: v for k, v in shell.items() if k != "blocks"}
    if mesh is None and strategy in ("shard", "auto"):
        mesh = jax.make_mesh((len(jax.devices()),), ("paths",))
    if mesh is not None:
        if "paths" not in mesh.axis_names:
            raise ValueError(f"mesh must have an axis named 'paths', got {mesh.axis_names}")
        n_dev = mesh.shape["paths"]
        chunk_size = -(-chunk_size // n_dev) * n_dev
        if strategy == "shard" and prefix_sharing and mesh.size > 1:
            logging.info(
                "path engine on a %s mesh: teacher-forced objectives run path-parallel instead of as a "
                "prefix tree (same scores)",
                dict(mesh.shape),
            )
            prefix_sharing = False
    shared = record_objectives(config, objectives)
    shared["group_matrix"] = group_matrix(groups, len(objectives))
    engine = PathEngine(
        config=config,
        shell=shell,
        pool=pool,
        objectives=objectives,
        strategy=strategy,
        chunk_size=chunk_size,
        node_chunk_size=node_chunk_size,
        prefix_sharing=prefix_sharing,
        model_id=pool_id or tree_fingerprint(shell, pool),
        shared=shared,
        mesh=mesh,
        num_threads=num_threads,
    )
    if strategy == "auto":
        engine.strategy, timings = pick_strategy(engine, auto_key, t_max or config.num_layers)
        shared["strategy_timings"].update(timings)
    return engine


def pick_strategy(engine: PathEngine, key, t_max: int) -> tuple[str, dict]:
    """Times one chunk of random paths per available strategy (compilation excluded); returns (the fastest,
    {strategy: seconds}). Leaves `engine.strategy` at the last one timed."""
    key = jax.random.PRNGKey(0) if key is None else key
    paths = np.asarray(jax.random.randint(key, (engine.chunk_size, t_max), 0, engine.pool_size), np.int32)
    candidates = ["map", "vmap"] + (["shard"] if engine.mesh is not None and engine.mesh.size > 1 else [])
    all_idx = tuple(range(engine.num_tasks))
    timings = {}
    for name in candidates:
        engine.strategy = name
        engine.run_plain(all_idx, paths, None)  # compile + warm up
        start = time.perf_counter()
        engine.run_plain(all_idx, paths, None)
        timings[name] = time.perf_counter() - start
    best = min(timings, key=timings.get)
    logging.info("path engine strategy=auto timings %s -> %s", timings, best)
    return best, timings
