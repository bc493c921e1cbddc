"""Path-evaluation engine vs rebuilding each candidate as its own stacked model; prints one JSON object.

    .venv/bin/python benchmarks/path_eval.py --zoo=runs/tiny3_v5/zoo --run=runs/tiny3_v5   # the reported one
    .venv/bin/python benchmarks/path_eval.py --zoo=runs/tiny3_v5/zoo --full_search        # whole search split
    .venv/bin/python benchmarks/path_eval.py                               # tiny3-sized random pool, synthetic
    .venv/bin/python benchmarks/path_eval.py --zoo=runs/tiny3/zoo --run=runs/tiny3  # after `make demo-full`
    .venv/bin/python benchmarks/path_eval.py --smoke                       # seconds, numbers meaningless (tests)

Workload. The pool is the K = 3 tiny3 experts plus the balanced preference's parameter-merged model
Theta(1/3, 1/3, 1/3) (`--run`'s stages/param_level.json when it exists, else task arithmetic with scale 0.7);
the shell (embeddings, head) is Theta's. The objectives are what HM3's search scores: the first
`engine.search_examples` examples per task of the zoo's search split (`--run`'s run.json; 100 on tiny3_v5),
built as `hm3_jax.search.problem.make_problem` builds its capped "search" split (`--full_search`: the whole search
split, 700 per task on tiny3_v5, which HM3 scores only to confirm its final few candidates); translation =
greedy decoding + chrF, math and code = teacher-forced exact match. The paths are ones a policy
really produces: (1) `archive`: the first `--num_paths` distinct paths of a real run's score archive
(`--archive`, every path the RL of an HM3 run scored, in order of first evaluation); (2) `rollouts`:
`--rollout_iterations` batches of `num_envs` episodes of the HM3 actor warm-started on Theta's identity path
(`hm3_jax.arch.warm_start`, the run's `config.arch.rl`), evaluated in order with the cache on, as the
PPO loop evaluates them.

Keys
- engine_paths_per_s: distinct paths scored per second by the engine (prefix tree for teacher-forced tasks,
  plain `lax.map` for decoding) on the archive batch, cache off, compilation excluded (the engine compiles
  once for every path and every preference's model); engine_plain_paths_per_s: the same without the tree.
- rebuild_paths_per_s / speedup_vs_rebuild: the per-candidate workflow users have today (HM3 issue 5): each
  candidate path is materialised as a stacked model (a mergekit passthrough merge), written as a Hugging Face
  safetensors directory with `hm3_jax.save_pretrained` and loaded back with `hm3_jax.load_pretrained` (as a
  mergekit output is consumed), then scored by a freshly jitted evaluation, as a separate evaluation job per
  merged model does (compile included; process start-up, imports and data loading are NOT included, which
  favours the baseline). rebuild_seconds_breakdown splits its time into build+write+load, compile, evaluate.
- rebuild_cached_paths_per_s / speedup_vs_rebuild_cached: the generous in-memory variant: the stacked model
  is built in memory (host copy of the chosen blocks) and the evaluation is compiled once per path depth and
  reused for every later candidate of that depth (compile time of the first of each depth included).
- engine_flops_per_s: analytic forward FLOPs of the work the engine did (hm3_jax/paths/flops.py: the matmuls
  of every block step it ran, the LM heads, decoding prefill + one token per step) / engine seconds;
  matmul_peak_flops_per_s: the machine's sustained float32 1024^3 `jnp.dot` rate in the same run, measured
  conservatively (`PeakMeter`): two rounds of 20 timed calls before the engine runs, two between the tree
  and the plain run, two after, two before and two after the standalone models; the peak is the BEST round
  median (a slowed round can only understate the machine). matmul_peak_samples_gflops lists every round median, matmul_peak_mean_flops_per_s their mean and
  fraction_of_mean_peak the ratio against it (the flattering denominator of sessions 3-4, for comparison);
  fraction_of_peak = engine_flops_per_s / matmul_peak_flops_per_s.
  The machine is shared (2 cores), so wall-time rates move with the load. fraction_of_peak_cpu_time
  divides FLOPs per process CPU second (all threads) of the engine by the best round's FLOPs per CPU second
  of the matmul: how efficiently the engine uses the cores it gets, largely independent of the load.
- standalone_*: the ceiling the engine is held against. Every batch path as its own stacked model, scored by
  a plain jitted evaluation of the same work (the LM head where exact match reads it, greedy decoding),
  compiled and warmed per depth before the clock starts (params on the device; evaluation + host scoring
  timed): standalone_flops_per_s, standalone_fraction_of_peak (wall and
  per CPU second), engine_vs_standalone_flops_per_s = engine FLOP rate / standalone FLOP rate (how close the
  engine comes to what XLA:CPU gets out of the merged model itself), speedup_vs_standalone_warm = engine
  paths/s / standalone paths/s (no compilation on either side). Two more peak rounds run before and after it.
- prefix_sharing_saving: 1 - tree / plain on the archive batch for FLOPs, block steps and seconds.
- rollouts: per batch and in total, paths asked, distinct, cache hits (in-batch duplicates count as hits),
  evaluations, block steps tree vs plain, seconds; cache_hit_rate = 1 - evaluations / paths;
  real_run: a finished run's distinct paths scored on the search split (stages/hm3.json
  "search_evaluations") against the RL episodes it played (num_iterations x num_envs): a lower bound on the
  cache hit rate of a whole HM3 search (those evaluations also count non-episode paths).
- load_average_1min (start and end): the machine is shared; ratios are measured within one run.

`--profile` prints instead the CPU-time profile of the pieces of one path evaluation (a block and its parts,
the LM head, `jnp.argmax` over the vocabulary and the formulations that replaced it, greedy decoding) with their
analytic FLOPs and fraction of the matmul peak per CPU second (docs/paths.md, "Where the time goes";
docs/path_eval.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import time
import types
from typing import NamedTuple

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import hm3_jax  # noqa: E402
from hm3_jax import models  # noqa: E402
from hm3_jax.paths import make_engine  # noqa: E402
from hm3_jax.paths.engine import DECODE_METRICS  # noqa: E402
from hm3_jax.tasks.exact_match import make_exact_match_objective  # noqa: E402


class Setup(NamedTuple):
    config: models.ModelConfig
    base: dict | None  # base model params (descriptors of the RL policy), None for the random pool
    experts: list  # expert params, task order
    merged: dict  # Theta(lambda) params of the balanced preference
    shell: dict
    pool: dict  # experts' blocks then Theta's: (K + 1) * L blocks
    objectives: dict  # {"search": [Objective, ...], "heldout": [...]}
    tasks: list
    source: str
    merged_source: str
    tokenizer: object = None
    fresh_search_objectives: object = None  # () -> new "search" Objectives (empty chrF memo), or None


def balanced_merged(base, experts, run_dir: str | None):
    """Theta of the balanced preference: a real run's param-level entry when available, else TA 0.7."""
    stage = os.path.join(run_dir or "", "stages", "param_level.json")
    if run_dir and os.path.exists(stage):
        from hm3_jax.search import param_level

        with open(stage) as f:
            entries = json.load(f)
        with open(os.path.join(run_dir, "run.json")) as f:
            pcfg = json.load(f)["config"]["param_level"]
        variant = pcfg.get("pool_model", "tuned") if pcfg.get("cmaes", {}).get("enabled", False) else "paper"
        prefs = np.asarray([e["preference"] for e in entries])
        k = len(experts)
        idx = int(np.argmin(np.abs(prefs - 1.0 / k).sum(axis=1)))
        # merged_for reads only problem.base and problem.experts (param_level.paper_merge / tuned_merge)
        problem = types.SimpleNamespace(base=base, experts=experts)
        merged = param_level.merged_for(problem, entries[idx], variant)
        return merged, f"{stage} entry {idx} (preference {np.round(prefs[idx], 3).tolist()}, {variant})"
    from hm3_jax import merging

    merged = merging.merge(
        "task_arithmetic", base, experts, jax.random.PRNGKey(0), weights=[1.0] * len(experts), scale=0.7
    )
    return merged, "task_arithmetic(scale=0.7, weights 1) of the experts"


