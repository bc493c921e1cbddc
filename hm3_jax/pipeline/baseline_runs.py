"""Every baseline of the HM3 paper on the run's Problem, at an evaluation budget equal to HM3's.

Parameter-space methods (task arithmetic, TIES, DARE-TIES, Consensus/TALL, PCB) give one merged model per
preference with task weights `K * lambda_k` (so the balanced preference is the methods' usual equal weights),
once at the papers' default hyperparameters ("default") and once with the hyperparameters tuned on the search
split ("tuned": a small grid per preference, chosen by the weighted sum of normalised search scores; its model
evaluations are counted). Reported points are the tuned ones; the defaults are kept in the entry.
The data-aware merges (RegMean, Fisher merging, AdaMerging; issue 19) run the same way on the search split's
prompts (`data_aware_menu`: the experts' Grams and Fishers computed once per run and shared with HM3's upper
level); their entries also hold "calibration_passes" (the statistics' forward/backward rows, counted once per
method as if it ran alone, plus every AdaMerging run's).

Path-space methods (HM3_SPEC "Baselines") search over the experts' blocks (no parameter-level model, as in
Sakana's data-flow-space merging) with the same shell as HM3's no-parameter-level ablation, on the search
split, through the same engine and cache as HM3: EA (CMA-ES) and DE per preference with `budget / N` path
evaluations each, MOEA (NSGA-II) and grid search with the whole budget. A method's points are its chosen
path per preference (EA, DE, grid) or its non-dominated search-split front, capped to N points (MOEA).
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import logging

from hm3_jax import baselines, merging
from hm3_jax.pipeline.preference_models import LazySequence
from hm3_jax.search import arch_level, data_aware_menu
from hm3_jax.search.problem import Problem, confirm_params, full_search_cost, score_params

# Papers' defaults: TA scaling 0.4 (Ilharco et al. 2023 use 0.3-0.5), TIES density 0.2 with disjoint mean
# (Yadav et al. 2023), DARE drop 0.9 (Yu et al. 2024) with TIES density 1, Consensus TALL lambda 0.4 with
# k = 2 (Wang et al. 2024), PCB density 0.2 (Du et al. 2024). The data-aware merges: RegMean alpha 0.9 (Jin et al.
# 2023), Fisher floor 1e-6 with one label draw per row (Matena & Raffel 2022), layer-wise AdaMerging from 0.3 in
# [0, 1] (Yang et al. 2024; 500 Adam steps at 1e-3 in the paper, here 20 at 1e-2 with 16 rows per task), each on
# 32 search prompts per task.
# Each expert's own 8-token greedy answer continues its prompts (merging/continuation.py; language models only).
CALIBRATION = {"calibration_rows": 32, "fisher_seed": 0, "num_samples": 1, "continuation_tokens": 8}
ADAMERGING = {"granularity": "layer", "num_steps": 20, "init": 0.3, "batch_size": 16, **CALIBRATION}
PARAM_DEFAULTS = {
    "task_arithmetic": {"scale": 0.4},
    "ties": {"density": 0.2, "scale": 1.0},
    "dare_ties": {"density": 1.0, "drop_rate": 0.9, "scale": 1.0, "normalize": True},
    "consensus": {"scale": 0.4},
    "pcb": {"density": 0.2, "scale": 1.0},
    "tsv": {"scale": 1.0},  # TSV-M (Gargiulo et al. 2025): rank 1/K of each task matrix, decorrelated
    "regmean": {"alpha": 0.9, **CALIBRATION},
    "fisher": {"floor": 1e-6, **CALIBRATION},
    "adamerging": {"learning_rate": 1e-2, **ADAMERGING},
    "regmean_plusplus": {"alpha": 0.9, **CALIBRATION},
}
PARAM_GRIDS = {
    # Additive methods: with K task vectors summed the useful scale falls like 1/K (tiny8, K = 8: held out 69.9 at
    # 0.05, 66.7 at 0.1, 57.1 at 0.2, 51.4 at 0.3), so the grid reaches down to 0.1 (session 16; it began at 0.3).
    "task_arithmetic": [{"scale": s} for s in (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)],
    "ties": [{"density": d, "scale": s} for d in (0.2, 0.5) for s in (0.7, 1.0)],
    "dare_ties": [
        {"density": 1.0, "drop_rate": p, "scale": s, "normalize": True}
        for p in (0.3, 0.7)
        for s in (0.7, 1.0)
    ],
    "consensus": [{"scale": s} for s in (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)],
    "pcb": [{"density": d, "scale": s} for d in (0.2, 0.5) for s in (0.7, 1.0)],
    "tsv": [{"scale": s} for s in (0.5, 0.8, 1.0, 1.3)],
    "regmean": [{"alpha": a, **CALIBRATION} for a in (0.3, 0.5, 0.7, 0.9)],
    "fisher": [{"floor": f, **CALIBRATION} for f in (1e-8, 1e-6, 1e-4, 1e-2)],
    "adamerging": [{"learning_rate": lr, **ADAMERGING} for lr in (3e-3, 1e-2, 3e-2)],
    "regmean_plusplus": [{"alpha": a, **CALIBRATION} for a in (0.3, 0.5, 0.7, 0.9)],
}
DATA_AWARE = data_aware_menu.DATA_AWARE
# Each baseline's PRNG key is `fold_in(k_base, index)` with its index in these fixed tables (path methods from
# 100 on), not its position in `config.baselines.*_methods`: a method's randomness (DARE's drop masks, AdaMerging's
# minibatches, the path searches) must not move when another method is added to or dropped from the list, or a
# stage copied between two runs stops reproducing (issue 19: run_c listed `tsv` before `adamerging`, which moved
# AdaMerging's key from index 7, the one its run_b stage was made with, to 8). The order is the default lists'
# (hm3_common's five, then the data-aware three as run_b ran them), TSV-M after; append new methods at the end.
PARAM_KEY_ORDER = (
    "task_arithmetic",
    "ties",
    "dare_ties",
    "consensus",
    "pcb",
    "regmean",
    "fisher",
    "adamerging",
    "tsv",
    "regmean_plusplus",
)
PATH_KEY_ORDER = ("ea", "moea", "grid_search", "differential_evolution")
PATH_KEY_OFFSET = 100


def baseline_key(k_base: jax.Array, method: str) -> jax.Array:
    """The PRNG key of baseline `method`: `fold_in(k_base, i)`, i its index in `PARAM_KEY_ORDER`, or
    `PATH_KEY_OFFSET` + its index in `PATH_KEY_ORDER`; the same whatever other methods a run lists.

    Raises:
      ValueError naming `method` when it is in neither table.
    """
    if method in PARAM_KEY_ORDER:
        return jax.random.fold_in(k_base, PARAM_KEY_ORDER.index(method))
    if method in PATH_KEY_ORDER:
        return jax.random.fold_in(k_base, PATH_KEY_OFFSET + PATH_KEY_ORDER.index(method))
    raise ValueError(
        f"baseline {method!r} has no key index; known: {PARAM_KEY_ORDER + PATH_KEY_ORDER} "
        "(a new baseline is appended to baseline_runs.PARAM_KEY_ORDER or PATH_KEY_ORDER)"
    )


def baseline_keys(k_base: jax.Array, methods) -> dict:
    """{method: `baseline_key(k_base, method)`} for the run's list `methods`."""
    return {m: baseline_key(k_base, m) for m in methods}


