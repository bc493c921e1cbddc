"""Suggestions for new preferences from a run's trained policy and from that policy distilled onto the run's
answers (`suggest.distill`); prints one JSON object.

    .venv/bin/python benchmarks/distilled_suggestions.py --run=runs/tiny3_deep/run_e --workdir=/tmp/distill_e

Works on a copy of the run (`--workdir`; the run itself is not changed). For `--num_new` preferences drawn from
Dirichlet(1, ..., 1) with `--seed`, `suggest(search=True)` answers each with the trained policy, then the
policy is distilled (`--steps` Adam steps of behaviour cloning onto every front preference's answer) and each is
answered again. Per preference: whether the decoded path differs from Theta(lambda)'s identity path, whether the
answer is the decoded path (the run's rule: higher search reward, confirmed on the whole search split), and the
held-out reward `sum_k lambda_k f_k / z*_k - beta1 T / T_max` of Theta(lambda) and of both answers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from hm3_jax.arch.env import host_reward  # noqa: E402
from hm3_jax.pipeline import suggest  # noqa: E402
from hm3_jax.search.problem import score_params  # noqa: E402


def _reward(raw, pref, path, ideal, beta1: float, t_max: int) -> float:
    norm = np.asarray(raw, np.float64) / np.asarray(ideal, np.float64)
    length = int((np.asarray(path) >= 0).sum())
    return float(host_reward(norm[None], np.asarray(pref), np.asarray([length]), beta1, t_max)[0])


def main(argv=None) -> dict:
    """Parses `argv` (default sys.argv), runs, prints one JSON object and returns it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a finished run_hm3 directory")
    parser.add_argument("--workdir", required=True, help="where the run is copied to (replaced)")
    parser.add_argument("--num_new", type=int, default=12, help="new preferences (Dirichlet(1))")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=500, help="distillation steps")
    parser.add_argument("--learning_rate", type=float, default=0.0, help="0: the warm start's rate")
    args = parser.parse_args(argv)
    if os.path.exists(args.workdir):
        shutil.rmtree(args.workdir)
    shutil.copytree(args.run, args.workdir, ignore=shutil.ignore_patterns("exports", "distilled"))
    run = args.workdir
    config, report = suggest._load(run)
    K = len(report["tasks"])
    prefs = np.random.default_rng(args.seed).dirichlet(np.ones(K), args.num_new).round(4)
    prefs = prefs / prefs.sum(1, keepdims=True)
    beta1, t_max = float(config.arch.rl.beta1), int(config.arch.rl.t_max)
    ideal = report["ideal"]

    def answers() -> list[dict]:
        return [suggest.suggest(run, p, search=True) for p in prefs]

    start = time.perf_counter()
    before = answers()
    distilled = suggest.distill(run, args.steps, args.learning_rate)
    after = answers()
    problem = suggest._session(run, config)["problem"]
    L = problem.config.num_layers
    theta_path = [K * L + i for i in range(L)]
    rows = []
    for p, b, a in zip(prefs, before, after, strict=True):
        theta, _ = suggest._theta(run, config, problem, p)
        theta_raw = score_params(problem.engines["heldout"], problem.experts, theta)
        row = {
            "preference": p.tolist(),
            "theta_reward": _reward(theta_raw, p, theta_path, ideal, beta1, t_max),
        }
        for name, s in (("trained", b), ("distilled", a)):
            decoded = [x for x in s["decoded_path"] if x >= 0]
            row[name] = {
                "decoded_is_theta": decoded == theta_path,
                "answered_decoded": s["path"] == s["decoded_path"] and decoded != theta_path,
                "reward": _reward(s["heldout"], p, s["path"], ideal, beta1, t_max),
                "decoded_path": decoded,
            }
        rows.append(row)

    def summary(name: str) -> dict:
        gains = np.asarray([r[name]["reward"] - r["theta_reward"] for r in rows])
        return {
            "decoded_differs_from_theta": int(sum(not r[name]["decoded_is_theta"] for r in rows)),
            "answered_decoded": int(sum(r[name]["answered_decoded"] for r in rows)),
            "mean_reward": float(np.mean([r[name]["reward"] for r in rows])),
            "mean_gain_over_theta": float(gains.mean()),
            "better_than_theta": int((gains > 1e-9).sum()),
            "worse_than_theta": int((gains < -1e-9).sum()),
        }

    out = {
        "run": args.run,
        "num_new": args.num_new,
        "steps": args.steps,
        "front_reproduced": f"{distilled['reproduced']}/{distilled['num_preferences']}",
        "mean_theta_reward": float(np.mean([r["theta_reward"] for r in rows])),
        "trained": summary("trained"),
        "distilled": summary("distilled"),
        "per_preference": rows,
        "seconds": time.perf_counter() - start,
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