def run_search_examples(run_dir: str | None) -> int | None:
    """`config.engine.search_examples` of the run (examples per task its searches score), None if unset/0."""
    run_json = os.path.join(run_dir or "", "run.json")
    if not (run_dir and os.path.exists(run_json)):
        return None
    with open(run_json) as f:
        return json.load(f)["config"].get("engine", {}).get("search_examples") or None


def search_objectives(zoo, tasks, search_examples: int | None) -> dict:
    """{"search": what a search scores, "search_full": the zoo's whole search split, "heldout"} (Objective
    lists in task order). With `search_examples` the "search" objectives are built exactly as
    `hm3_jax.search.problem.make_problem` builds its capped split (`problem.capped_search_objectives`: the first
    `search_examples` examples of each task's shuffled search split),
    so the benchmark scores what HM3's search evaluates; without it "search" is the whole split."""
    from hm3_jax.search.problem import capped_search_objectives

    out = {s: [zoo.objectives[s][t] for t in tasks] for s in ("search", "heldout")}
    out["search_full"] = out["search"]
    if search_examples:
        out["search"] = capped_search_objectives(zoo, tasks, search_examples)
    return out


def zoo_setup(workdir: str, run_dir: str | None, search_examples: int | None) -> Setup:
    """The tiny3 zoo: experts + the balanced Theta as the pool, Theta's shell, the zoo's objectives ("search"
    capped at `search_examples` per task as the run's searches score it; see `search_objectives`)."""
    from hm3_jax.tasks import zoo as zoo_lib

    zoo = zoo_lib.load(workdir)
    tasks = list(zoo.tasks)
    experts = [zoo.experts[t].params for t in tasks]
    config = zoo.base.config
    merged, how = balanced_merged(zoo.base.params, experts, run_dir)
    pool = models.make_pool([p["blocks"] for p in experts] + [merged["blocks"]])
    objectives = search_objectives(zoo, tasks, search_examples)
    n = [o.num_examples for o in objectives["search"]]
    fresh = lambda: search_objectives(zoo, tasks, search_examples)["search"]  # noqa: E731
    return Setup(config, zoo.base.params, experts, merged, models.shell_of(merged), pool, objectives, tasks,
                 f"tiny3 zoo {workdir}, search split {n} examples per task", how, zoo.tokenizer,
                 fresh)  # fmt: skip


