"""HM3 vs a tuned parameter baseline on the SEARCH split, preference by preference; prints one JSON object.

    .venv/bin/python benchmarks/search_split_check.py --run=runs/tiny3    # after `make demo-full` (zoo: RUN/zoo)
    .venv/bin/python benchmarks/search_split_check.py --run=runs/tiny3_v3 --zoo=runs/tiny3/zoo   # reported

The report compares methods on the held-out split only. This re-scores the models a parameter baseline chose
(its stored hyperparameters, rebuilt with the run's keys) on the search split every method optimised on, and
compares them with HM3's search-split scores stored in the run: mean weighted score `sum_k lambda_k f_k` and
Tchebycheff distance `max_k lambda_k |f_k - 1|` of the normalised scores, per preference and on average.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from hm3_jax import moo  # noqa: E402
from hm3_jax.pipeline import (
    baseline_runs,  # noqa: E402
    run_config,  # noqa: E402
)
from hm3_jax.pipeline import run as run_lib  # noqa: E402
from hm3_jax.search.problem import score_params  # noqa: E402


def main(argv=None) -> dict:
    """Parses `argv` (default sys.argv), runs, prints one JSON object and returns it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a finished run_hm3 directory")
    parser.add_argument("--zoo", default=None, help="its zoo directory (default RUN/zoo)")
    parser.add_argument("--method", default="task_arithmetic", choices=run_config.REQUIRED_PARAM)
    args = parser.parse_args(argv)
    import ml_collections

    with open(os.path.join(args.run, "run.json")) as f:
        config = ml_collections.ConfigDict(json.load(f)["config"])
    wd, _, problem = run_lib.setup(config, args.run, args.zoo)
    base = wd.load_stage(f"baseline_{args.method}")
    hm3 = wd.load_stage("hm3")["per_preference"]
    k_base = jax.random.split(jax.random.PRNGKey(config.seed), 5)[4]
    rows = []
    for i, (pref, hp, h) in enumerate(zip(base["preferences"], base["hparams"], hm3, strict=True)):
        pref = np.asarray(pref)
        key = jax.random.fold_in(baseline_runs.baseline_key(k_base, args.method), i)
        merged = baseline_runs.param_merge(problem, args.method, pref, key, hp)
        f_base = problem.normalise(score_params(problem.engines["search"], problem.experts, merged), "search")
        f_hm3 = problem.normalise(h["search"], "search")
        rows.append({
            "preference": pref.round(4).tolist(),
            "weighted": {args.method: float(f_base @ pref), "hm3": float(f_hm3 @ pref)},
            # the Chebyshev distance to the ideal 1 (lower is better): moo.tchebycheff negated
            "tchebycheff": {args.method: -float(moo.tchebycheff(f_base, pref, np.ones_like(f_base))),
                            "hm3": -float(moo.tchebycheff(f_hm3, pref, np.ones_like(f_hm3)))},
        })  # fmt: skip
    mean = lambda key, m: float(np.mean([r[key][m] for r in rows]))  # noqa: E731
    out = {
        "run": args.run,
        "method": args.method,
        "mean_weighted": {m: mean("weighted", m) for m in (args.method, "hm3")},
        "mean_tchebycheff": {m: mean("tchebycheff", m) for m in (args.method, "hm3")},
        "hm3_weighted_higher_at": int(sum(r["weighted"]["hm3"] > r["weighted"][args.method] for r in rows)),
        "num_preferences": len(rows),
        "per_preference": rows,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
