"""Path-evaluation engine vs rebuilding each candidate as its own stacked model; prints one JSON object.

    .venv/bin/python benchmarks/path_eval.py                      # tiny3-sized random pool + synthetic data
    .venv/bin/python benchmarks/path_eval.py --zoo=runs/tiny3/zoo # the built tiny3 zoo (search split)

Keys: engine_paths_per_s (distinct paths scored per second by the engine, compilation excluded: it compiles
once for all paths and models), rebuild_paths_per_s (each candidate built as a separate stacked model — a
mergekit passthrough merge — then jitted and evaluated; compile time included, jit cached per depth, which
favours the baseline), speedup_vs_rebuild, engine_flops_per_s (analytic forward FLOPs / s),
matmul_peak_flops_per_s (dense float32 1024^3 matmul in the same run), fraction_of_peak, prefix_sharing_saving
(1 - tree / plain for seconds and FLOPs on the same policy-like batch), plus the settings. Ratios are measured
within one run; on a shared machine absolute numbers move with load.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import NamedTuple

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hm3_jax import models  # noqa: E402
from hm3_jax.paths import make_engine  # noqa: E402
from hm3_jax.tasks.objectives import make_exact_match_objective  # noqa: E402


class Setup(NamedTuple):
    config: models.ModelConfig
    shell: dict
    pool: dict
    objectives: list
    source: str


def random_setup(num_examples: int, seq_len: int, batch_size: int) -> Setup:
    """tiny3-sized Llama (D=128, F=336, L=4, V=1024), 3 experts + their mean, 3 synthetic exact-match tasks."""
    config = models.ModelConfig(family="llama", vocab_size=1024, hidden_size=128, intermediate_size=336,
                                num_layers=4, num_heads=4)  # fmt: skip
    experts = [models.init(config, jax.random.PRNGKey(i)) for i in range(3)]
    merged = jax.tree.map(lambda *xs: sum(xs) / len(xs), *experts)
    pool = models.make_pool([p["blocks"] for p in experts + [merged]])
    rng = np.random.default_rng(0)
    objectives = []
    for task in range(3):
        pairs = [
            (list(rng.integers(3, 1024, seq_len // 2)), list(rng.integers(3, 1024, seq_len // 2 - 1)))
            for _ in range(num_examples)
        ]
        objectives.append(make_exact_match_objective(f"synthetic{task}/search", pairs, 0, batch_size))
    return Setup(config, models.shell_of(merged), pool, objectives, "random tiny3-sized pool, synthetic data")


def zoo_setup(workdir: str) -> Setup:
    from hm3_jax.tasks import zoo as zoo_lib

    zoo = zoo_lib.load(workdir)
    experts = list(zoo.experts.values())
    config = experts[0].config
    merged = jax.tree.map(lambda *xs: sum(xs) / len(xs), *[m.params for m in experts])
    pool = models.make_pool([m.params["blocks"] for m in experts] + [merged["blocks"]])
    objectives = list(zoo.objectives["search"].values())
    return Setup(config, models.shell_of(merged), pool, objectives, f"tiny3 zoo {workdir} (search split)")


def policy_batch(rng, num_paths: int, pool_size: int, t_max: int, num_modes: int = 4) -> np.ndarray:
    """Paths sampled around a few modes, as a policy produces them: keep a mode's first c steps, then
    random steps (or stop); c is uniform in [1, t_max]."""
    modes = rng.integers(0, pool_size, (num_modes, t_max))
    out = modes[rng.integers(0, num_modes, num_paths)].copy()
    for row in out:
        cut = rng.integers(1, t_max + 1)
        row[cut:] = rng.integers(-1, pool_size, t_max - cut)
    return out.astype(np.int32)


def matmul_peak(n: int = 1024, reps: int = 10) -> float:
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def rebuild_eval(setup: Setup, paths: np.ndarray) -> float:
    """Seconds to score `paths` by building each as its own stacked model (host copy), jit per depth."""
    compiled = {}
    start = time.perf_counter()
    for path in paths:
        real = path[path >= 0]
        blocks = jax.tree.map(lambda x, r=real: jnp.asarray(np.asarray(x)[r]), setup.pool)  # materialise
        params = dict(setup.shell, blocks=blocks)
        config = setup.config.replace(num_layers=max(len(real), 1))
        if len(real) not in compiled:

            def score(params, config=config):
                return tuple(
                    o.device_fn(lambda ids: models.apply(config, params, ids)) for o in setup.objectives
                )

            compiled[len(real)] = jax.jit(score)
        if len(real) == 0:
            continue
        raw = compiled[len(real)](params)
        [o.host_fn(np.asarray(r)) for o, r in zip(setup.objectives, raw, strict=True)]
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", default="", help="tiny3 zoo directory (default: random tiny3-sized pool)")
    parser.add_argument("--num_paths", type=int, default=48)
    parser.add_argument("--num_rebuild", type=int, default=8)
    parser.add_argument("--t_max", type=int, default=8)
    parser.add_argument("--num_examples", type=int, default=210)
    parser.add_argument("--strategy", default="map")
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")

    setup = zoo_setup(args.zoo) if args.zoo else random_setup(args.num_examples, 64, 128)
    pool_size = models.pool_size(setup.pool)
    rng = np.random.default_rng(0)
    kwargs = dict(strategy=args.strategy, chunk_size=8, node_chunk_size=16)
    start = time.perf_counter()
    tree = make_engine(setup.config, setup.shell, setup.pool, setup.objectives, **kwargs)
    plain = make_engine(
        setup.config, setup.shell, setup.pool, setup.objectives, prefix_sharing=False, **kwargs
    )
    warm = policy_batch(rng, 4, pool_size, args.t_max)
    tree.evaluate(warm)
    plain.evaluate(warm)
    compile_s = time.perf_counter() - start

    batch = policy_batch(rng, args.num_paths, pool_size, args.t_max)
    res_tree = tree.evaluate(batch, use_cache=False)
    res_plain = plain.evaluate(batch, use_cache=False)
    assert np.array_equal(res_tree.scores, res_plain.scores), "prefix tree and plain evaluation disagree"
    n = res_tree.cost.num_evaluations

    rebuild_paths = batch[: args.num_rebuild]
    rebuild_s = rebuild_eval(setup, rebuild_paths)
    peak = matmul_peak()
    engine_s = res_tree.cost.seconds
    out = {
        "data": setup.source,
        "zoo": bool(args.zoo),
        "strategy": args.strategy,
        "num_paths": int(args.num_paths),
        "num_distinct_paths": int(n),
        "t_max": args.t_max,
        "engine_paths_per_s": n / engine_s,
        "engine_plain_paths_per_s": res_plain.cost.num_evaluations / res_plain.cost.seconds,
        "engine_compile_s": compile_s,
        "rebuild_paths_per_s": len(rebuild_paths) / rebuild_s,
        "speedup_vs_rebuild": (n / engine_s) / (len(rebuild_paths) / rebuild_s),
        "engine_flops_per_s": res_tree.cost.flops / engine_s,
        "engine_plain_flops_per_s": res_plain.cost.flops / res_plain.cost.seconds,
        "matmul_peak_flops_per_s": peak,
        "fraction_of_peak": (res_tree.cost.flops / engine_s) / peak,
        "fraction_of_peak_plain": (res_plain.cost.flops / res_plain.cost.seconds) / peak,
        "prefix_sharing_saving": {
            "flops": 1.0 - res_tree.cost.flops / res_plain.cost.flops,
            "block_steps": 1.0 - res_tree.cost.block_steps / res_plain.cost.block_steps,
            "seconds": 1.0 - engine_s / res_plain.cost.seconds,
        },
        "load_average_1min": os.getloadavg()[0],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
