"""The report's method table: one entry per reported method (its held-out points, budget and cost), the
report's extra sections, and every point rebuilt as a path model for the held-out bootstrap.

An entry is `{"points": [[K scores]], "evaluations", "wall_seconds", ...}`; a per-preference method also has
"preferences" (and "paths"), a set method (a path baseline) gets the index of its point closest to balanced.
"""

from __future__ import annotations

import numpy as np

from hm3_jax.pipeline import baseline_runs
from hm3_jax.pipeline import report as report_lib
from hm3_jax.pipeline.preference_models import LazySequence
from hm3_jax.search import heldout_bootstrap, param_level, path_scorer


def reference_methods(problem) -> dict:
    """The sources as methods: each expert and the base model, one held-out point each, no search cost."""
    methods = {}
    for k, t in enumerate(problem.tasks):
        methods[f"expert:{t}"] = {
            "points": [problem.source_scores["heldout"][k + 1].tolist()],
            "evaluations": 0,
            "wall_seconds": 0.0,
        }
    methods["base"] = {
        "points": [problem.source_scores["heldout"][0].tolist()],
        "evaluations": 0,
        "wall_seconds": 0.0,
    }
    return methods


def param_level_cost(param: list[dict]) -> tuple[int, float, dict]:
    """(model evaluations, wall seconds, calibration passes) of the whole parameter level."""
    evaluations = sum(e["paper"]["evaluations"] + e.get("tuned", {}).get("evaluations", 0) for e in param)
    return evaluations, sum(e["wall_seconds"] for e in param), param_level.calibration_cost(param)


def hm3_methods(
    prefs: np.ndarray, param: list[dict], variant: str, hm3: dict, no_param: dict | None, ablations: tuple
) -> dict:
    """HM3's entry and its ablations' ("hm3_no_param_level" when run, "hm3_no_arch_level" when asked for)."""
    param_evals, param_seconds, calibration = param_level_cost(param)
    methods = {
        "hm3": {
            "points": [r["heldout"] for r in hm3["per_preference"]],
            "paths": [r["path"] for r in hm3["per_preference"]],
            "preferences": prefs.tolist(),
            "evaluations": hm3["evaluations"] + param_evals,
            "path_evaluations": hm3["evaluations"],
            "model_evaluations": param_evals,
            "calibration_passes": calibration,
            "wall_seconds": hm3["wall_seconds"] + param_seconds,
        }
    }
    if no_param is not None:
        methods["hm3_no_param_level"] = {
            "points": [r["heldout"] for r in no_param["per_preference"]],
            "paths": [r["path"] for r in no_param["per_preference"]],
            "preferences": prefs.tolist(),
            "evaluations": no_param["evaluations"],
            "wall_seconds": no_param["wall_seconds"],
        }
    if "no_arch_level" in ablations:
        methods["hm3_no_arch_level"] = {
            "points": [e[variant]["heldout"] if variant in e else e["paper"]["heldout"] for e in param],
            "paper_points": [e["paper"]["heldout"] for e in param],
            "preferences": prefs.tolist(),
            "evaluations": param_evals,
            "calibration_passes": calibration,
            "wall_seconds": param_seconds,
        }
    return methods


def set_balanced_indices(problem, methods: dict) -> None:
    """Each method's "balanced_index": 0 for a per-preference method (the balanced preference is the first),
    for a set method its point with the largest smallest normalised score."""
    for m in methods.values():
        if m.get("preferences") is not None:
            m["balanced_index"] = 0
        elif len(m["points"]) > 1:
            pts = problem.normalise(np.asarray(m["points"]), "heldout")
            m["balanced_index"] = int(np.argmax(pts.min(1)))