def param_merge(problem: Problem, method: str, preference, key, hparams: dict) -> dict:
    """The merged params of parameter-space `method` at `preference` [K]: expert k weighted K * lambda_k (so the
    balanced preference gives every expert weight 1, the methods' default), `hparams` as the method takes them."""
    if method in DATA_AWARE:  # the same weights K * lambda_k (float32), normalised by the methods
        return data_aware_menu.merge_from_hparams(problem, preference, key, {"method": method, **hparams})
    K = problem.num_tasks
    weights = [float(K * lam) for lam in preference]
    return merging.merge(method, problem.base, problem.experts, key, weights=weights, **hparams)


def calibration_cost(problem: Problem, method: str, preferences, grid) -> dict:
    """Calibration passes of a data-aware baseline over `preferences` with `grid` per preference: the shared
    statistics once (as if the method ran alone), plus each AdaMerging run's."""
    parts = [data_aware_menu.NO_PASSES]
    if method in DATA_AWARE:
        hp = grid[0]
        stats = data_aware_menu.statistics(
            problem,
            hp["calibration_rows"],
            hp["fisher_seed"],
            hp["num_samples"],
            hp.get("continuation_tokens", 0),
        )
        parts.append(stats.cost((method,)))
    if method == "adamerging":
        parts += [data_aware_menu.adamerging_passes(problem, p, hp) for p in preferences for hp in grid]
    if method == "regmean_plusplus":
        parts += [data_aware_menu.regmean_plusplus_passes(problem, p, hp) for p in preferences for hp in grid]
    return data_aware_menu.passes_dict(data_aware_menu.add_passes(*parts))


