"""The `PathEngine` that `make_engine` (engine.py, whose docstring describes the pipeline) builds: `evaluate`
with the score cache, the choice between the prefix tree (tree_eval.py) and plain chunks (plain.py, on a mesh
sharded.py), the compiled programs shared by `with_model` copies, and their lowering for memory plans.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from hm3_jax import distributed, models
from hm3_jax.paths import accounting, tree_eval
from hm3_jax.paths import plain as plain_lib
from hm3_jax.paths import prefix_tree as tree_lib
from hm3_jax.paths.cache import Cost, EvalResult, canonicalize, path_keys, tree_fingerprint
from hm3_jax.paths.recording import DECODE_METRICS
from hm3_jax.paths.sharded import abstract_like, compile_then_align, place_model, place_paths_chunk


class PathEngine:
    """Scores batches of layer paths; build with `make_engine` (see engine.py's docstring)."""

    def __init__(
        self,
        *,
        config,
        shell,
        pool,
        objectives,
        strategy,
        chunk_size,
        node_chunk_size,
        prefix_sharing,
        model_id,
        shared,
        mesh,
        num_threads=2,
    ):
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

    def kept_example_stats(self) -> dict:
        """{cache key: per objective its per-example statistics} of the rows kept since `keep_example_stats` (by
        this engine and its `with_model` copies; {} when not keeping)."""
        return dict(self._shared.get("examples") or {})

    def add_example_stats(self, kept: dict) -> PathEngine:
        """Adds rows another engine kept (`kept_example_stats`, e.g. another process's for the same split):
        `example_stats` reads them instead of re-running those rows. Returns self."""
        self.keep_example_stats()
        self._shared["examples"].update(kept)
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
            self.evaluate(
                paths_c[idx],
                None if junction_c is None else {n: a[idx] for n, a in junction_c.items()},
                use_cache=False,
            )
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
        that the pool may hold another number of blocks or be of the other kind, stacked or parted
        (`models.pool`; its programs are then compiled once more for that pool's shapes)."""
        check_same_shapes(self.shell, shell, "shell")
        if models.block_signature(self.pool) != models.block_signature(pool):
            raise ValueError(
                "with_model: the new pool's blocks must have the same structure, per-block shapes and dtypes"
            )
        if models.is_parted(pool):
            models.check_parted_pool(pool)
        return PathEngine(
            config=self.config,
            shell=shell,
            pool=pool,
            objectives=self.objectives,
            strategy=self.strategy,
            chunk_size=self.chunk_size,
            node_chunk_size=self.node_chunk_size,
            prefix_sharing=self.prefix_sharing,
            model_id=pool_id or tree_fingerprint(shell, pool),
            shared=self._shared,
            mesh=self.mesh,
            num_threads=self.num_threads,
        )

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
        """(scores [n, num_tasks], cost fields, per-example statistics or None) of distinct uncached rows."""
        n = paths.shape[0]
        raw: list[Any] = [None] * self.num_tasks
        tf_idx = [k for k, o in enumerate(self.objectives) if o.metric not in DECODE_METRICS]
        dec_idx = [k for k, o in enumerate(self.objectives) if o.metric in DECODE_METRICS]
        plain_idx = dec_idx + ([] if self.prefix_sharing else tf_idx)
        plain_job = self._start_plain(tuple(sorted(plain_idx)), paths, junction) if plain_idx else None
        tree_block_steps = None
        if self.prefix_sharing and tf_idx:
            outs, steps = self._run_tree(paths, lengths, junction)
            for k, o in zip(tf_idx, outs, strict=True):
                raw[k] = o
            tree_block_steps = steps["block_steps"]
        if plain_idx:
            outs = plain_job()  # the main thread helps with the chunks left, then waits
            for k, o in zip(sorted(plain_idx), outs, strict=True):
                raw[k] = o
        cost = accounting.rows_cost(
            self._shared,
            lengths,
            has_tf=bool(tf_idx),
            has_dec=bool(dec_idx),
            tree_block_steps=tree_block_steps,
        )
        keep = self._shared.get("examples") is not None
        scores, stats = accounting.host_scores(self.objectives, raw, n, keep)
        return scores, cost, stats

    def path_flops(self, length: int) -> float:
        """Analytic forward FLOPs of one path of `length` real blocks on every objective, evaluated alone
        (`accounting.path_flops`)."""
        return accounting.path_flops(self._shared, length)

    def run_plain(self, obj_idx: tuple, paths, junction):
        """Device outputs of objectives `obj_idx` (a tuple of objective indices) for every row of `paths` (canonical,
        [N, T_max]), evaluated plain in fixed-size chunks with this engine's strategy (stacked [N, ...])."""
        return self._start_plain(obj_idx, paths, junction)()

    def _start_plain(self, obj_idx: tuple, paths, junction):
        """Starts `run_plain`'s chunks on `num_threads - 1` worker threads (none for strategy "shard";
        `plain.start_chunks`); returns `finish()`, which works through the chunks still waiting on the calling
        thread, then returns the stacked outputs."""
        chunks = self._chunk_plan(paths.shape[0])  # [(start, size)]
        results: list[Any] = [None] * len(chunks)

        def run_chunk(i):
            m, out = self._plain_chunk(obj_idx, paths, junction, *chunks[i])
            results[i] = jax.tree.map(lambda a, m=m: distributed.to_host(a)[:m], out)

        workers = self.num_threads - 1 if self.strategy != "shard" else 0
        warmed = self._shared.setdefault("warmed", set())
        wait = plain_lib.start_chunks(
            len(chunks), run_chunk, workers, lambda i: (obj_idx, junction is not None, chunks[i][1]), warmed
        )

        def finish():
            wait()
            return plain_lib.stack_chunks(results)

        return finish

    def _chunk_plan(self, n: int) -> list[tuple[int, int]]:
        """[(start, size)] of plain evaluation's chunks for `n` rows (`plain.chunk_plan`; single-path chunks of a
        small remainder unless turned off by `use_single_path_chunks` or strategy "shard")."""
        singles = self._shared.get("single_path_chunks", True) and self.strategy != "shard"
        return plain_lib.chunk_plan(n, self.chunk_size, singles)

    def _plain_chunk(self, obj_idx: tuple, paths, junction, start: int, c: int):
        """(real rows m, device outputs) of the chunk of rows `start : start + c` (padded to `c` rows)."""
        fn = self._plain_fn(obj_idx, junction is not None)
        n = paths.shape[0]
        args = plain_lib.pad_chunk(paths, junction, start, c)
        shell, pool = self.shell, self.pool
        if self.strategy == "shard":  # paths split over "paths", the model's matrices over "model"
            args = place_paths_chunk(args, self.mesh)  # global on multi-host
            shell, pool = self._placed()
            if jax.process_count() > 1:
                compiled = self._shared.setdefault("aot_compiled", set())
                compile_then_align(fn, (obj_idx, junction is not None), shell, pool, args, compiled)
        else:
            args = jax.tree.map(jnp.asarray, args)
        # to_host (by the caller): the global result on every process (an all-gather on a multi-process mesh)
        return min(c, n - start), fn(shell, pool, *args)

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
        model = jax.tree.map(
            abstract_like, (self.shell, self.pool), *([] if shardings is None else [shardings])
        )
        args = [jax.ShapeDtypeStruct((self.chunk_size, t_max), jnp.int32, sharding=split)]
        if with_junction:
            row = jax.ShapeDtypeStruct(
                (self.chunk_size, t_max, self.config.hidden_size), jnp.float32, sharding=split
            )
            args.append({"scale": row, "shift": row})
        return self._plain_fn(tuple(range(self.num_tasks)), with_junction).lower(*model, *args)

    def lower_tree(self, t_max: int, with_junction: bool = False) -> jax.stages.Lowered | None:
        """The prefix tree's program for one chunk of nodes (`_run_tree`: hidden-state buffers of every
        teacher-forced batch at every depth; with junction rows each node also carries its scale and shift [D]),
        lowered with abstract inputs; None when this engine runs no tree."""
        if not self.prefix_sharing or all(o.metric in DECODE_METRICS for o in self.objectives):
            return None
        D = self.config.hidden_size
        junction = None
        if with_junction:
            junction = {
                "scale": np.ones((1, t_max, D), np.float32),
                "shift": np.zeros((1, t_max, D), np.float32),
            }
        tree = tree_lib.build_prefix_tree(np.zeros((1, t_max), np.int32), np.full(1, t_max), junction)
        nodes = next(tree_lib.chunk_nodes(tree, self.node_chunk_size, D))
        h0s, ctxs = jax.eval_shape(self._shared["embed_fn"], jax.tree.map(abstract_like, self.shell))
        buffers = tuple(jax.ShapeDtypeStruct((t_max + 1,) + h.shape, h.dtype) for h in h0s)
        shell, pool = jax.tree.map(abstract_like, (self.shell, self.pool))
        nodes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nodes)
        return self._tree_fn(with_junction).lower(shell, pool, buffers, ctxs, nodes)

    def _run_tree(self, paths, lengths, junction):
        """Teacher-forced device outputs of every row via the prefix tree (`tree_eval.run_tree`)."""
        return tree_eval.run_tree(
            self._tree_fn,
            self._shared["embed_fn"],
            self.shell,
            self.pool,
            paths,
            lengths,
            junction,
            self.node_chunk_size,
            self.config.hidden_size,
        )

    # ---------------------------------------------------------------- compiled functions
    def _plain_fn(self, obj_idx: tuple, with_junction: bool):
        """`plain.make_plain_fn` of objectives `obj_idx`, compiled once per (strategy, objectives, junction) and
        shared by `with_model` copies (its closure holds no shell or pool, which would stay alive with it)."""
        key = ("plain", self.strategy, obj_idx, with_junction)
        sh = self._shared
        if key not in sh["compiled"]:
            objectives = [self.objectives[k] for k in obj_idx]
            sh["compiled"][key] = plain_lib.make_plain_fn(
                self.config, objectives, self.strategy, self.mesh, with_junction, sh["traces"], key
            )
        return sh["compiled"][key]

    def _tree_fn(self, with_junction: bool):
        """`tree_eval.make_tree_fn`, compiled once per junction use and shared by `with_model` copies."""
        key = ("tree", with_junction)
        sh = self._shared
        if key not in sh["compiled"]:
            sh["compiled"][key] = tree_eval.make_tree_fn(
                self.config, self.objectives, sh["tf_groups"], with_junction, sh["traces"], key
            )
        return sh["compiled"][key]


def check_same_shapes(a, b, name):
    """Raises ValueError unless `a` and `b` have the same structure, shapes and dtypes."""
    sa = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), a)
    sb = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), b)
    if jax.tree.structure(a) != jax.tree.structure(b) or sa != sb:
        raise ValueError(f"with_model: the new {name} must have the same structure, shapes and dtypes")
