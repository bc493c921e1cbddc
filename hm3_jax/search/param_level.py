"""HM3's upper level: a parameter-space merged model Theta(lambda) per preference (HM3_SPEC "Parameter space").

Two variants, both reported:

* **paper**: `dare_ties` with the task weights set to the preference (HM3_SPEC Eq. 5),
  `Theta = base + sum_k lambda_k * M_k * DARE_p(delta_k)`, at fixed `density` and `drop_rate`.
* **tuned**: a search over the merge's hyperparameters — density, drop rate, a global scale and one weight
  multiplier per block — maximising the Tchebycheff scalarisation `g(x) = -max_k lambda_k |f_k(x) / z*_k - 1|`
  (`moo.tchebycheff`) of the normalised search-split scores (the ideal point of the normalised scores is 1 on every task), in two
  steps: (1) a coarse grid over the global scale (`scale_grid`) at the configured (density, drop rate) and at
  (1, 0) — the score is sharply peaked in the scale, and its best value moves with the preference (measured
  on tiny3: from 1.0 at lambda = (0.07, 0.9, 0.03) to 2.0 at (0.45, 0.1, 0.45), in units of the paper's
  weights lambda_k) — then (2) CMA-ES (evosax, Hansen 2016) from the best grid point over all 3 + L genes.
  The fitness is maximised, as every objective here; CMA-ES (evosax) minimises, so `run_cmaes` negates it
  when it tells evosax, and only there.

The genes and the tuned merge they decode to are in `merge_genes.py`.

With `data_aware.enabled` (issue 19) the tuned variant's menu also holds the data-aware merges and TSV-M
(`data_aware_menu.py`): RegMean and RegMean++ over an alpha grid, Fisher merging, TSV-M over a scale grid and layer-wise
AdaMerging, fitted on prompts of the SEARCH split only. Each is scored like every other candidate (search
scores, the same Tchebycheff fitness) after the grid and CMA-ES, and replaces their best only if strictly better.
The experts' Grams and Fishers are computed once per run; their calibration passes are charged to the first
preference, each AdaMerging and RegMean++ run to its own (`entry["tuned"]["calibration_passes"]`, `calibration_cost`).
Switched off (the default), nothing of it runs and the entries are what they were without it.

With `confirm_top = M > 0` and a capped search split (`engine.search_examples`: the "search_full" engine exists),
the tuned variant's answer is confirmed as the architecture level's (`arch.confirm_top`): the M best distinct
candidates by their capped-split fitness (the paper's setting, the grid, CMA-ES and the menu alike) are re-scored
on the WHOLE search split and the best there is the answer (`problem.confirm_params`; charged M x
`full_search_cost` evaluations; `entry["tuned"]["confirm"]`). The maximum of ~20 fitnesses on 100 examples per
task is biased upward (the winner's curse): with the data-aware menu, whose candidates replace the former answer
only when better on the capped split, tiny3's held-out hypervolume over 15 preferences fell (0.743 -> 0.717,
docs/merging.md). Without a cap it does nothing.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from hm3_jax import merging
from hm3_jax.moo import scalarize
from hm3_jax.search import data_aware_menu
from hm3_jax.search.merge_genes import decode_genes, initial_genes, tuned_merge
from hm3_jax.search.problem import Problem, confirm_params, score_params


def paper_merge(problem: Problem, preference, key: jax.Array, density: float, drop_rate: float) -> dict:
    """Theta(lambda): DARE-TIES with weights = preference (HM3_SPEC Eq. 5)."""
    return merging.hm3_merge(
        problem.base,
        problem.experts,
        list(np.asarray(preference, np.float64)),
        key,
        density=density,
        drop_rate=drop_rate,
    )


def tchebycheff_normalised(problem: Problem, scores: np.ndarray, preference) -> float:
    """`moo.tchebycheff` of the normalised search-split scores, `-max_k lambda_k |f_k / z*_k - 1|` (maximised)."""
    return _tchebycheff(problem.normalise(scores, "search"), preference)


def _tchebycheff(f, preference) -> float:
    """`tchebycheff_normalised` of normalised scores f [K] (ideal point 1 on every task)."""
    f = jnp.asarray(f)
    return float(scalarize.tchebycheff(f, jnp.asarray(preference), jnp.ones_like(f)))


def _evaluate(problem: Problem, preference, merge_key: jax.Array, hp: dict) -> tuple[float, list]:
    """(Tchebycheff fitness, raw search scores) of the tuned merge with hyperparameters `hp`."""
    scores = score_params(
        problem.engines["search"], problem.experts, tuned_merge(problem, preference, merge_key, hp)
    )
    return tchebycheff_normalised(problem, scores, preference), scores.tolist()


def scale_grid_search(
    problem: Problem, preference, merge_key: jax.Array, *, settings, scales, record=None
) -> dict:
    """Step (1) of the tuned variant: every (density, drop rate[, sign election]) of `settings` x every scale.
    `record(fitness, hparams, search scores)` (optional) sees every evaluated candidate.

    Returns: {"hparams", "fitness", "search", "evaluations", "grid": [[density, drop, scale, election,
    fitness], ...]}.
    """
    L = problem.config.num_layers
    best, grid = {"fitness": -np.inf}, []
    for setting in settings:
        density, drop = setting[:2]
        elect = bool(setting[2]) if len(setting) > 2 else True
        for scale in scales:
            hp = {**decode_genes(initial_genes(density, drop, L, scale), L), "sign_election": elect}
            fit, search = _evaluate(problem, preference, merge_key, hp)
            if record is not None:
                record(fit, hp, search)
            grid.append([hp["density"], hp["drop_rate"], hp["scale"], float(elect), fit])
            if fit > best["fitness"]:
                best = {"fitness": fit, "hparams": hp, "search": search}
    return {**best, "evaluations": len(grid), "grid": grid}


def run_cmaes(
    problem: Problem,
    preference,
    key: jax.Array,
    *,
    x0: np.ndarray,
    population_size: int,
    num_generations: int,
    sigma: float = 0.5,
    merge_key: jax.Array | None = None,
    sign_election: bool = True,
    record=None,
) -> dict:
    """Step (2): CMA-ES over the 3 + L merge genes from `x0` for one preference (search split only).

    `merge_key` fixes the DARE masks of every candidate (default: derived from `key`), so candidates differ
    only in their hyperparameters; `sign_election` (not a gene) is the starting point's; `record` as in
    `scale_grid_search`. Returns:
    {"hparams", "search", "fitness", "history" (best fitness per generation), "evaluations"}.
    """
    from evosax.algorithms import CMA_ES

    L = problem.config.num_layers
    x0 = np.asarray(x0, np.float32)
    strategy = CMA_ES(population_size=population_size, solution=jnp.zeros_like(x0))
    es_params = strategy.default_params.replace(std_init=sigma)
    key_init, key_es, key_merge = jax.random.split(key, 3)
    merge_key = key_merge if merge_key is None else merge_key
    state = strategy.init(key_init, jnp.asarray(x0), es_params)
    ask, tell = jax.jit(strategy.ask), jax.jit(strategy.tell)
    best = {"fitness": -np.inf}
    history, evaluations = [], 0
    for gen in range(num_generations):
        key_es, key_ask, key_tell = jax.random.split(key_es, 3)
        population, state = ask(key_ask, state, es_params)
        fitness = []
        for x in np.asarray(population):
            hp = {**decode_genes(x, L), "sign_election": bool(sign_election)}
            fit, search = _evaluate(problem, preference, merge_key, hp)
            if record is not None:
                record(fit, hp, search)
            evaluations += 1
            fitness.append(fit)
            if fit > best["fitness"]:
                best = {"fitness": fit, "hparams": hp, "search": search}
        # evosax minimises: the maximised fitness is negated here, and only here
        state, _ = tell(
            key_tell, population, jnp.asarray([-f for f in fitness], jnp.float32), state, es_params
        )
        history.append(best["fitness"])
        logging.info(
            "param-level CMA-ES gen %d/%d: best Tchebycheff %.4f", gen + 1, num_generations, best["fitness"]
        )
    return {**best, "history": history, "evaluations": evaluations}


def run_param_level(problem: Problem, preferences: np.ndarray, key: jax.Array, cfg) -> list[dict]:
    """Theta(lambda) for every preference: the paper's merge, and the tuned merge when enabled.

    Args:
      problem: the Problem; preferences: [N, K]; key: PRNG key (split per preference).
      cfg: `config.param_level` (density, drop_rate, scale_grid, task_arithmetic_grid, cmaes.{enabled,
        population_size, num_generations, sigma}). The scale grid runs at the configured (density, drop rate),
        at (1, 0) and, with `task_arithmetic_grid` (default True), at (1, 0) without sign election, i.e. task
        arithmetic: the upper level chooses among existing merging methods, as HM3_SPEC's parameter space.
      With `cfg.data_aware.enabled` the data-aware menu (module docstring; `data_aware_menu.candidates`) joins
      the tuned variant's candidates; `cfg.confirm_top` (default 0) confirms the answer on the whole search
      split (module docstring).
    Returns: one JSON-able dict per preference with the merge keys and hyperparameters, search and heldout
      scores of each variant, and the number of model evaluations each spent. The tuned variant is the best
      of the paper's setting, the scale grid, CMA-ES (and the data-aware menu) under the Tchebycheff fitness
      on the search split; with the menu its entry also has "menu" ([[hparams without coefficients, fitness],
      ...]), "without_menu" and "calibration_passes" ({"forward_rows", "backward_rows"}).
    """
    out = []
    keys = jax.random.split(key, len(preferences))
    L = problem.config.num_layers
    scales = tuple(cfg.get("scale_grid", ()) or ())
    menu = cfg.get("data_aware")
    menu = menu if menu is not None and menu.get("enabled", False) else None
    if menu is not None and not cfg.cmaes.enabled:
        raise ValueError(
            "param_level.data_aware.enabled extends the tuned variant's menu: it needs "
            "param_level.cmaes.enabled = True (or set data_aware.enabled = False)"
        )
    # The menu's keys (AdaMerging's minibatches) come from their own branch of `key`: the keys of everything
    # else are those of a run without the menu.
    menu_key = jax.random.fold_in(key, 0x6D656E75)
    for i, (pref, k) in enumerate(zip(preferences, keys, strict=True)):
        start = time.perf_counter()
        merge_key, cma_key = jax.random.split(k)
        merged = paper_merge(problem, pref, merge_key, cfg.density, cfg.drop_rate)
        paper_search = score_params(problem.engines["search"], problem.experts, merged)
        paper_heldout = score_params(problem.engines["heldout"], problem.experts, merged)
        # Only the paper model's scores are needed from here on: released (as the tuned model below), the level
        # holds one merged model at a time (the plan's `merge` counts one), not the paper's beside each candidate
        # and the last preference's beside the next one's merges.
        del merged
        entry = {
            "preference": np.asarray(pref).tolist(),
            "merge_key": np.asarray(merge_key).tolist(),
            "paper": {
                "hparams": {"density": cfg.density, "drop_rate": cfg.drop_rate},
                "search": paper_search.tolist(),
                "heldout": paper_heldout.tolist(),
                "evaluations": 1,
            },
        }
        if cfg.cmaes.enabled:
            x0 = initial_genes(cfg.density, cfg.drop_rate, L)
            best = {
                "fitness": tchebycheff_normalised(problem, paper_search, pref),
                "hparams": {**decode_genes(x0, L), "sign_election": True},
                "search": paper_search.tolist(),
            }
            grid = {"evaluations": 0, "grid": []}
            # every candidate scored, for the confirmation on the whole search split (`confirm_top`)
            seen = [(best["fitness"], best["hparams"], best["search"])]
            record = lambda fit, hp, search, seen=seen: seen.append((fit, hp, search))  # noqa: E731
            if scales:
                settings = [(cfg.density, cfg.drop_rate, True), (1.0, 0.0, True)]
                if cfg.get("task_arithmetic_grid", True):
                    settings.append((1.0, 0.0, False))
                grid = scale_grid_search(
                    problem, pref, merge_key, settings=settings, scales=scales, record=record
                )
                if grid["fitness"] > best["fitness"]:
                    best = {k: grid[k] for k in ("fitness", "hparams", "search")}
                    hp = best["hparams"]
                    x0 = initial_genes(hp["density"], hp["drop_rate"], L, hp["scale"])
            res = run_cmaes(
                problem,
                pref,
                cma_key,
                x0=x0,
                population_size=cfg.cmaes.population_size,
                num_generations=cfg.cmaes.num_generations,
                sigma=cfg.cmaes.get("sigma", 0.5),
                merge_key=merge_key,
                sign_election=best["hparams"]["sign_election"],
                record=record,
            )
            if res["fitness"] > best["fitness"]:
                best = {k: res[k] for k in ("fitness", "hparams", "search")}
            extra = {}
            if menu is not None:
                best, extra = _menu_step(
                    problem, pref, jax.random.fold_in(menu_key, i), menu, best, first=i == 0, record=record
                )
            confirm = confirm_params(
                problem,
                [(fit, _hparams_key(hp), (fit, hp, search)) for fit, hp, search in seen],
                int(cfg.get("confirm_top", 0)),
                rebuild=lambda c, pref=pref, mk=merge_key: merged_from_hparams(problem, pref, mk, c[1]),
                score_full=lambda m: score_params(problem.engines["search_full"], problem.experts, m),
                fitness=lambda f, pref=pref: _tchebycheff(f, pref),  # f: whole-split scores, normalised
            )
            tuned = None
            if confirm is not None:
                fit, hp, search = confirm.pop("payload")
                best, tuned = {"fitness": fit, "hparams": hp, "search": search}, confirm.pop("params")
                extra["evaluations"] = extra.get("evaluations", 0) + confirm["charged_evaluations"]
                extra["confirm"] = confirm
            if tuned is None:
                tuned = merged_from_hparams(problem, pref, merge_key, best["hparams"])
            tuned_heldout = score_params(problem.engines["heldout"], problem.experts, tuned)
            del tuned  # not into the next preference's merges
            entry["tuned"] = {
                "hparams": best["hparams"],
                "search": best["search"],
                "heldout": tuned_heldout.tolist(),
                "fitness": best["fitness"],
                "history": res["history"],
                "scale_grid": grid["grid"],
                "evaluations": grid["evaluations"] + res["evaluations"] + extra.get("evaluations", 0),
                **{k: v for k, v in extra.items() if k != "evaluations"},
            }
        entry["wall_seconds"] = time.perf_counter() - start
        logging.info("param level %d/%d done in %.1f s", i + 1, len(preferences), entry["wall_seconds"])
        out.append(entry)
    return out


def _hparams_key(hparams: dict) -> str:
    """A candidate's identity for `confirm_params` (its hyperparameters, coefficients included)."""
    return json.dumps(hparams, sort_keys=True, default=lambda x: np.asarray(x).tolist())