def run_param_baseline(
    problem: Problem, method: str, preferences, key, tune: bool = True, confirm_top: int = 0
) -> dict:
    """Default and tuned merges of `method` for every preference, scored on both splits (a data-aware method's
    entry also has "calibration_passes": `calibration_cost`, the default merges' runs included).

    With `confirm_top = M > 0` and a capped search split, the M best grid points by search-subset fitness are
    re-scored on the whole search split and the best there is chosen, as HM3's parameter level does
    (`param_level.confirm_top`, `problem.confirm_params`); charged to `evaluations`, kept in "confirm".
    """
    start = time.perf_counter()
    points, default_points, chosen, evaluations, confirms = [], [], [], 0, []
    for i, pref in enumerate(np.asarray(preferences)):
        k = jax.random.fold_in(key, i)
        default = param_merge(problem, method, pref, k, PARAM_DEFAULTS[method])
        default_points.append(score_params(problem.engines["heldout"], problem.experts, default).tolist())
        best, best_fit = PARAM_DEFAULTS[method], -np.inf
        grid = PARAM_GRIDS[method] if tune else [PARAM_DEFAULTS[method]]
        scored = []
        for j, hp in enumerate(grid):
            merged = param_merge(problem, method, pref, k, hp)
            s = score_params(problem.engines["search"], problem.experts, merged)
            evaluations += 1
            fit = float(problem.normalise(s, "search") @ pref)
            scored.append((fit, str(j), hp))
            if fit > best_fit:
                best, best_fit, best_model = hp, fit, merged
        confirm = confirm_params(
            problem,
            scored,
            confirm_top,
            rebuild=lambda hp, pref=pref, k=k: param_merge(problem, method, pref, k, hp),
            score_full=lambda m: score_params(problem.engines["search_full"], problem.experts, m),
            fitness=lambda f, pref=pref: float(f @ pref),
        )
        if confirm is not None:
            best, best_model = confirm.pop("payload"), confirm.pop("params")
            evaluations += confirm["charged_evaluations"]
            confirms.append(confirm)
        chosen.append(best)
        points.append(score_params(problem.engines["heldout"], problem.experts, best_model).tolist())
    extra = {}
    if method in DATA_AWARE:
        grid = PARAM_GRIDS[method] if tune else [PARAM_DEFAULTS[method]]  # as run above, default first
        extra["calibration_passes"] = calibration_cost(
            problem, method, np.asarray(preferences), [PARAM_DEFAULTS[method], *grid]
        )
    return {
        "points": points,
        "default_points": default_points,
        "hparams": chosen,
        "preferences": np.asarray(preferences).tolist(),
        "evaluations": evaluations,
        "wall_seconds": time.perf_counter() - start,
        **({"confirm": confirms} if confirms else {}),
        **extra,
    }


def param_baseline_models(problem: Problem, method: str, result: dict, key) -> LazySequence:
    """The merged models behind `run_param_baseline(problem, method, prefs, key)`'s reported points, rebuilt
    from its stored preferences and chosen hyperparameters with the same per-preference keys; a lazy sequence
    (item i is merged when read, so the N models are never held at once)."""
    prefs = np.asarray(result["preferences"], np.float32)  # as run: float32 preference rows
    hparams = list(result["hparams"])
    if len(hparams) != len(prefs):
        raise ValueError(f"{method}: {len(prefs)} preferences but {len(hparams)} hyperparameter sets")
    return LazySequence(
        len(prefs), lambda i: param_merge(problem, method, prefs[i], jax.random.fold_in(key, i), hparams[i])
    )