def report_extra(
    problem, methods: dict, param: list[dict], hm3: dict, budget: int, alignment: str, fingerprint: str
) -> dict:
    """The report's sections beside the method table: balanced retention, ideal point, source scores, the
    budget, the parameter level's and the architecture level's summaries, the config's fingerprint."""
    K = problem.num_tasks
    param_evals, _, calibration = param_level_cost(param)
    expert_points = [problem.source_scores["heldout"][k + 1] for k in range(K)]
    return {
        "balanced": report_lib.balanced_retention(problem.tasks, methods["hm3"]["points"][0], expert_points),
        "ideal_search": problem.ideal["search"].tolist(),
        "source_scores": {s: v.tolist() for s, v in problem.source_scores.items()},
        "budget": {
            "path_evaluations_per_path_baseline": budget,
            "hm3_path_evaluations": hm3["evaluations"],
            "hm3_model_evaluations": param_evals,
            "hm3_calibration_passes": calibration,
        },
        "param_level_summary": [
            {
                "preference": e["preference"],
                "paper_heldout": e["paper"]["heldout"],
                "tuned_heldout": e.get("tuned", {}).get("heldout"),
                "tuned_hparams": e.get("tuned", {}).get("hparams"),
            }
            for e in param
        ],
        "arch_level_summary": {
            "arch_config": hm3["arch_config"],
            "alignment": alignment,
            "flops": hm3["flops"],
            "engine_seconds": hm3["engine_seconds"],
        },
        "config_fingerprint": fingerprint,
    }


def method_specs(
    problem, config, methods, param_keys, bank, np_shell, np_pool, hm3, no_param, evaluator
) -> dict:
    """{method: () -> [ModelSpec]}: every reported point of the run rebuilt as a path model (for the bootstrap).

    Mirrors how each point was made: parameter baselines re-merge with their chosen hyperparameters and the
    same keys (`baseline_runs.param_baseline_models`), path methods re-use their paths (and junction scales)
    over the experts' pool, HM3 its path over its preference's pool, the no-architecture-level ablation its
    Theta(lambda); each under the engine cache identity it was scored with, so the held-out engine's kept
    per-example statistics are read back instead of re-running the model.
    """
    D = problem.config.hidden_size
    ModelSpec = heldout_bootstrap.ModelSpec

    def spec(params):
        return heldout_bootstrap.params_spec(problem, params)

    out = {f"expert:{t}": (lambda k=k: [spec(problem.experts[k])]) for k, t in enumerate(problem.tasks)}
    out["base"] = lambda: [spec(problem.base)]
    for m in config.baselines.param_methods:
        out[m] = lambda m=m: mapped(
            spec, baseline_runs.param_baseline_models(problem, m, methods[m], param_keys[m])
        )
    for m in config.baselines.path_methods:
        out[m] = lambda m=m: [
            ModelSpec(
                np_shell,
                np_pool,
                np.asarray(p, np.int32),
                baseline_runs.junction_from_scales(sc, D),
                evaluator.pool_id,
            )
            for p, sc in zip(methods[m]["paths"], methods[m]["junction_scales"], strict=True)
        ]

    def hm3_spec(i):
        r = hm3["per_preference"][i]
        j = {k: np.asarray(v, np.float32) for k, v in r["junction"].items()} if "junction" in r else None
        return ModelSpec(
            bank.shells[i],
            bank.pools[i],
            np.asarray(r["path"], np.int32),
            j,
            path_scorer.scorer_pool_id("hm3", i),
        )

    out["hm3"] = lambda: LazySequence(len(hm3["per_preference"]), hm3_spec)
    out["hm3_no_param_level"] = lambda: [
        ModelSpec(
            np_shell,
            np_pool,
            np.asarray(r["path"], np.int32),
            None,
            evaluator.pool_id,  # the ablation's shared model (`arch_level.EXPERT_PATHS_ID`)
        )
        for r in no_param["per_preference"]
    ]
    K, L = len(problem.experts), problem.config.num_layers
    theta_path = (K * L + np.arange(L)).astype(
        np.int32
    )  # `params_spec` of Theta(lambda_i), on the bank's pool
    out["hm3_no_arch_level"] = lambda: LazySequence(
        len(bank), lambda i: ModelSpec(bank.shells[i], bank.pools[i], theta_path)
    )
    return {n: f for n, f in out.items() if n in methods}


def mapped(fn, seq) -> LazySequence:
    """`[fn(x) for x in seq]` computed item by item when read."""
    return LazySequence(len(seq), lambda i: fn(seq[i]))