def _menu_step(
    problem: Problem, pref, key: jax.Array, cfg, best: dict, first: bool, record=None
) -> tuple[dict, dict]:
    """Scores the data-aware menu of one preference against `best` (the grid's and CMA-ES's best).

    Returns: (the new best, {"evaluations", "menu", "without_menu" (the best before the menu: hparams, fitness,
    search scores), "calibration_passes"}); the statistics' passes are charged
    when `first` (the first preference), each candidate's own passes (AdaMerging) to its preference.
    """
    passes = [data_aware_menu.shared_cost(problem, cfg)] if first else []
    scored, without = [], {k: best[k] for k in ("hparams", "fitness", "search")}
    for cand in data_aware_menu.candidates(problem, pref, key, cfg):
        scores = score_params(problem.engines["search"], problem.experts, cand.merged)
        fit = tchebycheff_normalised(problem, scores, pref)
        if record is not None:
            record(fit, cand.hparams, scores.tolist())
        passes.append(cand.passes)
        scored.append([{k: v for k, v in cand.hparams.items() if k != "coefficients"}, fit])
        logging.info("param-level menu %s: Tchebycheff %.4f", cand.hparams["method"], fit)
        if fit > best["fitness"]:
            best = {"fitness": fit, "hparams": cand.hparams, "search": scores.tolist()}
    total = data_aware_menu.add_passes(*passes)
    return best, {
        "evaluations": len(scored),
        "menu": scored,
        "without_menu": without,
        "calibration_passes": data_aware_menu.passes_dict(total),
    }


