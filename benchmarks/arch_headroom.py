"""Does the architecture level have real headroom over Theta(lambda)? Re-scores a finished run's best paths.

For every preference of a finished HM3 run, the `--top` best paths of the RL's score archive (by the RL reward on
the capped search subset the search saw) are re-scored on the WHOLE search split and on the held-out split,
together with Theta(lambda)'s identity path. Prints one JSON object: per preference the reward of Theta and of
the best other archive path on the subset, on the whole search split and held-out, and the mean gains. A path that
beats Theta on the whole search split AND held-out is headroom a better search could find; a gain on the subset
only is the winner's curse.

    .venv/bin/python benchmarks/arch_headroom.py --run=runs/tiny3_v5 --top=10
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/tiny3_v5")
    parser.add_argument("--config", default="experiments/configs/tiny3.py")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()

    from absl import logging

    from experiments.configs import tiny3
    from hm3_jax import models
    from hm3_jax.hm3 import arch_level
    from hm3_jax.hm3 import run as run_lib
    from hm3_jax.hm3.problem import pool_for

    logging.set_verbosity(logging.WARNING)
    config = tiny3.get_config()
    _, _, problem = run_lib.setup(config, args.run, os.path.join(args.run, "zoo"))
    with open(os.path.join(args.run, "stages", "param_level.json")) as f:
        param = json.load(f)
    prefs = np.asarray([e["preference"] for e in param], np.float32)
    merged = run_lib.merged_models(problem, param, config.param_level.pool_model)
    shells = [models.shell_of(m) for m in merged]
    pools = [pool_for(problem, m) for m in merged]
    K, L, rl = problem.num_tasks, problem.config.num_layers, config.arch.rl
    scorer = {
        s: arch_level.PathScorer(problem, s, prefs, shells, pools, "headroom")
        for s in ("search_full", "heldout")
    }
    archive = np.load(os.path.join(args.run, "arch", "hm3", "score_archive.npz"))
    theta = arch_level.identity_paths(K + 1, L, rl.t_max)[K]
    rows = []
    for i, pref in enumerate(prefs):
        sel = archive["index"] == i
        sel &= ~np.all(
            archive["paths"] == theta[None], axis=1
        )  # Theta itself is the comparison, not a candidate
        paths, sub = archive["paths"][sel], archive["scores"][sel]
        r_sub = arch_level.reward(sub, pref, (paths >= 0).sum(-1), rl.beta1, rl.t_max)
        order = np.argsort(-r_sub, kind="stable")[: args.top]
        cands = np.concatenate([theta[None], paths[order]])
        out = {"preference": pref.tolist()}
        for s, sc in scorer.items():
            norm = problem.normalise(sc.raw(i, cands), s)
            out[s] = arch_level.reward(norm, pref, (cands >= 0).sum(-1), rl.beta1, rl.t_max).tolist()
        best_full = 1 + int(np.argmax(out["search_full"][1:]))
        rows.append({
            **out,
            "subset_top": r_sub[order].tolist(),
            "theta_full": out["search_full"][0], "theta_heldout": out["heldout"][0],
            "best_full_path": cands[best_full].tolist(),
            "best_full_gain_full": out["search_full"][best_full] - out["search_full"][0],
            "best_full_gain_heldout": out["heldout"][best_full] - out["heldout"][0],
        })  # fmt: skip
    gains_full = [r["best_full_gain_full"] for r in rows]
    gains_held = [r["best_full_gain_heldout"] for r in rows]
    print(json.dumps({
        "run": args.run, "top": args.top,
        "mean_gain_whole_search_of_best_over_theta": float(np.mean(gains_full)),
        "mean_gain_heldout_of_that_path": float(np.mean(gains_held)),
        "preferences_where_it_beats_theta_on_both": int(sum(g > 0 and h > 0 for g, h in zip(gains_full, gains_held, strict=True))),
        "per_preference": rows,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