# The path baselines whose DFS genome has scale genes (`use_scales`, their default; grid search has none): every
# path they score carries junction rows (`junction_from_scales`), a program of its own (`program_memory.path_variants`).
JUNCTION_PATH_METHODS = ("ea", "moea", "differential_evolution")


def junction_from_scales(scales, hidden_size: int):
    """A path baseline's per-step junction scales [..., T] as a junction {"scale": [..., T, D] (each step's scale
    on every hidden unit), "shift": zeros}; None stays None (no junction)."""
    if scales is None:
        return None
    s = np.asarray(scales, np.float32)
    return {
        "scale": np.repeat(s[..., None], hidden_size, -1),
        "shift": np.zeros(s.shape + (hidden_size,), np.float32),
    }


class ExpertPathEvaluator:
    """`evaluate_fn(paths, junction_scales) -> normalised search scores` over the experts-only pool.

    Every scored (path, scales) is kept in `records` (cleared by the caller between preferences), so a method's
    best candidates can be confirmed on the whole search split (`confirm`).
    """

    def __init__(self, problem: Problem, shell, pool, tag: str = arch_level.EXPERT_PATHS_ID):
        self.problem, self.shell, self.pool = problem, shell, pool
        self.pool_id = tag  # the engines' cache identity of (shell, pool) on every split (`model_spec`)
        self.search = problem.engines["search"].with_model(shell, pool, pool_id=tag)
        self.heldout = problem.engines["heldout"].with_model(shell, pool, pool_id=tag)
        self.full = None
        if "search_full" in problem.engines:
            self.full = problem.engines["search_full"].with_model(shell, pool, pool_id=tag)
        self.records: dict = {}

    def __call__(self, paths, junction_scales=None):
        paths = np.asarray(paths, np.int32)
        j = junction_from_scales(junction_scales, self.problem.config.hidden_size)
        scores = self.problem.normalise(self.search.evaluate(paths, j).scores, "search")
        sc = None if junction_scales is None else np.asarray(junction_scales, np.float32)
        for r, p in enumerate(paths):
            row = None if sc is None else sc[r]
            key = (p.tobytes(), None if row is None else row.tobytes())
            self.records[key] = (p, row, scores[r])
        return scores

    def confirm(self, preference, top: int) -> dict | None:
        """The `top` recorded candidates by weighted sum on the search subset, re-scored on the whole search
        split; returns the best there ({"path", "scales", "charged_evaluations", ...}), or None when the
        search split is not capped."""
        if self.full is None or top < 1 or not self.records:
            return None
        pref = np.asarray(preference, np.float64)
        recs = list(self.records.values())
        sub = np.array([r[2] @ pref for r in recs])
        order = np.argsort(-sub, kind="stable")[:top]
        paths = np.stack([recs[i][0] for i in order])
        scales = [recs[i][1] for i in order]
        has_scales = any(x is not None for x in scales)
        full = np.zeros((len(order), self.problem.num_tasks))
        for r, (p, x) in enumerate(zip(paths, scales, strict=True)):  # one row each: scales may be None
            j = junction_from_scales(None if x is None else x[None], self.problem.config.hidden_size)
            full[r] = self.full.evaluate(p[None], j).scores[0]
        full_fit = self.problem.normalise(full, "search_full") @ pref
        best = int(np.argmax(full_fit))
        return {
            "path": paths[best],
            "scales": scales[best] if has_scales else None,
            "subset_fitness": sub[order].tolist(),
            "full_fitness": full_fit.tolist(),
            "charged_evaluations": int(len(order) * full_search_cost(self.problem)),
        }

    def confirm_units(self, top: int) -> int:
        """Budget charged per confirmation of `top` candidates (0 when the search split is not capped)."""
        if self.full is None or top < 1:
            return 0
        return int(top * full_search_cost(self.problem))

    def heldout_raw(self, paths, junction_scales=None):
        j = junction_from_scales(junction_scales, self.problem.config.hidden_size)
        return self.heldout.evaluate(np.asarray(paths, np.int32), j).scores