def calibration_cost(entries) -> dict:
    """Calibration passes of a whole parameter level ({"forward_rows", "backward_rows"}; 0 without the menu)."""
    parts = [e.get("tuned", {}).get("calibration_passes", {}) for e in entries]
    return {n: int(sum(p.get(n, 0) for p in parts)) for n in ("forward_rows", "backward_rows")}


def merged_from_hparams(problem: Problem, pref, key: jax.Array, hparams: dict) -> dict:
    """The tuned variant's model from its hyperparameters: a menu method's (`hparams["method"]`,
    `data_aware_menu.merge_from_hparams`) or else the DARE-TIES family's (`tuned_merge`)."""
    if "method" in hparams:
        return data_aware_menu.merge_from_hparams(problem, pref, key, hparams)
    return tuned_merge(problem, pref, key, hparams)


def merged_for(problem: Problem, entry: dict, variant: str) -> dict:
    """Rebuilds Theta(lambda) of a stored param-level entry (`variant` "paper" or "tuned")."""
    key = jnp.asarray(np.asarray(entry["merge_key"], np.uint32))
    pref = np.asarray(entry["preference"])
    if variant == "tuned" and "tuned" in entry:
        return merged_from_hparams(problem, pref, key, entry["tuned"]["hparams"])
    hp = entry["paper"]["hparams"]
    return paper_merge(problem, pref, key, hp["density"], hp["drop_rate"])
