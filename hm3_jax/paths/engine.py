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

Pipeline of `evaluate`:
1. canonicalise (padding to the end of each row, junction rows moved along) and validate;
2. cache: key = (model fingerprint or `pool_id`, real steps, junction rows); distinct rows that were scored
   before (in this or an earlier call, for this model) are not evaluated again, nor are duplicates in a batch;
3. teacher-forced objectives of the misses: prefix tree (`prefix_sharing=True`, see prefix_tree.py) or plain;
   decode objectives (chrF) of the misses: plain;
4. plain evaluation runs fixed-size chunks of paths with the batching strategy:
   - "map":   `lax.map` over the paths of a chunk (one path's matmuls over the whole data batch at a time);
   - "vmap":  `vmap` over the paths of a chunk (batched matmuls with per-path weights);
   - "shard": `shard_map` over the mesh axis "paths" (each device `lax.map`s its share; pool replicated); see
     "On a device mesh" below;
   - "auto":  at construction, time each available strategy on one chunk of random paths (after its
     compilation) and keep the fastest; the timings are in `engine.strategy_timings`. On this 2-core CPU
     "map" wins (vmapping paths with different weights was measured 1.4-3.3x slower).
   Chunks have a fixed size (the last is padded with empty paths, which run no block: embed and head only),
   so batch sizes never recompile. Chunks run on `num_threads` host threads (default 2; the tree of step 3
   runs on the calling thread meanwhile): XLA:CPU executes one thread's dispatched programs one after the
   other, and these programs of small ops keep about one core busy each (see `_start_plain`).
5. `host_fn` per path and task (chrF decodes strings and calls sacrebleu there), cost accounting.

On a device mesh (`make_engine(..., mesh=mesh)` with the ("paths", "data", "model") mesh of
`hm3_jax.distributed.make_mesh`, strategy "shard"; `make_problem(..., mesh=mesh)` does this for HM3 runs):
   - "paths": each chunk of candidate paths is split over the "paths" devices (`shard_map`, manual over
     "paths" only); a chunk is rounded up to a multiple of the axis size.
   - "data": the objectives' batches are fixed by the objectives (each `lax.map`s over its split's batches),
     so "data" splits the *examples inside every batch*: the forward closure constrains its inputs
     (`input_ids [B, S]`, or the decode prompt ids and mask [B, P]) to `PartitionSpec("data")`, and XLA's
     partitioner runs every block on B / data examples per device (the KV cache of greedy decoding follows).
     A batch whose B is not divisible by the axis stays replicated (logged once). Nothing is summed across
     devices by hand: per-example outputs (correct flags, tokens) are gathered by the partitioner.
   - "model": tensor parallelism. The shell and pool are placed with `distributed.model_sharding` (Megatron's
     split: q/k/v/gate/up kernels by output columns, o/down by input rows, the embedding and an untied head by
     vocabulary; norms and biases replicated) and XLA's partitioner (auto over "data" and "model" inside the
     `shard_map`) inserts the all-reduces, so each device holds 1/model of the pool's matrices.
   - the prefix tree is a sequential scan over nodes (nothing to split over "paths"), so on a mesh of more
     than one device teacher-forced objectives are evaluated path-parallel by the plain engine instead
     (`prefix_sharing` is turned off and logged); scores are the same (the tree is exact), FLOP and
     block-step counts are the plain ones.
   - multi-process (`jax.distributed`): every process calls `evaluate` with the same paths (the
     multi-controller contract of `hm3_jax.distributed`); chunks, shell and pool are placed as global arrays
     and the scores come back to every process (`distributed.to_host`), so caches and decisions agree.
   Scores equal the 1-device ones: the per-path computation is the same, only where it runs differs
   (checked by tests/test_hm3_distributed.py, which runs a whole HM3 smoke run on 8 devices and 2 processes).

