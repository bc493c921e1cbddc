"""Measures the two ways of scoring with a HOST score function; prints one JSON object.

    python -m hm3_jax.arch.bench_score_modes

* ``callback``: the whole iteration is one jitted function; the host score function is called through
  ``jax.pure_callback`` (``ppo.host_score_fn``), so chunks of iterations can run under ``lax.scan``.
* ``split``: jitted rollout -> host score function -> jitted update (``ppo.split_iteration``).

The host function is the planted score in numpy behind ``ppo.CachedScoreFn`` plus ``--host_ms`` of simulated
engine time per scored batch. Both modes run the same iterations from the same key; we report seconds per
iteration after compilation and their ratio, and check that both give the same parameters.
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from hm3_jax.arch import planted, ppo

_ITERS = flags.DEFINE_integer("iterations", 20, "timed iterations per mode")
_HOST_MS = flags.DEFINE_float("host_ms", 0.0, "simulated engine milliseconds per scored batch")


def main(argv):
    del argv
    problem = planted.make_planted_problem(0)
    tables = problem.tables

    def numpy_score(paths, prefs):
        del prefs
        time.sleep(_HOST_MS.value / 1000.0)
        valid = paths >= 0
        gathered = tables[:, np.arange(problem.t_max)[None, :], np.where(valid, paths, 0)]
        return (np.where(valid[None], gathered, 0.0).sum(-1) / problem.t_max).T

    config = ppo.ArchConfig(
        num_sources=3, num_layers=3, num_tasks=2, t_max=4, beta1=0.3, num_envs=64, k_nearest=1
    )
    prefs = jnp.array([[0.9, 0.1], [0.1, 0.9]])
    results = {}
    finals = {}
    for mode in ("callback", "split"):
        cached = ppo.CachedScoreFn(numpy_score, preference_free=True)
        if mode == "callback":
            trainer = ppo.make_trainer(config, ppo.host_score_fn(cached, 2), problem.descriptors, prefs)
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
        for _ in range(_ITERS.value):
            runner, _ = step(runner)
        jax.block_until_ready(runner)
        results[mode] = {
            "first_iteration_s": compile_s,
            "s_per_iteration": (time.perf_counter() - start) / _ITERS.value,
            "cache_hits": cached.hits,
            "cache_misses": cached.misses,
        }
        finals[mode] = runner.params
    same = all(
        np.allclose(a, b, atol=1e-5)
        for a, b in zip(jax.tree.leaves(finals["callback"]), jax.tree.leaves(finals["split"]), strict=True)
    )
    out = {
        "host_ms": _HOST_MS.value,
        "iterations": _ITERS.value,
        "callback_s_per_iteration": results["callback"]["s_per_iteration"],
        "split_s_per_iteration": results["split"]["s_per_iteration"],
        "split_over_callback": results["split"]["s_per_iteration"] / results["callback"]["s_per_iteration"],
        "same_params": bool(same),
        "details": results,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    app.run(main)
