"""Measures the two ways the PPO loop scores with a HOST score function; prints one JSON object.

    .venv/bin/python benchmarks/score_modes.py --iterations=30
    .venv/bin/python benchmarks/score_modes.py --smoke    # 2 iterations per mode, for the tests

* ``callback``: the whole iteration is one jitted function; the host score function is called through
  ``jax.pure_callback`` (``hm3_jax.arch.scoring.host_score_fn``), so chunks of iterations can run under
  ``lax.scan``.
* ``split``: jitted rollout -> host score function -> jitted update (``hm3_jax.arch.ppo.split_iteration``).

The host function is the planted score in numpy behind ``scoring.CachedScoreFn`` plus ``--host_ms`` of simulated
engine time per scored batch. Both modes run the same iterations from the same key; we report seconds per
iteration after compilation and their ratio, and check that both give the same parameters.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax.arch import planted, ppo
from hm3_jax.arch.config import ArchConfig
from hm3_jax.arch.scoring import CachedScoreFn, host_score_fn


def run(iterations: int, host_ms: float) -> dict:
    """Both modes, ``iterations`` timed iterations each after one compiling iteration (module docstring)."""
    problem = planted.make_planted_problem(0)
    tables = problem.tables

    def numpy_score(paths, prefs):
        del prefs
        time.sleep(host_ms / 1000.0)
        valid = paths >= 0
        gathered = tables[:, np.arange(problem.t_max)[None, :], np.where(valid, paths, 0)]
        return (np.where(valid[None], gathered, 0.0).sum(-1) / problem.t_max).T

    config = ArchConfig(
        num_sources=3, num_layers=3, num_tasks=2, t_max=4, beta1=0.3, num_envs=64, k_nearest=1
    )
    prefs = jnp.array([[0.9, 0.1], [0.1, 0.9]])
    results = {}
    finals = {}
    for mode in ("callback", "split"):
        cached = CachedScoreFn(numpy_score, preference_free=True)
        if mode == "callback":
            trainer = ppo.make_trainer(config, host_score_fn(cached, 2), problem.descriptors, prefs)
            step = jax.jit(trainer.iteration)
        else:
            trainer = ppo.make_trainer(config, planted.make_score_fn(problem), problem.descriptors, prefs)
            step = ppo.split_iteration(trainer, cached)
        runner = trainer.init(jax.random.key(0))
        start = time.perf_counter()
        runner, _ = step(runner)
        jax.block_until_ready(runner)
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(iterations):
            runner, _ = step(runner)
        jax.block_until_ready(runner)
        results[mode] = {
            "first_iteration_s": compile_s,
            "s_per_iteration": (time.perf_counter() - start) / iterations,
            "cache_hits": cached.hits,
            "cache_misses": cached.misses,
        }
        finals[mode] = runner.params
    same = all(
        np.allclose(a, b, atol=1e-5)
        for a, b in zip(jax.tree.leaves(finals["callback"]), jax.tree.leaves(finals["split"]), strict=True)
    )
    return {
        "host_ms": host_ms,
        "iterations": iterations,
        "callback_s_per_iteration": results["callback"]["s_per_iteration"],
        "split_s_per_iteration": results["split"]["s_per_iteration"],
        "split_over_callback": results["split"]["s_per_iteration"] / results["callback"]["s_per_iteration"],
        "same_params": bool(same),
        "details": results,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20, help="timed iterations per mode")
    parser.add_argument(
        "--host_ms", type=float, default=0.0, help="simulated engine milliseconds per scored batch"
    )
    parser.add_argument("--smoke", action="store_true", help="2 timed iterations per mode (tests)")
    args = parser.parse_args(argv)
    out = run(2 if args.smoke else args.iterations, args.host_ms)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