Objectives follow DESIGN.md: `name`, `metric` (e.g. "exact_match", "multiple_choice", or one of
`DECODE_METRICS`: "chrf", "generated_exact_match"), `device_fn(forward)` and `host_fn`.
For a teacher-forced objective `forward(input_ids [B, S], positions=None) -> logits [B, S, V]`, or
`[B, P, V]` at `positions` [B, P] when the objective asks (exact match reads only its target positions, so the
LM head runs there only; the recorded P is what the head FLOPs count); for `DECODE_METRICS` `forward` is the
decode closure `forward(prompt_ids [B, P], prompt_mask [B, P], max_new_tokens) -> tokens [B, max_new_tokens]`
(greedy decoding with a KV cache along the path). At construction every `device_fn` is called once eagerly
with a recording forward, to learn its input batches (for the prefix tree and the FLOP count); a `device_fn`
must therefore call `forward` with the same concrete inputs every time (true of objectives over a fixed
split).
"""

from __future__ import annotations

import copy
import functools
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from hm3_jax import distributed, models
from hm3_jax.models.config import ModelConfig
from hm3_jax.models.path import gather_positions
from hm3_jax.paths import flops as flops_lib
from hm3_jax.paths import prefix_tree as tree_lib
from hm3_jax.paths.cache import Cost, EvalResult, canonicalize, path_keys, tree_fingerprint

STRATEGIES = ("auto", "map", "vmap", "shard")
# metrics whose objectives get the decode forward (greedy generation); every other metric is teacher-forced
DECODE_METRICS = ("chrf", "generated_exact_match")


def _greedy_decode_fn():
    fn = getattr(models, "greedy_decode", None)
    if fn is None:
        from hm3_jax.models import decode as decode_module  # noqa: PLC0415 (landed after paths/)

        fn = decode_module.greedy_decode
    return fn


class _Recorder:
    """A forward that records its (concrete) inputs and returns zeros of the right shape."""

    def __init__(self, config: ModelConfig, decode: bool, name: str):
        self.config, self.decode, self.name, self.calls = config, decode, name, []
        self.head_positions = []  # per teacher-forced call: positions per row whose logits are computed

    def __call__(self, *args, positions=None):
        try:
            arrays = [np.asarray(a) for a in args]
            positions = None if positions is None else np.asarray(positions)
        except (TypeError, jax.errors.TracerArrayConversionError) as err:
            raise ValueError(
                f"objective {self.name!r}: device_fn must call forward with concrete arrays (its split); "
                "got a traced value"
            ) from err
        if self.decode:
            if len(arrays) != 3:
                raise ValueError(
                    f"objective {self.name!r}: the decode forward takes (prompt_ids, prompt_mask, "
                    f"max_new_tokens), got {len(arrays)} arguments"
                )
            ids, mask, new = arrays
            self.calls.append((ids, mask, int(new)))
            return jnp.zeros((ids.shape[0], int(new)), jnp.int32)
        if self.config.family == "vit":  # pixel_values [B, C, H, W] -> hidden states or class logits
            if len(arrays) != 1 or arrays[0].ndim != 4:
                raise ValueError(
                    f"objective {self.name!r}: a ViT forward takes one pixel_values [B, C, H, W]"
                )
            self.calls.append(arrays[0])
            b, c = arrays[0].shape[0], self.config
            shape = (b, c.num_labels) if c.num_labels else (b, c.num_patches + 1, c.hidden_size)
            return jnp.zeros(shape, jnp.float32)
        if len(arrays) != 1 or arrays[0].ndim != 2:
            raise ValueError(f"objective {self.name!r}: forward takes one input_ids [B, S] array")
        if positions is not None and (positions.ndim != 2 or positions.shape[0] != arrays[0].shape[0]):
            raise ValueError(
                f"objective {self.name!r}: positions must be [B, P] for input_ids {arrays[0].shape}, got "
                f"{positions.shape}"
            )
        self.calls.append(arrays[0])
        self.head_positions.append(arrays[0].shape[1] if positions is None else positions.shape[1])
        out_len = arrays[0].shape[1] if positions is None else positions.shape[1]
        return jnp.zeros((arrays[0].shape[0], out_len, self.config.vocab_size), jnp.float32)


class PathEngine:
    """Scores batches of layer paths; build with `make_engine` (see the module docstring)."""

    def __init__(self, *, config, shell, pool, objectives, strategy, chunk_size, node_chunk_size,
                 prefix_sharing, model_id, shared, mesh, num_threads=2):  # fmt: skip
        self.config = config
        self.shell = shell
        self.pool = pool
        self.objectives = tuple(objectives)
        self.strategy = strategy
        self.chunk_size = chunk_size
        self.node_chunk_size = node_chunk_size
        self.prefix_sharing = prefix_sharing
        self.model_id = model_id
        self.mesh = mesh
        self.num_threads = num_threads
        self._shared = shared  # compiled functions, recorded calls, cache: shared by with_model copies
        self.total_cost = Cost()

    # ---------------------------------------------------------------- public API
    @property
    def num_tasks(self) -> int:
        return len(self.objectives)

    @property
    def pool_size(self) -> int:
        return models.pool_size(self.pool)

    @property
    def cache(self) -> dict:
        """{cache key: scores [num_tasks]} of every model scored here and by `with_model` copies."""
        return self._shared["cache"]

    def keep_example_stats(self) -> PathEngine:
        """From now on keep, per scored row, every objective's per-example statistics (`Objective.example_fn`
        of the row's device output: 0/1 correctness, chrF sentence statistics) next to its scores, for this
        engine and its `with_model` copies; `example_stats` reads them (a paired bootstrap then resamples
        them instead of re-running the model). Returns self."""
        if self._shared.get("examples") is None:
            self._shared["examples"] = {}
        return self

    def use_single_path_chunks(self, enabled: bool) -> PathEngine:
        """Whether a small remainder of a batch runs as chunks of one path (`_chunk_plan`; default on), for this
        engine and its `with_model` copies. Scores are the same either way; off saves compiling a second,
        one-path version of every plain program (what short runs on tiny models, e.g. the smoke configs, spend
        more on than the padding costs). Returns self."""
        self._shared["single_path_chunks"] = bool(enabled)
        return self

    def example_stats(self, paths, junction: dict | None = None) -> list[list]:
        """Per row of `paths` (as `evaluate` takes them), per objective its per-example statistics.

        Rows scored since `keep_example_stats` are read back; the others are evaluated now (their scores
        overwrite the cache's with the same values). Raises ValueError for an objective without `example_fn`.
        """
        missing = [o.name for o in self.objectives if getattr(o, "example_fn", None) is None]
        if missing:
            raise ValueError(f"objective(s) {missing} have no example_fn: no per-example statistics")
        self.keep_example_stats()
        store = self._shared["examples"]
        paths_c, junction_c, lengths = canonicalize(paths, junction, self.pool_size)
        keys = path_keys(self.model_id, paths_c, lengths, junction_c)
        todo = sorted({i for i, k in enumerate(keys) if k not in store})
        if todo:
            idx = np.asarray(todo)
            self.evaluate(paths_c[idx], None if junction_c is None else {n: a[idx] for n, a in junction_c.items()},
                          use_cache=False)  # fmt: skip
        return [store[k] for k in keys]

    @property
    def num_traces(self) -> dict:
        """How many times each compiled function was traced (a new trace = a recompilation)."""
        return dict(self._shared["traces"])

    @property
    def strategy_timings(self) -> dict:
        """Seconds per chunk measured by strategy="auto" at construction (empty otherwise)."""
        return dict(self._shared["strategy_timings"])

    def with_model(self, shell: dict, pool: dict, pool_id: str | None = None) -> PathEngine:
        """The same engine (compiled code, cache, objectives) for another shell and pool: the same shapes, except
        that the pool may hold another number of blocks (its programs are then compiled once more for that
        length; one model's own L blocks is what `search.problem.score_params` scores, no pool copy)."""
        _check_same_shapes(self.shell, shell, "shell")
        _check_same_shapes(self.pool, pool, "pool", leading=False)
        return PathEngine(
            config=self.config, shell=shell, pool=pool, objectives=self.objectives, strategy=self.strategy,
            chunk_size=self.chunk_size, node_chunk_size=self.node_chunk_size,
            prefix_sharing=self.prefix_sharing, model_id=pool_id or tree_fingerprint(shell, pool),
            shared=self._shared, mesh=self.mesh, num_threads=self.num_threads,
        )  # fmt: skip

    def evaluate(self, paths, junction: dict | None = None, *, use_cache: bool = True) -> EvalResult:
        """Raw task scores of a batch of paths.

        Args:
          paths: int [N, T_max] pool indices, -1 = padding (anywhere; padding steps are no-ops).
          junction: None (plain stacking) or {"scale", "shift"} [N, T_max, D]: before step t of path i,
            `h = h * scale[i, t] + shift[i, t]` (alignment.py builds these).
          use_cache: read the cache (results are always written to it).
        Returns: EvalResult(scores float64 [N, num_tasks] in [0, 100] (or [N, num_groups], the group means, for
          an engine made with `groups`), cost of this call).
        """
        start = time.perf_counter()
        paths_c, junction_c, lengths = canonicalize(paths, junction, self.pool_size)
        if junction_c is not None and junction_c["scale"].shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"junction rows have size {junction_c['scale'].shape[-1]}, expected hidden_size "
                f"{self.config.hidden_size}"
            )
        keys = path_keys(self.model_id, paths_c, lengths, junction_c)
        cache = self.cache
        first_row: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            first_row.setdefault(k, i)
        hits = [k for k in first_row if use_cache and k in cache]
        todo = [i for k, i in first_row.items() if not (use_cache and k in cache)]
        cost = Cost(num_paths=len(keys), num_unique=len(first_row), num_cache_hits=len(hits))
        if todo:
            idx = np.asarray(todo)
            sub_j = None if junction_c is None else {n: a[idx] for n, a in junction_c.items()}
            scores, eval_cost, stats = self._evaluate_rows(paths_c[idx], lengths[idx], sub_j)
            for row, i in enumerate(todo):
                cache[keys[i]] = scores[row]
                if stats is not None:
                    self._shared["examples"][keys[i]] = stats[row]
            cost = cost._replace(**eval_cost)
        out = np.stack([cache[k] for k in keys]) if keys else np.zeros((0, self.num_tasks))
        if self._shared["group_matrix"] is not None:
            out = out @ self._shared["group_matrix"]  # [N, num_tasks] -> [N, num_groups]: group means
        cost = cost._replace(seconds=time.perf_counter() - start)
        self.total_cost = self.total_cost + cost
        return EvalResult(scores=out, cost=cost)

    # ---------------------------------------------------------------- evaluation of distinct rows
    def _evaluate_rows(self, paths, lengths, junction):
        sh = self._shared
        n = paths.shape[0]
        raw: list[Any] = [None] * self.num_tasks
        block_steps_plain = int(lengths.sum())
        flops_plain = sum(self.path_flops(int(t)) for t in lengths)
        tf_idx = [k for k, o in enumerate(self.objectives) if o.metric not in DECODE_METRICS]
        dec_idx = [k for k, o in enumerate(self.objectives) if o.metric in DECODE_METRICS]
        flops = 0.0
        block_steps = 0
        plain_idx = dec_idx + ([] if self.prefix_sharing else tf_idx)
        plain_job = self._start_plain(tuple(sorted(plain_idx)), paths, junction) if plain_idx else None
        if self.prefix_sharing and tf_idx:
            outs, steps = self._run_tree(paths, lengths, junction)
            for k, o in zip(tf_idx, outs, strict=True):
                raw[k] = o
            tree_tokens_flops = steps["block_steps"] * sh["tf_block_flops"] + n * sh["tf_head_flops"]
            flops += tree_tokens_flops
            block_steps += steps["block_steps"]
        elif tf_idx:
            flops += sum(sh["tf_block_flops"] * int(t) + sh["tf_head_flops"] for t in lengths)
            block_steps += int(lengths.sum())
        if plain_idx:
            outs = plain_job()  # the main thread helps with the chunks left, then waits
            for k, o in zip(sorted(plain_idx), outs, strict=True):
                raw[k] = o
            flops += sum(sum(f(int(t)) for f in sh["dec_flops_fns"]) for t in lengths) if dec_idx else 0.0
            if dec_idx and not tf_idx:
                block_steps += int(lengths.sum())
        scores = np.zeros((n, self.num_tasks))
        keep = self._shared.get("examples") is not None
        stats = [[None] * self.num_tasks for _ in range(n)] if keep else None
        for k, obj in enumerate(self.objectives):
            for i in range(n):
                row = jax.tree.map(lambda a, i=i: np.asarray(a[i]), raw[k])
                if keep and getattr(obj, "example_fn", None) is not None:
                    stats[i][k] = obj.example_fn(row)
                value = float(obj.host_fn(row))
                if not np.isfinite(value) or value < -1e-6 or value > 100 + 1e-6:
                    raise ValueError(
                        f"objective {obj.name!r} returned score {value}, expected within [0, 100]"
                    )
                scores[i, k] = value
        return scores, dict(
            num_evaluations=n, block_steps=block_steps, block_steps_plain=block_steps_plain,
            flops=float(flops), flops_plain=float(flops_plain),
        ), stats  # fmt: skip

    def path_flops(self, length: int) -> float:
        """Analytic forward FLOPs of one path of `length` real blocks on every objective, evaluated alone (no
        prefix sharing; the LM head where the objectives read it, e.g. exact match's target positions)."""
        sh = self._shared
        tf = sh["tf_block_flops"] * length + sh["tf_head_flops"]
        return float(tf + sum(f(length) for f in sh["dec_flops_fns"]))

    def _run_plain(self, obj_idx: tuple, paths, junction):
        """Device outputs of objectives `obj_idx` for every row, in fixed-size chunks (stacked [N, ...])."""
        return self._start_plain(obj_idx, paths, junction)()

    def _start_plain(self, obj_idx: tuple, paths, junction):
        """Starts `_run_plain`'s chunks on `num_threads - 1` worker threads; returns `finish()`, which works
        through the chunks still waiting on the calling thread, then returns the stacked outputs.

        Why threads: XLA:CPU runs the programs one process dispatches asynchronously one after the other, and
        the engine's programs (a `lax.map` over paths, greedy decoding's per-token steps, the tree's node
        scan) are sequences of small ops that each keep about one core busy. Chunks on separate threads (and
        the tree on the caller's thread meanwhile) run concurrently: on this 2-core CPU that is where most of
        the wall-clock gain of `num_threads=2` comes from (docs/path_eval.md). Every chunk computes the same
        values whichever thread runs it. Strategy "shard" keeps one thread: every process of a multi-process
        mesh must enter the chunks' collectives in the same order.
        """
        chunks = self._chunk_plan(paths.shape[0])  # [(start, size)]
        results: list[Any] = [None] * len(chunks)
        errors: list[BaseException] = []
        lock = threading.Lock()
        todo = list(range(len(chunks)))

        def run_chunk(i):
            m, out = self._plain_chunk(obj_idx, paths, junction, *chunks[i])
            results[i] = jax.tree.map(lambda a, m=m: distributed.to_host(a)[:m], out)

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

        workers = self.num_threads - 1 if self.strategy != "shard" else 0
        warmed = self._shared.setdefault("warmed", set())
        if workers:  # trace + compile each chunk shape once, on this thread, before any worker
            for i in list(todo):
                key = (obj_idx, junction is not None, chunks[i][1])
                if key not in warmed:
                    todo.remove(i)
                    run_chunk(i)
                    warmed.add(key)
        threads = [threading.Thread(target=work, daemon=True) for _ in range(min(workers, len(todo)))]
        for t in threads:
            t.start()

        def finish():
            work()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
            return jax.tree.map(lambda *xs: np.concatenate(xs), *results)

        return finish

    def _chunk_plan(self, n: int) -> list[tuple[int, int]]:
        """[(start, size)] of plain evaluation's chunks for `n` rows: `chunk_size` rows each (the last padded with
        empty paths), except that a remainder of at most a quarter chunk runs as chunks of one path. Empty
        paths still pay embedding and head (per generated token when decoding): a lone path in a chunk of 8
        cost about twice a chunk of one (single models: the parameter level, every held-out score). Each path's
        computation is the same in either shape (`lax.map` over paths; scores identical, tested), so the plan
        changes time only; strategy "shard" keeps whole chunks (a multiple of the mesh's "paths" axis)."""
        c = self.chunk_size
        plan = [(s, c) for s in range(0, n - n % c, c)]
        rest = n % c
        singles = self._shared.get("single_path_chunks", True) and self.strategy != "shard"
        if rest and (not singles or rest > max(1, c // 4)):
            plan.append((n - rest, c))
        elif rest:
            plan += [(s, 1) for s in range(n - rest, n)]
        return plan

    def _plain_chunk(self, obj_idx: tuple, paths, junction, start: int, c: int):
        """(real rows m, device outputs) of the chunk of rows `start : start + c` (padded to `c` rows)."""
        fn = self._plain_fn(obj_idx, junction is not None)
        n = paths.shape[0]
        rows = np.arange(start, min(start + c, n))
        pad = c - rows.size
        # pad with empty paths (all -1, identity junction rows): no block runs for them (apply_path's
        # `lax.cond` and greedy_decode's loop over real steps skip padding), only embed + head
        args = [np.concatenate([paths[rows], np.full((pad, paths.shape[1]), -1)]).astype(np.int32)]
        if junction is not None:
            args.append({
                k: np.concatenate([v[rows], np.full((pad,) + v.shape[1:], 1.0 if k == "scale" else 0.0)])
                .astype(np.float32) for k, v in junction.items()
            })  # fmt: skip
        shell, pool = self.shell, self.pool
        if self.strategy == "shard":  # paths split over "paths", the model's matrices over "model"
            split = NamedSharding(self.mesh, PartitionSpec("paths"))
            args = jax.tree.map(lambda a, s=split: distributed.place(a, s), args)  # global on multi-host
            shell, pool = self._placed()
            if jax.process_count() > 1:
                self._compile_then_align(fn, (obj_idx, junction is not None), shell, pool, args)
        else:
            args = jax.tree.map(jnp.asarray, args)
        # to_host (by the caller): the global result on every process (an all-gather on a multi-process mesh)
        return min(c, n - start), fn(shell, pool, *args)

    def _compile_then_align(self, fn, key, shell, pool, args) -> None:
        """Multi-process: compile `fn` for these inputs first (once per shape; the call then reuses it), then
        wait for every process, so none enters the program's collectives while another still compiles it
        (gloo allows 30 s; process 1 compiles what process 0 loads from the persistent cache)."""
        seen = self._shared.setdefault("aot_compiled", set())
        sig = (key, tuple((tuple(a.shape), str(a.dtype)) for a in jax.tree.leaves((shell, pool, args))))
        if sig not in seen:
            fn.lower(shell, pool, *args).compile()
            seen.add(sig)
        distributed.align_processes("engine")

    def _placed(self):
        if getattr(self, "_placed_model", None) is None:
            self._placed_model = place_model(self.shell, self.pool, self.mesh)
        return self._placed_model

    # ---------------------------------------------------------------- memory plans (compile only)
    def model_shardings(self):
        """(shell, pool) pytrees of the shardings strategy "shard" places them with: tensor parallel over the
        mesh's "model" axis (`distributed.model_sharding`: the pool's matrices split Megatron-style, column
        parallel q/k/v/gate/up, row parallel o/down; the embedding over the vocabulary), replicated over "paths"
        and "data" (every leaf replicated when "model" has size 1); None for the other strategies (the default
        device)."""
        if self.strategy != "shard":
            return None
        return distributed.model_sharding(self.shell, self.pool, self.mesh)

    def lower_plain(self, t_max: int, with_junction: bool = False) -> jax.stages.Lowered:
        """The program of one chunk of plain evaluation (every objective; `chunk_size` paths of `t_max` steps),
        lowered with abstract inputs placed as `evaluate` places them (`jax.ShapeDtypeStruct`; the engine's
        shell and pool may themselves be abstract). Nothing runs: `.compile().memory_analysis()` gives its
        per-device bytes (hm3_jax/pipeline/memory_plan.py)."""
        split = NamedSharding(self.mesh, PartitionSpec("paths")) if self.strategy == "shard" else None
        shardings = self.model_shardings()
        model = jax.tree.map(_abstract, (self.shell, self.pool), *([] if shardings is None else [shardings]))
        args = [jax.ShapeDtypeStruct((self.chunk_size, t_max), jnp.int32, sharding=split)]
        if with_junction:
            row = jax.ShapeDtypeStruct(
                (self.chunk_size, t_max, self.config.hidden_size), jnp.float32, sharding=split
            )
            args.append({"scale": row, "shift": row})
        return self._plain_fn(tuple(range(self.num_tasks)), with_junction).lower(*model, *args)

    def lower_tree(self, t_max: int) -> jax.stages.Lowered | None:
        """The prefix tree's program for one chunk of nodes (`_run_tree`: hidden-state buffers of every
        teacher-forced batch at every depth), lowered with abstract inputs; None when this engine runs no tree."""
        if not self.prefix_sharing or all(o.metric in DECODE_METRICS for o in self.objectives):
            return None
        tree = tree_lib.build_prefix_tree(np.zeros((1, t_max), np.int32), np.full(1, t_max), None)
        nodes = next(tree_lib.chunk_nodes(tree, self.node_chunk_size, self.config.hidden_size))
        h0s, ctxs = jax.eval_shape(self._shared["embed_fn"], jax.tree.map(_abstract, self.shell))
        buffers = tuple(jax.ShapeDtypeStruct((t_max + 1,) + h.shape, h.dtype) for h in h0s)
        shell, pool = jax.tree.map(_abstract, (self.shell, self.pool))
        nodes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nodes)
        return self._tree_fn(False).lower(shell, pool, buffers, ctxs, nodes)

    def _run_tree(self, paths, lengths, junction):
        """Teacher-forced device outputs of every row via the prefix tree."""
        sh = self._shared
        tree = tree_lib.build_prefix_tree(paths, lengths, junction)
        fn = self._tree_fn(tree.scale is not None)
        t_max = paths.shape[1]
        h0s, ctxs = sh["embed_fn"](self.shell)
        buffers = tuple(jnp.zeros((t_max + 1,) + h.shape, h.dtype).at[0].set(h) for h in h0s)
        num = tree.num_nodes
        d = self.config.hidden_size
        chunks_out = []
        for nodes in tree_lib.chunk_nodes(tree, self.node_chunk_size, d):
            buffers, outs = fn(self.shell, self.pool, buffers, ctxs, jax.tree.map(jnp.asarray, nodes))
            chunks_out.append(outs)
        stacked = jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs])[:num], *chunks_out)
        rows = np.full(paths.shape[0], -1)
        term = np.nonzero(tree.terminal >= 0)[0]
        rows[tree.terminal[term]] = term
        per_obj = [jax.tree.map(lambda a: a[rows], o) for o in stacked]
        return per_obj, {"block_steps": tree.num_block_steps}

    # ---------------------------------------------------------------- compiled functions
    def _count_trace(self, name):
        traces = self._shared["traces"]
        traces[name] = traces.get(name, 0) + 1

    def _without_model(self) -> PathEngine:
        """This engine without its shell and pool, for the closures of compiled functions: they live in the
        shared `compiled` dict as long as every `with_model` copy, and capturing `self` kept the first copy's
        shell and pool (a whole pool of K + 1 models per compiled function) alive with them (found measuring
        Qwen2.5-0.5B's shapes: two extra pools per split, 21 GiB)."""
        twin = copy.copy(self)
        twin.shell = twin.pool = None
        twin._placed_model = None
        return twin

    def _uniform_steps(self) -> bool:
        """Model-parallel mesh: no data-dependent branches over padding steps (`models.run_path`'s `uniform`).
        The devices of two path groups run different paths; around a `lax.cond` holding the partitioner's
        "model" collectives they would branch differently, and XLA:CPU's collectives wait for every device of
        the program (a deadlock, then an abort). Padding steps then cost a block each."""
        return self.strategy == "shard" and dict(self.mesh.shape).get("model", 1) > 1

    def _forward_for(self, obj, shell, pool, path, junction):
        config = self.config
        split = self._split_examples
        uniform = self._uniform_steps()
        if obj.metric in DECODE_METRICS:
            decode = _greedy_decode_fn()
            return lambda ids, mask, new: decode(
                config,
                shell,
                pool,
                path,
                split(ids),
                split(mask),
                int(new),
                junction=junction,
                uniform=uniform,
            )
        if self.config.family == "vit":
            return lambda ids: models.apply_path(
                config, shell, pool, path, split(ids), junction, uniform=uniform
            )
        return lambda ids, positions=None: models.apply_path(
            config, shell, pool, path, split(ids), junction,
            positions=None if positions is None else split(positions), uniform=uniform,
        )  # fmt: skip

    def _split_examples(self, x):
        """Inside "shard": the examples (axis 0) of an objective's batch split over the mesh axis "data"."""
        num_data = _data_axis_size(self.mesh) if self.strategy == "shard" else 1
        if num_data == 1:
            return x
        if x.shape[0] % num_data:
            logging.log_first_n(
                logging.WARNING, "batch of %d examples is not divisible by data=%d: replicated", 1,
                x.shape[0], num_data,
            )  # fmt: skip
            return x
        return jax.lax.with_sharding_constraint(x, PartitionSpec("data"))

    def _plain_fn(self, obj_idx: tuple, with_junction: bool):
        key = ("plain", self.strategy, obj_idx, with_junction)
        sh = self._shared
        if key in sh["compiled"]:
            return sh["compiled"][key]
        objectives = [self.objectives[k] for k in obj_idx]
        eng = self._without_model()  # the compiled closure must not keep this engine's shell and pool alive

        def one_path(shell, pool, path, junction):
            return tuple(o.device_fn(eng._forward_for(o, shell, pool, path, junction)) for o in objectives)

        def traced(shell, pool, paths, junction=None):
            eng._count_trace(key)
            js = junction if with_junction else None
            if eng.strategy == "vmap":
                return jax.vmap(one_path, in_axes=(None, None, 0, 0 if with_junction else None))(
                    shell, pool, paths, js
                )
            if eng.strategy == "map":
                return _lax_map_paths(one_path, shell, pool, paths, js)
            spec = PartitionSpec("paths")
            in_specs = (PartitionSpec(), PartitionSpec(), spec) + ((spec,) if with_junction else ())
            body = functools.partial(_shard_body, one_path, with_junction)
            # manual over "paths" only: "data" (and "model") stay with XLA's partitioner (_split_examples)
            mapped = jax.shard_map(
                body, mesh=eng.mesh, in_specs=in_specs, out_specs=spec, axis_names={"paths"},
                check_vma=False,
            )  # fmt: skip
            return mapped(shell, pool, paths, *((js,) if with_junction else ()))

        fn = jax.jit(traced)
        sh["compiled"][key] = fn
        return fn

    def _tree_fn(self, with_junction: bool):
        """The compiled scan over a chunk of tree nodes; without junction rows the nodes apply no affine map
        (as `run_path` without a junction: the same arithmetic as plain evaluation)."""
        key = ("tree", with_junction)
        sh = self._shared
        if key in sh["compiled"]:
            return sh["compiled"][key]
        config = self.config
        tf_objs = [o for o in self.objectives if o.metric not in DECODE_METRICS]
        groups = sh["tf_groups"]  # {(B, S): int32 [n, B, S]} distinct input batches by shape

        def leaf_fn(shell, hs):
            # hs[g]: [n_g, B, S, D] hidden states of every batch of group g at this path's end
            by_shape = dict(zip(groups, hs, strict=True))

            def forward(ids, positions=None):
                shape = tuple(ids.shape)
                if shape not in by_shape:
                    raise ValueError(f"forward called with input shape {shape} never seen when recording")
                h_all, known = by_shape[shape], groups[shape]
                if known.shape[0] == 1:
                    h = h_all[0]
                else:  # which recorded batch is this? (objectives lax.map over their batches)
                    same = jnp.all(jnp.asarray(known) == ids[None], axis=tuple(range(1, known.ndim)))
                    h = h_all[jnp.argmax(same)]
                if positions is not None:
                    h = gather_positions(config, h, positions)
                return models.head(config, shell, h)

            if config.family == "vit":  # no per-token head: the forward takes no positions
                return tuple(o.device_fn(lambda ids: forward(ids)) for o in tf_objs)
            return tuple(o.device_fn(forward) for o in tf_objs)

        def block_fn(p, h, ctx):  # h [n, B, S, D]: one batch at a time, the shapes plain evaluation runs
            return jax.lax.map(lambda x: models.block(config, p, x, ctx), h)

        chunk_fn = tree_lib.make_tree_chunk_fn(block_fn, leaf_fn, with_junction=with_junction)

        count_trace = self._without_model()._count_trace  # not `self`: it would keep the shell and pool alive

        def traced(shell, pool, buffers, ctxs, nodes):
            count_trace(key)
            return chunk_fn(shell, pool, buffers, ctxs, nodes)

        fn = jax.jit(traced, donate_argnums=(2,))
        sh["compiled"][key] = fn
        return fn


