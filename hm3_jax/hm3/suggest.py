"""Answers a user's preference from a finished run, without retraining (HM3's "offline sampling of weight
vectors, online optimisation").

* `suggest(run_dir, preference)`: the front model whose preference is closest (L1) to the one asked for.
* `suggest(run_dir, preference, search=True)`: builds Theta(lambda) for exactly this preference (the paper's
  DARE-TIES with the run's parameter-level settings), decodes a path for it greedily with the trained
  preference-conditioned policy (restored from the run's checkpoint; no training), and scores the path on
  the search and held-out splits. Optionally `refine_iterations` PPO iterations for this lambda first.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hm3_jax import models, moo
from hm3_jax.arch import descriptors as descriptors_lib
from hm3_jax.arch import loop as loop_lib
from hm3_jax.arch import ppo


def _load(run_dir: str):
    with open(os.path.join(run_dir, "run.json")) as f:
        meta = json.load(f)
    report_path = os.path.join(run_dir, "report.json")
    if not os.path.exists(report_path):
        raise FileNotFoundError(
            f"{run_dir} has no report.json: the run has not finished (re-run it to resume)"
        )
    with open(report_path) as f:
        report = json.load(f)
    return ml_collections.ConfigDict(meta["config"]), report


def suggest(
    run_dir: str, preference, search: bool = False, refine_iterations: int = 0, seed: int = 0
) -> dict:
    """The merged model for `preference` ([K] on the simplex).

    Returns: dict with `preference`, `path`, `heldout` (raw scores in task order), `source` ("front" or
      "policy"), and for front answers `front_index`, `front_preference` and the export directory.
    """
    config, report = _load(run_dir)
    K = len(report["tasks"])
    pref = moo.validate_preference(np.asarray(preference, np.float64), K)
    hm3 = report["methods"]["hm3"]
    if not search:
        prefs = np.asarray(hm3["preferences"])
        i = int(np.abs(prefs - pref).sum(1).argmin())
        export_dir = os.path.join(run_dir, "exports", f"pref_{i}")
        return {
            "source": "front",
            "preference": pref.tolist(),
            "front_index": i,
            "front_preference": prefs[i].tolist(),
            "path": hm3["paths"][i],
            "heldout": hm3["points"][i],
            "normalised_heldout": hm3["normalised_points"][i],
            "export": export_dir if os.path.isdir(export_dir) else None,
        }
    return _search(run_dir, config, report, pref, refine_iterations, seed)


def _search(run_dir, config, report, pref, refine_iterations, seed) -> dict:
    from hm3_jax.hm3 import arch_level, param_level
    from hm3_jax.hm3 import run as run_lib
    from hm3_jax.hm3.problem import pool_for

    start = time.perf_counter()
    _, _, problem = run_lib.setup(config, run_dir)
    K, L = problem.num_tasks, problem.config.num_layers
    key = jax.random.PRNGKey(seed)
    merged = param_level.paper_merge(
        problem, pref, key, config.param_level.density, config.param_level.drop_rate
    )
    shell, pool = models.shell_of(merged), pool_for(problem, merged)
    acfg = arch_level.arch_config(config.arch, K + 1, L, K)
    phi = descriptors_lib.block_descriptors(pool, problem.base["blocks"], K + 1)
    pref32 = jnp.asarray(pref, jnp.float32)
    scorer = arch_level.PathScorer(problem, "search", pref32[None], [shell], [pool], tag="suggest")
    trainer = ppo.make_trainer(acfg, ppo.host_score_fn(scorer, K), phi, pref32[None])
    manager = loop_lib.make_checkpoint_manager(os.path.join(run_dir, "arch", "hm3", "ckpt"))
    runner = loop_lib.restore_latest(manager, trainer.init(key))
    if runner is None:
        raise FileNotFoundError(f"no policy checkpoint under {run_dir}/arch/hm3/ckpt")
    params = runner.params
    if refine_iterations:
        params = trainer.refine(key, params, pref32, phi, refine_iterations)
    path, _ = jax.jit(trainer.decode)(params, pref32, phi)
    path = np.asarray(path, np.int32)
    search = scorer.raw(0, path[None])[0]
    heldout = arch_level.PathScorer(problem, "heldout", pref32[None], [shell], [pool], tag="suggest").raw(
        0, path[None]
    )[0]
    return {
        "source": "policy",
        "preference": pref.tolist(),
        "path": path.tolist(),
        "search": search.tolist(),
        "heldout": heldout.tolist(),
        "normalised_heldout": (heldout / np.asarray(report["ideal"])).tolist(),
        "seconds": time.perf_counter() - start,
    }