def run_path_baseline(
    problem: Problem,
    method: str,
    preferences,
    key,
    evaluator: ExpertPathEvaluator,
    t_max: int,
    budget: int,
    settings: dict | None = None,
    confirm_top: int = 0,
) -> dict:
    """One path-space baseline at `budget` path evaluations in total.

    With `confirm_top = M > 0` (and a capped search split) the per-preference methods (EA, DE, grid search)
    choose, as HM3 does, the best of their M best candidates re-scored on the whole search split; each
    confirmation is charged to the budget (EA and DE search with what is left). MOEA returns its front as is.
    """
    start = time.perf_counter()
    prefs = np.asarray(preferences)
    N = len(prefs)
    geometry = (problem.num_tasks, problem.config.num_layers, t_max)
    settings = dict(settings or {})
    chosen_paths, chosen_scales, evaluations, extra = [], [], 0, {}
    units = evaluator.confirm_units(confirm_top) if method != "moea" else 0
    confirms = []
    if method in ("ea", "differential_evolution"):
        run = baselines.run_ea if method == "ea" else baselines.run_de
        per = max(1, (budget - N * units) // N)
        for i, pref in enumerate(prefs):
            evaluator.records = {}
            res = run(jax.random.fold_in(key, i), evaluator, geometry, pref, per, progress=False, **settings)
            path = np.asarray(res["best_path"])
            sc = None if res.get("best_junction_scales") is None else np.asarray(res["best_junction_scales"])
            c = evaluator.confirm(pref, confirm_top)
            if c is not None:
                path, sc = c["path"], c["scales"]
                evaluations += c["charged_evaluations"]
                confirms.append({k: v for k, v in c.items() if k not in ("path", "scales")})
            chosen_paths.append(path)
            chosen_scales.append(sc)
            evaluations += int(res["evaluations"])
    elif method == "grid_search":
        evaluator.records = {}
        res = baselines.run_grid_search(
            key,
            evaluator,
            geometry,
            max(1, budget - N * units),
            preferences=prefs,
            progress=False,
            **settings,
        )
        evaluations = int(res["evaluations"])
        for b, pref in zip(res["best_per_preference"], prefs, strict=True):
            path = np.asarray(b["path"])
            c = evaluator.confirm(pref, confirm_top)
            if c is not None:
                path = c["path"]
                evaluations += c["charged_evaluations"]
                confirms.append({k: v for k, v in c.items() if k not in ("path", "scales")})
            chosen_paths.append(path)
            chosen_scales.append(None)
        extra = {"family_size": int(res["family_size"]), "exhaustive": bool(res["exhaustive"])}
    elif method == "moea":
        res = baselines.run_moea(key, evaluator, geometry, budget, progress=False, **settings)
        front = res["front"]
        scores = np.asarray(front["scores"])
        order = np.argsort(-scores.sum(1))[:N]  # cap to N points, best mean first
        for j in order:
            chosen_paths.append(np.asarray(front["paths"][j]))
            sc = front.get("junction_scales")
            chosen_scales.append(None if sc is None else np.asarray(sc[j]))
        evaluations = int(res["evaluations"])
    else:
        raise ValueError(f"unknown path baseline {method!r}")
    points = []
    for p, s in zip(chosen_paths, chosen_scales, strict=True):
        points.append(evaluator.heldout_raw(p[None], None if s is None else s[None])[0].tolist())
    logging.info("%s: %d evaluations in %.1f s", method, evaluations, time.perf_counter() - start)
    return {
        "points": points,
        "paths": [p.tolist() for p in chosen_paths],
        "junction_scales": [None if s is None else s.tolist() for s in chosen_scales],
        "preferences": prefs.tolist() if method != "moea" else None,
        "evaluations": evaluations,
        "wall_seconds": time.perf_counter() - start,
        **({"confirm": confirms} if confirms else {}),
        **extra,
    }