def place_model(shell: dict, pool: dict, mesh) -> tuple[dict, dict]:
    """(shell, pool) placed as strategy "shard" reads them on `mesh` (`distributed.model_sharding`: tensor
    parallel over "model", replicated over "paths" and "data").

    Engines built over arrays placed here share them: placing an array that already has its sharding returns
    it (no copy). So a Problem places its pool once for the engines of all its splits (each engine placed a
    copy of its own before, a pool per split on every device) and drops the unplaced one from device 0."""
    return jax.tree.map(distributed.place, (shell, pool), distributed.model_sharding(shell, pool, mesh))


def _abstract(x, sharding=None) -> jax.ShapeDtypeStruct:
    """The shape, dtype (and placement) of an array or of a ShapeDtypeStruct, as a ShapeDtypeStruct."""
    return jax.ShapeDtypeStruct(jnp.shape(x), x.dtype, sharding=sharding)


def _lax_map_paths(one_path, shell, pool, paths, junction):
    if junction is None:
        return jax.lax.map(lambda p: one_path(shell, pool, p, None), paths)
    return jax.lax.map(lambda pj: one_path(shell, pool, pj[0], pj[1]), (paths, junction))


def _shard_body(one_path, with_junction, shell, pool, paths, junction=None):
    return _lax_map_paths(one_path, shell, pool, paths, junction if with_junction else None)


