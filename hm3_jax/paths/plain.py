"""Plain evaluation of the path engine: every path run alone, in fixed-size chunks of paths, with a batching
strategy:

- "map":   `lax.map` over the paths of a chunk (one path's matmuls over the whole data batch at a time);
- "vmap":  `vmap` over the paths of a chunk (batched matmuls with per-path weights);
- "shard": `shard_map` over the mesh axis "paths" (each device `lax.map`s its share; pool replicated or split
  over "model"); see sharded.py;
- "auto":  chosen at construction by timing the others (engine.py).

Chunks have a fixed size (the last is padded with empty paths, which run no block: embed and head only; a small
remainder runs as chunks of one path, `chunk_plan`), so batch sizes never recompile. Chunks run on host threads
(`start_chunks`; the prefix tree runs on the calling thread meanwhile).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

from hm3_jax import models
from hm3_jax.paths.recording import DECODE_METRICS
from hm3_jax.paths.sharded import (
    data_axis_size,
    gather_vocabulary,
    needs_whole_vocabulary,
    split_examples,
    uniform_steps,
)


def chunk_plan(n: int, chunk_size: int, single_path_chunks: bool) -> list[tuple[int, int]]:
    """[(start, size)] of plain evaluation's chunks for `n` rows: `chunk_size` rows each (the last padded with
    empty paths), except that a remainder of at most a quarter chunk runs as chunks of one path when
    `single_path_chunks`. Empty paths still pay embedding and head (per generated token when decoding): a lone
    path in a chunk of 8 cost about twice a chunk of one (single models: the parameter level, every held-out
    score). Each path's computation is the same in either shape (`lax.map` over paths; scores identical,
    tested), so the plan changes time only; strategy "shard" keeps whole chunks (a multiple of the mesh's
    "paths" axis)."""
    c = chunk_size
    plan = [(s, c) for s in range(0, n - n % c, c)]
    rest = n % c
    if rest and (not single_path_chunks or rest > max(1, c // 4)):
        plan.append((n - rest, c))
    elif rest:
        plan += [(s, 1) for s in range(n - rest, n)]
    return plan


def pad_chunk(paths, junction, start: int, c: int) -> list:
    """Host arguments of the chunk of rows `start : start + c`: paths int32 [c, T_max] (and junction rows float32
    {"scale", "shift"} [c, T_max, D]), padded with empty paths (all -1, identity junction rows): no block runs
    for them (apply_path's `lax.cond` and greedy_decode's loop over real steps skip padding), only embed +
    head."""
    n = paths.shape[0]
    rows = np.arange(start, min(start + c, n))
    pad = c - rows.size
    args = [np.concatenate([paths[rows], np.full((pad, paths.shape[1]), -1)]).astype(np.int32)]
    if junction is not None:
        args.append(
            {
                k: np.concatenate(
                    [v[rows], np.full((pad,) + v.shape[1:], 1.0 if k == "scale" else 0.0)]
                ).astype(np.float32)
                for k, v in junction.items()
            }
        )
    return args


def start_chunks(num_chunks: int, run_chunk: Callable, num_workers: int, warm_key: Callable, warmed: set):
    """Starts `run_chunk(i)` for every chunk i on `num_workers` worker threads; returns `finish()`, which works
    through the chunks still waiting on the calling thread, then waits for the workers (re-raising a worker's
    error on the calling thread).

    With workers, each chunk shape (`warm_key(i)`, remembered in `warmed`) is traced and compiled once on this
    thread before any worker starts. Why threads: XLA:CPU runs the programs one process dispatches
    asynchronously one after the other, and the engine's programs (a `lax.map` over paths, greedy decoding's
    per-token steps, the tree's node scan) are sequences of small ops that each keep about one core busy.
    Chunks on separate threads (and the tree on the caller's thread meanwhile) run concurrently: on this
    2-core CPU that is where most of the wall-clock gain of `num_threads=2` comes from (docs/path_eval.md).
    Every chunk computes the same values whichever thread runs it. Strategy "shard" keeps no worker: every
    process of a multi-process mesh must enter the chunks' collectives in the same order.
    """
    errors: list[BaseException] = []
    lock = threading.Lock()
    todo = list(range(num_chunks))

    def work():
        while True:
            with lock:
                if not todo or errors:
                    return
                i = todo.pop(0)
            try:
                run_chunk(i)
            except BaseException as err:  # noqa: BLE001 (re-raised on the calling thread)
                with lock:
                    errors.append(err)

    if num_workers:  # trace + compile each chunk shape once, on this thread, before any worker
        for i in list(todo):
            key = warm_key(i)
            if key not in warmed:
                todo.remove(i)
                run_chunk(i)
                warmed.add(key)
    threads = [threading.Thread(target=work, daemon=True) for _ in range(min(num_workers, len(todo)))]
    for t in threads:
        t.start()

    def finish():
        work()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    return finish


def make_forward(config, obj, shell, pool, path, junction, *, strategy: str, mesh):
    """The forward `obj.device_fn` calls for one path: greedy decoding along the path for `DECODE_METRICS`,
    `models.apply_path` otherwise (see recording.py for the signatures), its inputs split over "data" under
    strategy "shard" (and its logits' vocabulary gathered on a mesh that splits "paths", "data" and "model",
    where XLA's partitioner would abort: `sharded.needs_whole_vocabulary`)."""
    num_data = data_axis_size(mesh) if strategy == "shard" else 1
    split = functools.partial(split_examples, num_data=num_data)
    whole = (
        functools.partial(gather_vocabulary, num_data=num_data)
        if needs_whole_vocabulary(strategy, mesh)
        else lambda logits: logits
    )
    uniform = uniform_steps(strategy, mesh)
    if obj.metric in DECODE_METRICS:
        return lambda ids, mask, new: models.greedy_decode(
            config, shell, pool, path, split(ids), split(mask), int(new), junction=junction, uniform=uniform
        )
    if config.family == "vit":
        return lambda ids: whole(
            models.apply_path(config, shell, pool, path, split(ids), junction, uniform=uniform)
        )
    return lambda ids, positions=None: whole(
        models.apply_path(
            config,
            shell,
            pool,
            path,
            split(ids),
            junction,
            positions=None if positions is None else split(positions),
            uniform=uniform,
        )
    )


def lax_map_paths(one_path, shell, pool, paths, junction):
    """`one_path(shell, pool, path, junction_rows)` for every path, one after the other (`lax.map`)."""
    if junction is None:
        return jax.lax.map(lambda p: one_path(shell, pool, p, None), paths)
    return jax.lax.map(lambda pj: one_path(shell, pool, pj[0], pj[1]), (paths, junction))


def shard_body(one_path, with_junction, shell, pool, paths, junction=None):
    """The per-device body of strategy "shard": its share of the chunk's paths, one after the other."""
    return lax_map_paths(one_path, shell, pool, paths, junction if with_junction else None)


def make_plain_fn(
    config, objectives, strategy: str, mesh, with_junction: bool, traces: dict, key
) -> Callable:
    """The jitted program of one chunk: `fn(shell, pool, paths [c, T_max], junction=None)` -> per objective its
    device outputs stacked [c, ...], batched across paths with `strategy` ("map", "vmap" or "shard").
    Each trace adds one to `traces[key]` (a new trace = a recompilation). The closure holds no shell or pool:
    compiled programs outlive the engines (`with_model` copies) that made them."""

    def one_path(shell, pool, path, junction):
        return tuple(
            o.device_fn(make_forward(config, o, shell, pool, path, junction, strategy=strategy, mesh=mesh))
            for o in objectives
        )

    def traced(shell, pool, paths, junction=None):
        traces[key] = traces.get(key, 0) + 1
        js = junction if with_junction else None
        if strategy == "vmap":
            return jax.vmap(one_path, in_axes=(None, None, 0, 0 if with_junction else None))(
                shell, pool, paths, js
            )
        if strategy == "map":
            return lax_map_paths(one_path, shell, pool, paths, js)
        spec = PartitionSpec("paths")
        in_specs = (PartitionSpec(), PartitionSpec(), spec) + ((spec,) if with_junction else ())
        body = functools.partial(shard_body, one_path, with_junction)
        # manual over "paths" only: "data" (and "model") stay with XLA's partitioner (split_examples)
        mapped = jax.shard_map(
            body, mesh=mesh, in_specs=in_specs, out_specs=spec, axis_names={"paths"}, check_vma=False
        )
        return mapped(shell, pool, paths, *((js,) if with_junction else ()))

    return jax.jit(traced)


def stack_chunks(results: list[Any]):
    """The chunks' device outputs (pytrees of numpy [m_i, ...]) concatenated along the rows."""
    return jax.tree.map(lambda *xs: np.concatenate(xs), *results)
