"""AdaMerging's settings at the balanced preference, held out, on a built zoo (issue 19's diagnostic).

The AdaMerging paper (Yang et al. 2024) runs layer-wise AdaMerging for 500 Adam steps at 1e-3 from 0.3 on the
whole unlabelled test set; the run's defaults were 20 steps at 1e-2 on 32 search rows per task. This sweeps
(num_steps, learning_rate, calibration_rows) and prints, per setting, the mean held-out score as % of each
expert's own score, the entropy objective's first and last minibatch values, and the seconds per run, next to
task arithmetic at AdaMerging's starting point (every coefficient = init) and at the tuned baselines' scales.

    nice -n 10 python -m benchmarks.adamerging_sweep --config=experiments/configs/tiny8.py \
        --zoo=runs/tiny8_frozen/zoo --settings=20:1e-2:32,500:1e-3:210 --out=runs/adamerging_sweep.json

Calibration rows only ever come from the search split (`data_aware_menu.search_calibration`).

`--correlation_samples=N` also tests AdaMerging's premise (its paper's Fig. 2: lower prediction entropy goes with
higher accuracy): N merges at random layer-wise coefficients (every coefficient uniform in [0, 2 init], key
`--seed`) and task arithmetic at 11 scales in [0, 1] are scored on the search split, and the Spearman rank
correlation between each merge's balanced entropy objective (on the calibration rows) and its mean search score
is printed (negative = the premise holds), with the same per task.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time

import jax
import numpy as np


def _config(spec: str):
    path, _, variant = spec.partition(":")
    name = path.rsplit("/", 1)[-1].removesuffix(".py")
    if name not in ("tiny3", "tiny8"):
        raise ValueError(f"--config must be experiments/configs/tiny3.py or tiny8.py[:variant], got {spec!r}")
    return importlib.import_module(f"experiments.configs.{name}").get_config(variant or None)


def _parse(settings: str) -> list[tuple[int, float, int]]:
    out = []
    for item in settings.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3:
            raise ValueError(f"--settings: {item!r} is not num_steps:learning_rate:calibration_rows")
        out.append((int(parts[0]), float(parts[1]), int(parts[2])))
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--config",
        default="experiments/configs/tiny8.py",
        help="experiments/configs/{tiny3,tiny8}.py[:variant]",
    )
    p.add_argument(
        "--zoo", default="runs/tiny8_frozen/zoo", help="the built zoo directory (its fingerprint is checked)"
    )
    p.add_argument(
        "--settings",
        default="20:1e-2:32,100:1e-2:210,500:1e-3:210,500:3e-3:210",
        help="comma-separated num_steps:learning_rate:calibration_rows",
    )
    p.add_argument("--granularity", default="layer", choices=("task", "layer"))
    p.add_argument(
        "--seed", type=int, default=0, help="AdaMerging's minibatch key and the random merges' key"
    )
    p.add_argument(
        "--correlation_samples", type=int, default=0, help="random coefficient vectors of the check"
    )
    p.add_argument("--correlation_rows", type=int, default=210, help="calibration rows per task of the check")
    p.add_argument("--out", default="", help="write the results as JSON here")
    return p  # fmt: skip


def main(argv=None) -> dict:
    """Runs the sweep (module docstring); returns what `--out` would hold."""
    args = _parser().parse_args(argv)
    from hm3_jax import merging
    from hm3_jax.search import data_aware_menu
    from hm3_jax.search.problem import make_problem, score_params
    from hm3_jax.tasks import zoo as zoo_lib

    config = _config(args.config)
    zoo = zoo_lib.load_matching(config.zoo, args.zoo)
    problem = make_problem(zoo, config.engine.strategy, config.engine.chunk_size, config.engine.prefix_sharing,
                           search_examples=config.engine.get("search_examples") or None)  # fmt: skip
    K = problem.num_tasks
    pref = np.full(K, 1.0 / K)
    own = np.array([problem.source_scores["heldout"][k + 1][k] for k in range(K)])
    ada = config.param_level.data_aware.adamerging

    def row(name, params, extra):
        held = score_params(problem.engines["heldout"], problem.experts, params)
        search = score_params(problem.engines["search"], problem.experts, params)
        pct = 100 * held / np.where(own > 0, own, np.nan)  # an expert scoring 0 has no percentage
        print(f"{name:34s} held-out mean {held.mean():7.3f} ({np.nanmean(pct):5.1f}% of experts, "
              f"min {np.nanmin(pct):5.1f}%)"
              f"  search mean {search.mean():7.3f}  {extra}", flush=True)  # fmt: skip
        return {"name": name, "heldout": held.tolist(), "search": search.tolist(),
                "percent_of_expert": [None if np.isnan(p) else round(float(p), 2) for p in pct], **extra}  # fmt: skip

    results = []
    for scale in (float(ada.init), 0.5, 0.7, 1.0):
        merged = merging.merge("task_arithmetic", problem.base, problem.experts, scale=scale)
        results.append(row(f"task_arithmetic scale {scale}", merged, {}))
    key = jax.random.PRNGKey(args.seed)
    for num_steps, lr, rows in _parse(args.settings):
        hp = {"method": "adamerging", "granularity": args.granularity, "num_steps": num_steps,
              "learning_rate": lr, "init": float(ada.init), "batch_size": int(ada.batch_size),
              "calibration_rows": rows, "fisher_seed": 0, "num_samples": 1}  # fmt: skip
        data_aware_menu.statistics(problem, rows)  # the calibration's arrays, outside the timing
        t = time.perf_counter()
        res = data_aware_menu.run_adamerging(problem, pref, key, hp)
        jax.block_until_ready(res.merged)
        seconds = time.perf_counter() - t
        losses = np.asarray(res.losses)
        coeffs = np.concatenate([np.ravel(c) for c in jax.tree.leaves(res.coefficients)])
        extra = {"seconds": round(seconds, 1), "loss_first": float(losses[0]),
                 "loss_last10": float(losses[-10:].mean()), "coefficient_mean": float(coeffs.mean()),
                 "coefficient_range": [float(coeffs.min()), float(coeffs.max())]}  # fmt: skip
        results.append(row(f"adamerging {num_steps}x{lr:g} on {rows}", res.merged, extra))
    correlation = None
    if args.correlation_samples:
        correlation = _entropy_correlation(problem, float(ada.init), args)
    out = {"config": args.config, "own": own.tolist(), "results": results, "entropy_correlation": correlation}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


def _entropy_correlation(problem, init: float, args) -> dict:
    """Spearman correlation of the entropy objective and the search score over random merges (module docstring)."""
    from scipy import stats

    from hm3_jax import merging
    from hm3_jax.merging.adamerging import init_coefficients, prediction_entropy
    from hm3_jax.merging.calibration import row_weights
    from hm3_jax.search import data_aware_menu
    from hm3_jax.search.problem import score_params

    calibration = data_aware_menu.search_calibration(problem, args.correlation_rows)
    entropy_fns = [
        jax.jit(lambda p, c=c: prediction_entropy(c.forward_fn(p, c.inputs), row_weights(c)))
        for c in calibration
    ]
    K = problem.num_tasks
    base_coeffs = init_coefficients(problem.base, K, "layer", init)
    key = jax.random.PRNGKey(args.seed)
    coefficient_sets = [("task_arithmetic", s, jax.numpy.full((K,), s)) for s in np.linspace(0.0, 1.0, 11)]
    for i in range(args.correlation_samples):
        leaves, treedef = jax.tree.flatten(base_coeffs)
        keys = jax.random.split(jax.random.fold_in(key, i), len(leaves))
        drawn = [
            jax.random.uniform(k, x.shape, minval=0.0, maxval=2 * init)
            for k, x in zip(keys, leaves, strict=True)
        ]
        coefficient_sets.append(("random", i, jax.tree.unflatten(treedef, drawn)))
    entropies, scores = [], []
    for _, _, coeffs in coefficient_sets:
        merged = merging.merge_with_coefficients(problem.base, problem.experts, coeffs)
        entropies.append([float(f(merged)) for f in entropy_fns])
        scores.append(score_params(problem.engines["search"], problem.experts, merged).tolist())
    entropies, scores = np.asarray(entropies), np.asarray(scores)
    rho = stats.spearmanr(entropies.mean(1), scores.mean(1)).statistic
    per_task = [float(stats.spearmanr(entropies[:, k], scores[:, k]).statistic) for k in range(K)]
    print(f"entropy vs search score over {len(coefficient_sets)} merges: Spearman {rho:+.3f} (mean objective vs "
          f"mean score); per task {np.round(per_task, 3).tolist()}", flush=True)  # fmt: skip
    return {"spearman_mean": float(rho), "spearman_per_task": per_task, "entropies": entropies.tolist(),
            "search_scores": scores.tolist(), "kinds": [str(k) for k, _, _ in coefficient_sets]}  # fmt: skip


if __name__ == "__main__":
    main()