def _data_axis_size(mesh) -> int:
    return int(dict(mesh.shape).get("data", 1)) if mesh is not None else 1


def _check_same_shapes(a, b, name, leading: bool = True):
    """Same structure, shapes and dtypes (`leading=False`: the leading axis, a pool's block count, may differ)."""
    cut = 0 if leading else 1
    sa = jax.tree.map(lambda x: (tuple(x.shape)[cut:], str(x.dtype)), a)
    sb = jax.tree.map(lambda x: (tuple(x.shape)[cut:], str(x.dtype)), b)
    if jax.tree.structure(a) != jax.tree.structure(b) or sa != sb:
        what = "shapes" if leading else "per-block shapes"
        raise ValueError(f"with_model: the new {name} must have the same structure, {what} and dtypes")


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
      pool: stacked blocks [P, ...] (`models.make_pool`), pool index m * L + l.
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
                "prefix tree (same scores)", dict(mesh.shape),
            )  # fmt: skip
            prefix_sharing = False
    shared = _record_objectives(config, objectives)
    shared["group_matrix"] = group_matrix(groups, len(objectives))
    engine = PathEngine(
        config=config, shell=shell, pool=pool, objectives=objectives, strategy=strategy,
        chunk_size=chunk_size, node_chunk_size=node_chunk_size, prefix_sharing=prefix_sharing,
        model_id=pool_id or tree_fingerprint(shell, pool), shared=shared, mesh=mesh, num_threads=num_threads,
    )  # fmt: skip
    if strategy == "auto":
        engine.strategy = _pick_strategy(engine, auto_key, t_max or config.num_layers)
    return engine