def random_setup(
    num_examples: int = 210, seq_len: int = 64, batch_size: int = 105, smoke: bool = False
) -> Setup:
    """tiny3-sized Llama (D=128, F=336, L=4, V=1024; `smoke`: D=32, F=64, L=2, V=128), a random base, 3 random
    experts + their mean, 3 synthetic exact-match tasks (no zoo needed; a smoke setting, not the reported one)."""
    if smoke:
        dims = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)
    else:
        dims = dict(vocab_size=1024, hidden_size=128, intermediate_size=336, num_layers=4, num_heads=4)
    config = models.ModelConfig(family="llama", **dims)
    base = models.init(config, jax.random.PRNGKey(3))  # the RL policy's descriptors compare blocks with it
    experts = [models.init(config, jax.random.PRNGKey(i)) for i in range(3)]
    merged = jax.tree.map(lambda *xs: sum(xs) / len(xs), *experts)
    pool = models.make_pool([p["blocks"] for p in experts + [merged]])
    rng = np.random.default_rng(0)
    vocab = config.vocab_size
    objectives = []
    for task in range(3):
        pairs = [
            (list(rng.integers(3, vocab, seq_len // 2)), list(rng.integers(3, vocab, seq_len // 2 - 1)))
            for _ in range(num_examples)
        ]
        objectives.append(make_exact_match_objective(f"synthetic{task}/search", pairs, 0, batch_size))
    return Setup(config, base, experts, merged, models.shell_of(merged), pool,
                 {"search": objectives, "search_full": objectives, "heldout": objectives}, ["synthetic0", "synthetic1", "synthetic2"],
                 "random tiny3-sized pool, synthetic data", "mean of the random experts")  # fmt: skip


# ------------------------------------------------------------------------------------------------ policy paths
def archive_paths(path: str, pool_size: int) -> np.ndarray:
    """Every path of a real run's score archive in order of first evaluation, distinct (all preferences:
    a path scored for several preferences' models appears once), int32 [n, T_max]."""
    with np.load(path) as z:
        paths = np.asarray(z["paths"], np.int32)
    if paths.size and paths.max() >= pool_size:
        raise ValueError(f"{path}: pool index {paths.max()} outside this pool of {pool_size} blocks")
    _, first = np.unique(paths, axis=0, return_index=True)
    return paths[np.sort(first)]


def warm_paths(archive: str, pool_size: int, skip: int, batch: np.ndarray, num_layers: int) -> np.ndarray:
    """Two paths to compile the engines on, none of them in `batch`: the archive's next distinct paths, else
    the identity paths of sources 0 and 1 (padded to the batch's T_max)."""
    t_max = batch.shape[1]
    if archive:
        rest = archive_paths(archive, pool_size)[skip : skip + 2]
        if len(rest) == 2:
            return rest
    out = np.full((2, t_max), -1, np.int32)
    for m in range(2):
        out[m, :num_layers] = np.arange(num_layers) + m * num_layers
    return out


def find_archive(run_dir: str | None) -> str:
    """HM3's score archive of `run_dir`, else of runs/tiny3 ("" when neither has one)."""
    for d in (run_dir, "runs/tiny3"):
        if d and os.path.exists(os.path.join(d, "arch", "hm3", "score_archive.npz")):
            return os.path.join(d, "arch", "hm3", "score_archive.npz")
    return ""


def rl_config(setup: Setup, run_dir: str | None, smoke: bool = False):
    """ArchConfig of the run's `config.arch` (run_dir/run.json; tiny3's config, or its smoke variant, without a
    run), built as the run builds it (`arch_level.arch_config`: warm-started on the merged source K's identity
    path, PPO at `warm_started_learning_rate` after the warm start)."""
    import ml_collections

    from hm3_jax.search import arch_level

    run_json = os.path.join(run_dir or "", "run.json")
    if run_dir and os.path.exists(run_json):
        with open(run_json) as f:
            arch = ml_collections.ConfigDict(json.load(f)["config"]["arch"])
    else:
        from experiments.configs import tiny3

        arch = tiny3.get_config("smoke" if smoke else None).arch
    k, L = len(setup.experts), setup.config.num_layers
    return arch_level.arch_config(arch, k + 1, L, k)


def make_policy_rollouts(setup: Setup, acfg):
    """`rollouts(key, num_iterations)`: final paths [num_envs, T_max] of `num_iterations` rollouts of the actor
    initialised with `key` and warm-started on Theta's identity path, balanced preference (no PPO update: the
    scores are not needed). The trainer's init and rollout are jitted once for every call."""
    from hm3_jax.arch import descriptors, ppo

    k = len(setup.experts)
    phi = descriptors.block_descriptors(setup.pool, setup.base["blocks"], k + 1)
    pref = jnp.full((1, k), 1.0 / k, jnp.float32)

    def unused_score(paths, prefs, preference_index):
        raise AssertionError("rollouts only: no scores are requested")

    trainer = ppo.make_trainer(acfg, unused_score, phi, pref)
    init, rollout = jax.jit(trainer.init), jax.jit(trainer.rollout)

    def rollouts(key, num_iterations: int) -> list[np.ndarray]:
        runner, out = init(key), []
        for _ in range(num_iterations):
            runner, batch = rollout(runner)
            out.append(np.asarray(batch.final_path, np.int32))
        return out

    return rollouts


# ------------------------------------------------------------------------------------------------ baselines
def matmul_peak(n: int = 1024, reps: int = 20) -> tuple[float, float, float]:
    """One round of the float32 [n, n] @ [n, n] matmul: FLOP/s over `reps` timed calls after one warm-up:
    (median over calls of wall time, best call, total FLOPs / process CPU seconds of all calls)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = _matmul_fn()
    f(a, a).block_until_ready()
    times = []
    cpu = time.process_time()
    for _ in range(reps):
        start = time.perf_counter()
        f(a, a).block_until_ready()
        times.append(time.perf_counter() - start)
    cpu = time.process_time() - cpu
    flops = 2.0 * n**3
    return flops / float(np.median(times)), flops / min(times), reps * flops / cpu


@functools.cache
def _matmul_fn():
    return jax.jit(lambda x, y: x @ y)


class PeakMeter:
    """The machine's sustained float32 matmul rate, measured conservatively on a shared machine.

    `sample(label)` runs `rounds` rounds of `matmul_peak` (20 calls each); the benchmark samples before the
    engine runs, between its two runs and after them, so the rounds are interleaved with the work they are
    compared with. `peak()` is the BEST round median (wall) and `peak_cpu()` the best round's FLOPs per
    process CPU second: a round slowed by the scheduler, by other processes or by threads still winding down
    from compilation can only lower its own median, never raise it, so the best median is the rate the
    machine sustains when it is free, the honest denominator for fraction_of_peak (a mean of a slowed round
    and a free one flatters the engine: session 4 saw round medians of 219 and 400 GF/s in one run)."""

    def __init__(self, rounds: int = 2, n: int = 1024, reps: int = 20):
        self.rounds, self.n, self.reps = rounds, n, reps
        self.samples: dict[str, list] = {}

    def sample(self, label: str) -> None:
        self.samples[label] = [matmul_peak(self.n, self.reps) for _ in range(self.rounds)]

    def _all(self):
        return [r for rs in self.samples.values() for r in rs]

    def peak(self) -> float:
        return max(r[0] for r in self._all())

    def mean_peak(self) -> float:
        return float(np.mean([r[0] for r in self._all()]))

    def best_call(self) -> float:
        return max(r[1] for r in self._all())

    def peak_cpu(self) -> float:
        return max(r[2] for r in self._all())

    def summary(self) -> dict:
        return {k: [round(r[0] / 1e9, 1) for r in rs] for k, rs in self.samples.items()}


def _score_fn(config, objectives, head_positions: bool = False):
    """Scoring of one standalone model: what an evaluation job runs on a merged model (a new function object
    per call, so jitting it traces and compiles afresh). `head_positions`: the teacher-forced forward takes
    `positions=` (the LM head only where exact match reads it, as the engine runs it) instead of returning
    full logits; same scores either way."""

    def score(params):
        outs = []
        ident = jnp.arange(config.num_layers, dtype=jnp.int32)  # a model = its identity path
        for o in objectives:
            if o.metric in DECODE_METRICS:
                fwd = lambda i, m, n, p=params, a=ident: models.greedy_decode(  # noqa: E731
                    config, p, p["blocks"], a, i, m, int(n)
                )
            elif head_positions:
                fwd = lambda ids, positions=None, p=params, a=ident: models.apply_path(  # noqa: E731
                    config, p, p["blocks"], a, ids, positions=positions
                )
            else:
                fwd = lambda ids, p=params: models.apply(config, p, ids)  # noqa: E731
            outs.append(o.device_fn(fwd))
        return tuple(outs)

    return score


def _stacked(setup: Setup, real: np.ndarray):
    """The candidate as its own model: the shell plus the chosen blocks copied in path order (host arrays)."""
    pool_np = jax.tree.map(np.asarray, setup.pool)
    blocks = jax.tree.map(lambda x: np.ascontiguousarray(x[real]), pool_np)
    params = dict(jax.tree.map(np.asarray, setup.shell), blocks=blocks)
    return setup.config.replace(num_layers=len(real)), params


def rebuild_per_candidate(setup: Setup, paths: np.ndarray, objectives) -> tuple[list, dict]:
    """(a) mergekit-style workflow per candidate: build, save_pretrained, load_pretrained, fresh jit, score."""
    times = {"build_write_load": 0.0, "compile": 0.0, "evaluate": 0.0}
    scores = []
    root = tempfile.mkdtemp(prefix="rebuild_")
    try:
        for i, path in enumerate(paths):
            real = path[path >= 0]
            t0 = time.perf_counter()
            config, params = _stacked(setup, real)
            out_dir = os.path.join(root, f"candidate{i}")
            hm3_jax.save_pretrained(hm3_jax.Model(config, params), out_dir)
            model = hm3_jax.load_pretrained(out_dir)
            t1 = time.perf_counter()
            fn = jax.jit(_score_fn(model.config, objectives)).lower(model.params).compile()
            t2 = time.perf_counter()
            raw = jax.block_until_ready(fn(model.params))
            scores.append([o.host_fn(np.asarray(r)) for o, r in zip(objectives, raw, strict=True)])
            t3 = time.perf_counter()
            shutil.rmtree(out_dir)
            times["build_write_load"] += t1 - t0
            times["compile"] += t2 - t1
            times["evaluate"] += t3 - t2
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return scores, times


def rebuild_cached(setup: Setup, paths: np.ndarray, objectives) -> tuple[list, float]:
    """(b) in-memory variant: stacked model built in memory, evaluation compiled once per depth."""
    compiled = {}
    scores = []
    start = time.perf_counter()
    for path in paths:
        real = path[path >= 0]
        config, params = _stacked(setup, real)
        if len(real) not in compiled:
            compiled[len(real)] = jax.jit(_score_fn(config, objectives))
        raw = compiled[len(real)](jax.tree.map(jnp.asarray, params))
        scores.append([o.host_fn(np.asarray(r)) for o, r in zip(objectives, raw, strict=True)])
    return scores, time.perf_counter() - start


def standalone_models(setup: Setup, paths: np.ndarray, objectives, engine) -> dict:
    """The ceiling the engine is held against: each path as its own stacked model, scored by a plain jitted
    evaluation of the same work as the plain engine (`_score_fn` with the LM head at the positions exact match
    reads, greedy decoding for chrF), compiled and warmed per depth BEFORE the clock starts, params already on
    the device: only evaluation + the objectives' host scoring is timed, one call after the other on the
    calling thread (XLA spreads each op over the cores itself). FLOPs as the engine counts them for the path
    alone (`PathEngine.path_flops`). The FLOP-rate ratio engine / standalone says how close the engine comes
    to what XLA:CPU gets out of the merged model itself on the same work.
    """
    prepared, compiled = [], {}
    for path in paths:
        real = path[path >= 0]
        cfg, params = _stacked(setup, real)
        params = jax.device_put(params)
        if len(real) not in compiled:
            fn = jax.jit(_score_fn(cfg, objectives, head_positions=True))
            jax.block_until_ready(fn(params))  # compile + warm, off the clock
            compiled[len(real)] = fn
        flops = engine.path_flops(len(real))
        prepared.append((compiled[len(real)], params, flops))
    scores = []
    wall, cpu = time.perf_counter(), time.process_time()
    for fn, params, _ in prepared:
        raw = fn(params)
        scores.append([o.host_fn(np.asarray(r)) for o, r in zip(objectives, raw, strict=True)])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    total = float(sum(f for _, _, f in prepared))
    return {"scores": np.asarray(scores), "seconds": wall, "cpu_seconds": cpu, "flops": total}


def _cpu_seconds(fn, *args, reps: int = 9) -> float:
    """Best process CPU seconds (all threads) of `reps` calls of a jitted fn, after one warm-up call."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(reps):
        start = time.process_time()
        jax.block_until_ready(fn(*args))
        best = min(best, time.process_time() - start)
    return best


def profile_components(setup: Setup, batch: int = 100, seq_len: int = 48, prompt_len: int = 16) -> dict:
    """CPU ms, analytic GFLOP and fraction of the matmul peak (per CPU second) of the pieces of one path
    evaluation: a block and its parts, the LM head, the objectives' argmax, greedy decoding (`--profile`)."""
    from hm3_jax.models import flops as mflops
    from hm3_jax.models import layers

    config, shell = setup.config, setup.shell
    block = jax.tree.map(lambda x: x[-1], setup.pool)  # Theta's last block
    a = jnp.ones((1024, 1024), jnp.float32)
    peak = 2.0 * 1024**3 / _cpu_seconds(jax.jit(lambda x: x @ x), a)
    ids = jax.random.randint(jax.random.PRNGKey(1), (batch, seq_len), 3, config.vocab_size)
    h, ctx = models.embed(config, shell, ids)
    x2 = h.reshape(-1, config.hidden_size)
    heads, hd = config.num_heads, config.head_size
    q = jax.random.normal(jax.random.PRNGKey(2), (batch, seq_len, heads, hd))
    logits = jax.random.normal(jax.random.PRNGKey(3), (batch, seq_len, config.vocab_size))
    tokens = batch * seq_len
    d, f = config.hidden_size, config.intermediate_size
    rows = {}

    def row(name, fn, args, flops):
        t = _cpu_seconds(jax.jit(fn), *args)
        rows[name] = {
            "cpu_ms": 1e3 * t,
            "gflop": flops / 1e9,
            "fraction_of_peak": flops / t / peak if flops else None,
        }

    row(
        "block",
        lambda p, h, c: models.block(config, p, h, c),
        (block, h, ctx),
        tokens * mflops.block_flops_per_token(config, seq_len),
    )
    row(
        "block: q, k, v projections",
        lambda x, a, b, c: (x @ a, x @ b, x @ c),
        (x2, block["q"]["kernel"], block["k"]["kernel"], block["v"]["kernel"]),
        tokens * 2 * d * 3 * heads * hd,
    )
    row("block: o projection", lambda x, a: x @ a, (x2, block["o"]["kernel"]), tokens * 2 * d * heads * hd)
    row(
        "block: MLP",
        lambda x, g, u, o: (jax.nn.silu(x @ g) * (x @ u)) @ o,
        (x2, block["gate"]["kernel"], block["up"]["kernel"], block["down"]["kernel"]),
        tokens * 6 * d * f,
    )
    row("block: attention", layers.attention, (q, q, q, ctx["mask"]), tokens * 4 * heads * hd * seq_len)
    row("block: RoPE (q)", layers.apply_rope, (q, ctx["sin"], ctx["cos"]), 0)
    row("block: RMSNorm", lambda x: layers.rms_norm(block["attn_norm"]["scale"], x, config.norm_eps), (h,), 0)
    row("LM head", lambda sh, h: models.head(config, sh, h), (shell, h), tokens * 2 * d * config.vocab_size)
    row("argmax over V of [B, S, V] logits", lambda x: jnp.argmax(x, -1), (logits,), 0)
    row("max over V (comparison)", lambda x: jnp.max(x, -1), (logits,), 0)
    from hm3_jax.models.decode import first_argmax
    from hm3_jax.tasks.exact_match import argmax_equals

    row("argmax_equals over V (what exact match runs now)", argmax_equals, (logits, ids), 0)
    row("first_argmax over V (what greedy decoding runs now)", first_argmax, (logits,), 0)
    path = jnp.arange(config.num_layers, dtype=jnp.int32) + models.pool_size(setup.pool) - config.num_layers
    pid = jax.random.randint(jax.random.PRNGKey(4), (batch, prompt_len), 3, config.vocab_size)
    pmask = jnp.ones((batch, prompt_len), jnp.int32)
    for new in (1, 11):  # tiny3_v5's search split: [100, 48] teacher-forced batches, prompt 16 + 11 new
        row(f"greedy_decode prompt {prompt_len}, {new} new",
            lambda sh, po, pa, i, m, n=new: models.greedy_decode(config, sh, po, pa, i, m, n),
            (shell, setup.pool, path, pid, pmask), batch * mflops.decode_flops(config, prompt_len, new))  # fmt: skip
    return {"matmul_1024_flops_per_cpu_s": peak, "batch": batch, "seq_len": seq_len, "rows": rows}


def check_scores(setup: Setup, batch: np.ndarray, strategy: str) -> dict:
    """The engine's float64 scores of `batch` on the search and held-out splits: sha1 (first 10 hex digits)
    of each [N, num_tasks] array and its column means (`--check_scores`: docs/path_eval.md compares them
    before and after every change that is not an exact reformulation)."""
    import hashlib

    out = {"num_paths": int(len(batch))}
    splits = ("search", "heldout")
    if setup.objectives["search_full"] is not setup.objectives["search"]:
        splits = ("search", "search_full", "heldout")
    for split in splits:
        engine = make_engine(
            setup.config, setup.shell, setup.pool, setup.objectives[split], strategy=strategy
        )
        scores = np.asarray(engine.evaluate(batch, use_cache=False).scores, np.float64)
        out[split] = {
            "sha1": hashlib.sha1(scores.tobytes()).hexdigest()[:10],
            "mean": np.round(scores.mean(axis=0), 3).tolist(),
        }
    return out


def _cost_dict(cost) -> dict:
    return {k: (float(v) if isinstance(v, float) else int(v)) for k, v in cost._asdict().items()}


def main(argv=None) -> dict | None:
    """Parses `argv` (default sys.argv), runs, prints one JSON object and returns it (None with --profile)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", default="", help="tiny3 zoo directory (default: random tiny3-sized pool)")
    parser.add_argument("--run", default="runs/tiny3_v5", help="HM3 run dir (param_level.json, run.json)")
    parser.add_argument(
        "--full_search", action="store_true",
        help="score the whole search split (default: the first engine.search_examples per task of --run's "
        "config, the split HM3's search scores)",
    )  # fmt: skip
    parser.add_argument("--archive", default="", help="score_archive.npz (default: RUN's, else runs/tiny3's)")
    parser.add_argument("--num_paths", type=int, default=32, help="archive paths scored by the engine")
    parser.add_argument("--rollout_iterations", type=int, default=3)
    parser.add_argument("--num_rebuild", type=int, default=4, help="candidates of the per-candidate workflow")
    parser.add_argument("--num_rebuild_cached", type=int, default=8)
    parser.add_argument("--strategy", default="map")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="only the per-component CPU-time profile")
    parser.add_argument(
        "--check_scores", action="store_true",
        help="only the engine's scores of the archive batch on the search and held-out splits (sha1 prefixes)",
    )  # fmt: skip
    parser.add_argument(
        "--smoke", action="store_true",
        help="tests: a tiny random pool (no --zoo) or the zoo, 4 paths, one of everything, a small matmul peak",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_paths, args.rollout_iterations, args.num_rebuild, args.num_rebuild_cached = 4, 1, 1, 1
    load_start = os.getloadavg()[0]
    run_dir = args.run if os.path.isdir(args.run) else None
    search_examples = None if args.full_search else run_search_examples(run_dir)
    if args.zoo:
        setup = zoo_setup(args.zoo, run_dir, search_examples)
    else:
        setup = random_setup(16, 16, 8, smoke=True) if args.smoke else random_setup()
    if args.profile:
        print(
            json.dumps({"data": setup.source, **profile_components(setup), "load_average_1min": load_start})
        )
        return None
    objectives = setup.objectives["search"]
    pool_size = models.pool_size(setup.pool)
    archive = args.archive or find_archive(run_dir)
    if args.check_scores:
        if not archive:
            raise SystemExit("--check_scores needs a score archive (--archive or --run)")
        print(
            json.dumps(
                check_scores(setup, archive_paths(archive, pool_size)[: args.num_paths], args.strategy)
            )
        )
        return None
    acfg = rl_config(setup, run_dir, args.smoke)
    policy_rollouts = make_policy_rollouts(setup, acfg)

    if archive:
        batch = archive_paths(archive, pool_size)[: args.num_paths]
    else:  # no run yet: distinct paths of policy rollouts stand in for the archive
        batch = np.concatenate(policy_rollouts(jax.random.PRNGKey(args.seed + 1), 4))
        batch = np.unique(batch, axis=0)[: args.num_paths]

    kwargs = dict(strategy=args.strategy, chunk_size=8, node_chunk_size=16)
    start = time.perf_counter()
    tree = make_engine(setup.config, setup.shell, setup.pool, objectives, pool_id="tree", **kwargs)
    # the plain engine gets its own objectives: chrF memoises segment statistics per objective
    # (metrics.make_chrf_scorer), and the plain run must not find the tree run's hypotheses there
    plain_objectives = setup.fresh_search_objectives() if setup.fresh_search_objectives else objectives
    plain = make_engine(
        setup.config, setup.shell, setup.pool, plain_objectives, prefix_sharing=False, pool_id="plain",
        **kwargs,
    )  # fmt: skip
    # compile on paths outside the timed batch (so no timed path's chrF statistics are memoised in advance)
    warm = warm_paths(archive, pool_size, len(batch), batch, setup.config.num_layers)
    tree.evaluate(warm, use_cache=False)
    plain.evaluate(warm, use_cache=False)
    compile_s = time.perf_counter() - start

    meter = PeakMeter(rounds=1, n=128, reps=2) if args.smoke else PeakMeter()
    meter.sample("before")
    cpu = time.process_time()
    res_tree = tree.evaluate(batch, use_cache=False)
    tree_cpu = time.process_time() - cpu
    meter.sample("between")
    cpu = time.process_time()
    res_plain = plain.evaluate(batch, use_cache=False)
    plain_cpu = time.process_time() - cpu
    meter.sample("after")
    if not np.array_equal(res_tree.scores, res_plain.scores):
        raise AssertionError("prefix tree and plain evaluation disagree")
    n = res_tree.cost.num_evaluations
    engine_s = res_tree.cost.seconds

    # rollouts of the warm-started policy, evaluated in order with the cache on (a fresh cache namespace)
    rollouts = policy_rollouts(jax.random.PRNGKey(args.seed), args.rollout_iterations)
    live = tree.with_model(setup.shell, setup.pool, pool_id="rollouts")
    per_batch = [_cost_dict(live.evaluate(paths).cost) for paths in rollouts]
    total = {k: sum(b[k] for b in per_batch) for k in per_batch[0]}

    rb_paths = batch[: args.num_rebuild]
    rb_scores, rb_times = rebuild_per_candidate(setup, rb_paths, objectives)
    rb_seconds = sum(rb_times.values())
    rbc_paths = batch[: args.num_rebuild_cached]
    rbc_scores, rbc_seconds = rebuild_cached(setup, rbc_paths, objectives)
    fresh = setup.fresh_search_objectives() if setup.fresh_search_objectives else objectives
    meter.sample("standalone")
    alone = standalone_models(setup, batch, fresh, tree)
    meter.sample("end")
    peak, peak_cpu = meter.peak(), meter.peak_cpu()  # the best of all ten rounds
    agree_alone = float(np.max(np.abs(alone["scores"] - res_tree.scores)))
    agree = float(np.max(np.abs(np.asarray(rb_scores) - res_tree.scores[: len(rb_paths)])))
    agree_c = float(np.max(np.abs(np.asarray(rbc_scores) - res_tree.scores[: len(rbc_paths)])))

    engine_pps = n / engine_s
    rebuild_pps = len(rb_paths) / rb_seconds
    rebuild_c_pps = len(rbc_paths) / rbc_seconds
    real_run = None
    if (
        archive
    ):  # the cache over a whole real run: distinct paths scored vs episodes played (finished runs only)
        run_of_archive = os.path.dirname(os.path.dirname(os.path.dirname(archive)))
        stage = os.path.join(run_of_archive, "stages", "hm3.json")
        if os.path.exists(stage):
            with open(stage) as f:
                hm3 = json.load(f)
            hm3 = hm3.get("value", hm3)
            acfg_run = hm3["arch_config"]
            episodes = int(acfg_run["num_iterations"]) * int(acfg_run["num_envs"])
            searched = int(hm3.get("search_evaluations", hm3["evaluations"]))
            real_run = {
                "run": run_of_archive, "episodes_played": episodes, "search_evaluations": searched,
                "confirm_charged_evaluations": int(hm3.get("confirm_charged_evaluations", 0)),
                "cache_hit_rate_lower_bound": 1.0 - searched / episodes,
                "note": "search_evaluations (distinct paths scored on the capped search split) also count paths "
                "that are not RL episodes (each preference's greedy decode, identity seeds, neighbourhood "
                "refinement), so 1 - search_evaluations / episodes only bounds the episodes' cache hit rate "
                "from below (vacuous when negative); the rollouts above measure it directly",
            }  # fmt: skip
        else:
            real_run = {"run": run_of_archive, "note": "run not finished (no stages/hm3.json): not reported"}
    out = {
        "data": setup.source,
        "merged_model": setup.merged_source,
        "zoo": bool(args.zoo),
        "strategy": args.strategy,
        "policy_batch": f"first {len(batch)} distinct paths of {archive}" if archive else "policy rollouts",
        "num_paths": int(len(batch)),
        "num_distinct_paths": int(n),
        "t_max": int(batch.shape[1]),
        "engine_paths_per_s": engine_pps,
        "engine_plain_paths_per_s": res_plain.cost.num_evaluations / res_plain.cost.seconds,
        "engine_compile_s": compile_s,
        "rebuild_paths_per_s": rebuild_pps,
        "speedup_vs_rebuild": engine_pps / rebuild_pps,
        "rebuild_num_paths": int(len(rb_paths)),
        "rebuild_seconds_breakdown": rb_times,
        "rebuild_cached_paths_per_s": rebuild_c_pps,
        "speedup_vs_rebuild_cached": engine_pps / rebuild_c_pps,
        "rebuild_cached_num_paths": int(len(rbc_paths)),
        "rebuild_max_abs_score_diff_vs_engine": max(agree, agree_c, agree_alone),
        "standalone_paths_per_s": len(batch) / alone["seconds"],
        "standalone_flops_per_s": alone["flops"] / alone["seconds"],
        "standalone_fraction_of_peak": alone["flops"] / alone["seconds"] / peak,
        "standalone_fraction_of_peak_cpu_time": alone["flops"] / alone["cpu_seconds"] / peak_cpu,
        "engine_vs_standalone_flops_per_s": (res_tree.cost.flops / engine_s)
        / (alone["flops"] / alone["seconds"]),
        "speedup_vs_standalone_warm": engine_pps / (len(batch) / alone["seconds"]),
        "engine_flops_per_s": res_tree.cost.flops / engine_s,
        "engine_plain_flops_per_s": res_plain.cost.flops / res_plain.cost.seconds,
        "matmul_peak_flops_per_s": peak,
        "matmul_peak_mean_flops_per_s": meter.mean_peak(),
        "matmul_peak_best_call_flops_per_s": meter.best_call(),
        "matmul_peak_samples_gflops": meter.summary(),
        "fraction_of_peak": (res_tree.cost.flops / engine_s) / peak,
        "fraction_of_mean_peak": (res_tree.cost.flops / engine_s) / meter.mean_peak(),
        "fraction_of_peak_plain": (res_plain.cost.flops / res_plain.cost.seconds) / peak,
        "engine_flops_per_cpu_s": res_tree.cost.flops / tree_cpu,
        "matmul_peak_flops_per_cpu_s": peak_cpu,
        "fraction_of_peak_cpu_time": (res_tree.cost.flops / tree_cpu) / peak_cpu,
        "fraction_of_peak_cpu_time_plain": (res_plain.cost.flops / plain_cpu) / peak_cpu,
        "engine_flops": res_tree.cost.flops,
        "engine_cpu_seconds": tree_cpu,
        "engine_seconds": engine_s,
        "engine_plain_seconds": res_plain.cost.seconds,
        "prefix_sharing_saving": {
            "flops": 1.0 - res_tree.cost.flops / res_plain.cost.flops,
            "block_steps": 1.0 - res_tree.cost.block_steps / res_plain.cost.block_steps,
            "seconds": 1.0 - engine_s / res_plain.cost.seconds,
        },
        "rollouts": {
            "policy": f"warm-started actor ({acfg.warm_start_steps} BC steps on Theta's identity path), "
            f"{acfg.num_envs} envs x {args.rollout_iterations} iterations, balanced preference, seed {args.seed}",
            "per_batch": per_batch,
            "total": total,
            "cache_hit_rate": 1.0 - total["num_evaluations"] / max(total["num_paths"], 1),
            "prefix_sharing_saving_block_steps": 1.0
            - total["block_steps"] / max(total["block_steps_plain"], 1),
            "prefix_sharing_saving_flops": 1.0 - total["flops"] / max(total["flops_plain"], 1.0),
            "engine_paths_per_s": total["num_evaluations"] / max(total["seconds"], 1e-9),
            "engine_paths_served_per_s": total["num_paths"] / max(total["seconds"], 1e-9),
        },
        "real_run": real_run,
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        "jax": jax.__version__,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
