"""HM3's parameter level with and without the data-aware menu (issue 19), held out, on a built zoo.

Runs `param_level.run_param_level` once with `param_level.data_aware.enabled` (the run's preferences and keys, as
`run.run_hm3` draws them), and reads the level without the menu off the same entries (`without_menu`: the
grid's and CMA-ES's best, which is exactly what the level returns with the menu off, same keys). Every menu
candidate of every preference is also rebuilt and scored on the held-out split, so each method's own front
(its best candidate per preference by the search split's Tchebycheff) is reported too.

    nice -n 10 python -m benchmarks.data_aware_menu --zoo=runs/tiny3/zoo --preferences=5 \
        --out=runs/data_aware_menu.json

Prints per method the held-out scores at the balanced preference as % of each expert's own-task score, and the
hypervolume of its N held-out points (normalised by the held-out ideal point; reference 0, the same for all).
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "config", "experiments/configs/tiny3.py", "tiny3 config file[:variant] (its zoo and levels)"
)
flags.DEFINE_string("zoo", "runs/tiny3/zoo", "the built zoo directory (its fingerprint is checked)")
flags.DEFINE_integer(
    "preferences", 5, "number of preferences (row 0 balanced, then the run's Dirichlet draws)"
)
flags.DEFINE_string("out", "", "write the results as JSON here")


def _config(spec: str):
    from experiments.configs import tiny3

    path, _, variant = spec.partition(":")
    if not path.endswith("tiny3.py"):
        raise ValueError(f"--config must be experiments/configs/tiny3.py[:variant], got {spec!r}")
    return tiny3.get_config(variant or None)


def main(argv):
    del argv
    from hm3_jax import moo
    from hm3_jax.pipeline import run_config
    from hm3_jax.search import data_aware_menu, param_level
    from hm3_jax.search.problem import make_problem, score_params
    from hm3_jax.tasks import zoo as zoo_lib

    t0 = time.perf_counter()
    config = _config(FLAGS.config)
    zoo = zoo_lib.load_matching(config.zoo, FLAGS.zoo)
    problem = make_problem(zoo, config.engine.strategy, config.engine.chunk_size, config.engine.prefix_sharing,
                           search_examples=config.engine.get("search_examples") or None)  # fmt: skip
    K = problem.num_tasks
    config.preferences.num = FLAGS.preferences
    k_pref, k_param = jax.random.split(jax.random.PRNGKey(config.seed), 5)[:2]  # as run.run_hm3
    prefs = run_config.make_preferences(config.preferences, K, k_pref)
    cfg = config.param_level
    cfg.data_aware.enabled = True
    t = time.perf_counter()
    entries = param_level.run_param_level(problem, prefs, k_param, cfg)
    level_seconds = time.perf_counter() - t

    heldout = lambda params: score_params(problem.engines["heldout"], problem.experts, params)  # noqa: E731
    menu_key = jax.random.fold_in(k_param, 0x6D656E75)  # param_level.run_param_level's menu branch
    points = {"with_menu": [], "without_menu": []}
    per_method: dict[str, list] = {}
    for i, e in enumerate(entries):
        pref, key = np.asarray(e["preference"]), jax.random.fold_in(menu_key, i)
        merge_key = jax.numpy.asarray(np.asarray(e["merge_key"], np.uint32))
        points["with_menu"].append(e["tuned"]["heldout"])
        before = e["tuned"]["without_menu"]["hparams"]
        points["without_menu"].append(
            heldout(param_level.merged_from_hparams(problem, pref, merge_key, before)).tolist()
        )
        best: dict[str, tuple] = {}
        for cand in data_aware_menu.candidates(problem, pref, key, cfg.data_aware):
            search = score_params(problem.engines["search"], problem.experts, cand.merged)
            fit = param_level.tchebycheff_normalised(problem, search, pref)
            m = cand.hparams["method"]
            if m not in best or fit > best[m][0]:  # maximised (moo.tchebycheff)
                best[m] = (fit, heldout(cand.merged).tolist())
        for m, (_, h) in best.items():
            per_method.setdefault(m, []).append(h)
    own = np.array([problem.source_scores["heldout"][k + 1][k] for k in range(K)])
    ideal = problem.ideal["heldout"]
    summary = {}
    for name, pts in {**points, **per_method}.items():
        pts = np.asarray(pts)
        summary[name] = {
            "balanced_percent_of_expert": (100 * pts[0] / own).round(1).tolist(),
            "hypervolume": moo.hypervolume(pts / ideal, np.zeros(K)),
            "points": pts.tolist(),
        }
        logging.info("%s", name)
        print(f"{name:14s} balanced % of experts {summary[name]['balanced_percent_of_expert']}  "
              f"HV {summary[name]['hypervolume']:.4f}")  # fmt: skip
    winners = [e["tuned"]["hparams"].get("method", "dare_ties family") for e in entries]
    print("menu winners per preference:", winners)
    print("calibration passes:", param_level.calibration_cost(entries), f"level {level_seconds:.0f} s")
    out = {
        "preferences": np.asarray(prefs).tolist(),
        "summary": summary,
        "winners": winners,
        "calibration_passes": param_level.calibration_cost(entries),
        "model_evaluations": int(sum(e["paper"]["evaluations"] + e["tuned"]["evaluations"] for e in entries)),
        "level_seconds": level_seconds,
        "total_seconds": time.perf_counter() - t0,
        "entries": [{**e, "tuned": {k: v for k, v in e["tuned"].items() if k != "hparams"}} for e in entries],
    }
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    app.run(main)