def group_matrix(groups: Sequence[int] | None, num_objectives: int) -> np.ndarray | None:
    """[num_objectives, G] averaging matrix: column g holds 1 / |{k: groups[k] = g}| at the objectives of group
    g (None when `groups` is None). Every group 0..G-1 must have an objective."""
    if groups is None:
        return None
    groups = np.asarray(groups, np.int64)
    if groups.shape != (num_objectives,) or groups.min(initial=0) < 0:
        raise ValueError(f"groups must give a group index >= 0 for each of the {num_objectives} objectives")
    num_groups = int(groups.max()) + 1
    counts = np.bincount(groups, minlength=num_groups)
    if np.any(counts == 0):
        raise ValueError(
            f"groups {groups.tolist()} leave group(s) {np.nonzero(counts == 0)[0].tolist()} empty"
        )
    m = np.zeros((num_objectives, num_groups))
    m[np.arange(num_objectives), groups] = 1.0 / counts[groups]
    return m


def _record_objectives(config: ModelConfig, objectives) -> dict:
    """Runs every device_fn once eagerly (jit disabled, so `lax.map` over batches is a Python loop) with a
    recording forward: its distinct input batches grouped by shape, and per-path FLOP counts."""
    groups: dict[tuple, list[np.ndarray]] = {}
    dec_flops_fns = []
    tf_block = tf_head = 0.0
    for o in objectives:
        decode = o.metric in DECODE_METRICS
        rec = _Recorder(config, decode, o.name)
        with jax.disable_jit():
            o.device_fn(rec)
        if not rec.calls:
            raise ValueError(f"objective {o.name!r}: device_fn never called forward")
        if decode:
            for ids, _, new in rec.calls:
                dec_flops_fns.append(
                    functools.partial(flops_lib.decode_flops, config, ids.shape[0], ids.shape[1], new)
                )
            continue
        for ids, head_positions in zip(rec.calls, rec.head_positions or [None] * len(rec.calls), strict=True):
            # token ids [B, S], or ViT pixel_values [B, C, H, W] (N + 1 tokens, head on CLS only); an LM head
            # runs on every position, or on the `positions` the objective asked for (P per row)
            b, s = (ids.shape[0], config.num_patches + 1) if config.family == "vit" else ids.shape
            tf_block += b * s * flops_lib.block_flops_per_token(config, s)
            tf_head += (
                b * (1 if config.family == "vit" else head_positions) * flops_lib.head_flops_per_token(config)
            )
            known = groups.setdefault(tuple(ids.shape), [])
            if not any(np.array_equal(ids, k) for k in known):
                known.append(ids if config.family == "vit" else ids.astype(np.int32))
    tf_groups = {shape: np.stack(batches) for shape, batches in groups.items()}

    @jax.jit
    def embed_fn(shell):
        hs, ctxs = [], []
        for stacked in tf_groups.values():
            n, b = stacked.shape[:2]
            h, ctx = models.embed(config, shell, jnp.asarray(stacked.reshape((n * b,) + stacked.shape[2:])))
            hs.append(h.reshape((n, b) + h.shape[1:]))
            # without an attention mask the block context depends only on (B, S): take the first batch's
            ctxs.append(
                jax.tree.map(lambda x, b=b, nb=n * b: x[:b] if x.ndim and x.shape[0] == nb else x, ctx)
            )
        return tuple(hs), tuple(ctxs)

    return {
        "cache": {},
        "compiled": {},
        "traces": {},
        "strategy_timings": {},
        "tf_groups": tf_groups,
        "tf_block_flops": float(tf_block),
        "tf_head_flops": float(tf_head),
        "dec_flops_fns": dec_flops_fns,
        "embed_fn": embed_fn,
    }


def _pick_strategy(engine: PathEngine, key, t_max: int) -> str:
    """Times one chunk of random paths per available strategy (compilation excluded); returns the fastest."""
    key = jax.random.PRNGKey(0) if key is None else key
    paths = np.asarray(jax.random.randint(key, (engine.chunk_size, t_max), 0, engine.pool_size), np.int32)
    candidates = ["map", "vmap"] + (["shard"] if engine.mesh is not None and engine.mesh.size > 1 else [])
    all_idx = tuple(range(engine.num_tasks))
    timings = {}
    for name in candidates:
        engine.strategy = name
        engine._run_plain(all_idx, paths, None)  # compile + warm up
        start = time.perf_counter()
        engine._run_plain(all_idx, paths, None)
        timings[name] = time.perf_counter() - start
    best = min(timings, key=timings.get)
    engine._shared["strategy_timings"].update(timings)
    logging.info("path engine strategy=auto timings %s -> %s", timings, best)
    return best
