"""The data-aware merges as candidates of HM3's upper level and as parameter baselines (issue 19).

RegMean, RegMean++, Fisher merging and AdaMerging (`hm3_jax.merging`, `data_aware.py`) fit a merge on unlabelled
inputs of each expert's task. Here those inputs come from the run's Problem, and only from its SEARCH split
(`problem.objectives["search"]`; the held-out objectives are never read):

* `search_calibration(problem, rows)`: per objective k one `Calibration` of the first `rows` real examples of
  each of its tasks, PROMPT tokens only. A teacher-forced row `[bos] + prompt + target` keeps its prompt, its
  target tokens are overwritten with id 0 and get token weight 0 (the model is causal: nothing at a prompt
  position sees a later position, so the rows carry no label and the value written is irrelevant); a generation
  row is its left-padded prompt with its mask. Inputs are `[N, 2, S]` int32 (ids, attention mask), token weights
  `[N, S]` float32 (1 on prompt tokens), forward `models.apply(config, params, ids, mask)` -> logits `[N, S, V]`.
  An image objective (metric "accuracy", tiny8: a fixed linear head on the encoder's CLS feature) gives its first
  `rows` images `[N, C, H, W]` (no labels), every row weight 1, and forward `head_forward`: the logits `[N, C]`
  of the objective's own frozen head, as AdaMerging's and Fisher merging's CLIP setting.
  `search_calibration(problem, rows, continuation_tokens=T)`: every token row of task k then continues with
  expert k's own T-token greedy answer (`merging.own_continuation`, weighted up to its first EOS; still no
  label), so the statistics also see the positions where the expert answers; the run's default is T = 8
  (`param_level.data_aware.continuation_tokens`, `baseline_runs.CALIBRATION`), a stored entry without the key
  is prompts only.
* `SearchStatistics`: the calibration and, computed once on first use and then reused by every preference and
  every method, each expert's input Grams (RegMean) and diagonal Fisher (Fisher merging; labels drawn from the
  expert's own predictions with the key `PRNGKey(fisher_seed)`). `statistics(problem, rows, fisher_seed,
  num_samples)` keeps the last Problem's statistics, so the parameter level, the baselines and every rebuild of a
  merged model (`merge_from_hparams`) share one computation per run.
* `merge_from_hparams(problem, preference, key, hparams)`: the merged model of one candidate from its JSON-able
  hyperparameters (`hparams["method"]` in `MENU_METHODS`, plus everything needed to rebuild it: calibration
  rows, Fisher seed, AdaMerging's learned coefficients), so a stored parameter-level entry rebuilds its model.
* `candidates(problem, preference, key, cfg)`: the menu of one preference (`param_level.run_param_level`
  scores each with `score_params` and the Tchebycheff fitness, as the tuned variant's other candidates).

Weights: expert k gets `K * lambda_k` (float32), as the parameter baselines'; RegMean, Fisher merging and
AdaMerging normalise them, TSV-M takes them as its task weights (balanced = the paper's TSV-M).

Cost (`CalibrationPasses`, in calibration rows): the Grams one forward per row of every expert (RegMean++ L + 1
more per merge, `regmean_plusplus_passes`), the Fishers one
forward and `num_samples` backwards per row; AdaMerging its own steps (`merging.calibration_passes`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax import merging
from hm3_jax.merging import CalibrationPasses
from hm3_jax.search.calibration_rows import (  # noqa: F401  (the menu's calibration, re-exported)
    continuation_passes,
    head_forward,
    lm_forward,
    objective_calibration,
    search_calibration,
)
from hm3_jax.search.problem import Problem

# Methods a parameter-level candidate (or a baseline) can name in its hyperparameters.
MENU_METHODS = ("regmean", "fisher", "adamerging", "tsv", "regmean_plusplus")
DATA_AWARE = ("regmean", "fisher", "adamerging", "regmean_plusplus")
GRAM_METHODS = ("regmean", "regmean_plusplus")  # the methods that use the experts' own Grams
NO_PASSES = CalibrationPasses(0, 0)


def add_passes(*parts: CalibrationPasses) -> CalibrationPasses:
    """Elementwise sum of calibration costs."""
    return CalibrationPasses(sum(p.forward_rows for p in parts), sum(p.backward_rows for p in parts))


def passes_dict(p: CalibrationPasses) -> dict:
    return {"forward_rows": int(p.forward_rows), "backward_rows": int(p.backward_rows)}


class SearchStatistics:
    """The search-split calibration of a Problem and its per-expert Grams and Fishers, each computed on first use.

    `cost(methods)` is what computing the statistics of `methods` costs (in calibration rows), whether or not
    they were already computed.
    """

    def __init__(
        self,
        problem: Problem,
        rows: int,
        fisher_seed: int = 0,
        num_samples: int = 1,
        continuation_tokens: int = 0,
    ):
        self.problem, self.rows = problem, int(rows)
        self.fisher_seed, self.num_samples = int(fisher_seed), int(num_samples)
        self.continuation_tokens = int(continuation_tokens)
        self.calibration = search_calibration(problem, rows, self.continuation_tokens)
        self._grams = self._fishers = None

    def grams(self) -> list:
        if self._grams is None:
            self._grams = merging.model_grams(self.problem.experts, self.calibration)
        return self._grams

    def fishers(self) -> list:
        if self._fishers is None:
            key = jax.random.PRNGKey(self.fisher_seed)
            self._fishers = merging.model_fishers(
                key, self.problem.experts, self.calibration, num_samples=self.num_samples
            )
        return self._fishers

    def cost(self, methods) -> CalibrationPasses:
        """Calibration passes of the statistics `methods` need (Grams for regmean, Fishers for fisher), and of
        the continuation of the calibration rows when any of them does."""
        parts = [NO_PASSES]
        if set(DATA_AWARE) & set(methods):
            parts.append(continuation_passes(self.calibration, self.continuation_tokens))
        if set(GRAM_METHODS) & set(methods):
            parts.append(merging.calibration_passes("regmean", self.calibration))
        if "fisher" in methods:
            parts.append(merging.calibration_passes("fisher", self.calibration, num_samples=self.num_samples))
        return add_passes(*parts)


_LAST: list = []  # [(sources, SearchStatistics)]: the last statistics computed (one run per process)


def statistics(
    problem: Problem, rows: int, fisher_seed: int = 0, num_samples: int = 1, continuation_tokens: int = 0
) -> SearchStatistics:
    """The `SearchStatistics` of `problem` with these settings, shared by every caller in the process while the
    same base, experts and search objectives are used (`problem._replace(...)` copies keep sharing them; the
    objects are held, so their identities are not reused)."""
    sources = (problem.base, problem.experts, problem.objectives["search"])
    settings = (int(rows), int(fisher_seed), int(num_samples), int(continuation_tokens))
    for held, stats in _LAST:
        same_sources = all(a is b for a, b in zip(held, sources, strict=True))
        held_settings = (stats.rows, stats.fisher_seed, stats.num_samples, stats.continuation_tokens)
        if same_sources and settings == held_settings:
            return stats
    stats = SearchStatistics(problem, rows, fisher_seed, num_samples, continuation_tokens)
    _LAST[:] = [(sources, stats)]
    return stats


def preference_weights(problem: Problem, preference) -> np.ndarray:
    """Expert weights `K * lambda` (float32) [K]."""
    return np.float32(problem.num_tasks) * np.asarray(preference, np.float32)


def _stats_for(problem: Problem, hp: dict) -> SearchStatistics:
    return statistics(
        problem,
        hp["calibration_rows"],
        hp.get("fisher_seed", 0),
        hp.get("num_samples", 1),
        hp.get("continuation_tokens", 0),  # absent in entries stored before it existed: prompts only
    )


def merge_from_hparams(problem: Problem, preference, key: jax.Array, hparams: dict) -> dict:
    """The merged model of one menu candidate (or data-aware baseline) from its hyperparameters.

    hparams: {"method": one of `MENU_METHODS`, ...}: tsv {"scale", "rank_fraction"?}; regmean {"alpha",
    "calibration_rows"}; fisher {"floor", "calibration_rows", "fisher_seed", "num_samples"}; adamerging
    {"calibration_rows", "num_steps", "learning_rate", "init", "batch_size", "granularity"} and, once learned,
    "coefficients" (then no calibration is run: `merge_with_coefficients`). `key`: AdaMerging's minibatches.
    """
    method = hparams["method"]
    w = preference_weights(problem, preference)
    base, experts = problem.base, problem.experts
    if method == "tsv":
        extra = {"rank_fraction": hparams["rank_fraction"]} if "rank_fraction" in hparams else {}
        return merging.merge("tsv", base, experts, weights=w.tolist(), scale=hparams["scale"], **extra)
    if method == "regmean":
        return merging.regmean(
            base, experts, _stats_for(problem, hparams).grams(), weights=w, alpha=hparams["alpha"]
        )
    if method == "regmean_plusplus":  # the experts' own Grams (its first step) are the shared statistics'
        stats = _stats_for(problem, hparams)
        return merging.regmean_plusplus(
            base, experts, stats.calibration, weights=w, alpha=hparams["alpha"], grams=stats.grams()
        )
    if method == "fisher":
        return merging.fisher_merge(
            experts,
            _stats_for(problem, hparams).fishers(),
            weights=w,
            floor=hparams.get("floor", 1e-6),
            base=base,
        )
    if method == "adamerging":
        if "coefficients" in hparams:
            return merging.merge_with_coefficients(
                base, experts, coefficients_from_json(hparams["coefficients"])
            )
        return run_adamerging(problem, preference, key, hparams).merged
    raise ValueError(f"unknown parameter-level menu method {method!r}; known: {MENU_METHODS}")


def _adamerging_args(hparams: dict) -> dict:
    names = ("num_steps", "learning_rate", "init", "batch_size", "granularity")
    return {n: hparams[n] for n in names if n in hparams}


def run_adamerging(problem: Problem, preference, key: jax.Array, hparams: dict):
    """`merging.adamerging` on the search calibration at `preference` (an `AdaMergingResult`)."""
    stats = _stats_for(problem, hparams)
    return merging.adamerging(
        key,
        problem.base,
        problem.experts,
        stats.calibration,
        weights=preference_weights(problem, preference),
        **_adamerging_args(hparams),
    )


def adamerging_passes(problem: Problem, preference, hparams: dict) -> CalibrationPasses:
    stats = _stats_for(problem, hparams)
    return merging.calibration_passes(
        "adamerging",
        stats.calibration,
        weights=preference_weights(problem, preference),
        **_adamerging_args(hparams),
    )


def regmean_plusplus_passes(problem: Problem, preference, hparams: dict) -> CalibrationPasses:
    """What one RegMean++ merge costs beyond the shared Grams (its first step): L + 1 forwards per row."""
    calibration, w = _stats_for(problem, hparams).calibration, preference_weights(problem, preference)
    full = merging.calibration_passes("regmean_plusplus", calibration, weights=w, params=problem.base)
    own = merging.calibration_passes("regmean", calibration, weights=w)
    return CalibrationPasses(full.forward_rows - own.forward_rows, 0)


def coefficients_to_json(coefficients: Any) -> Any:
    """AdaMerging coefficients (`[K]` or {leaf: `[K]` / `[K, L]`}) as nested lists."""
    if isinstance(coefficients, dict):
        return {k: np.asarray(v, np.float32).tolist() for k, v in coefficients.items()}
    return np.asarray(coefficients, np.float32).tolist()


def coefficients_from_json(coefficients: Any) -> Any:
    if isinstance(coefficients, dict):
        return {k: jnp.asarray(v, jnp.float32) for k, v in coefficients.items()}
    return jnp.asarray(coefficients, jnp.float32)


class Candidate(NamedTuple):
    """One menu entry: its JSON-able hyperparameters (`merge_from_hparams` rebuilds `merged` from them), the
    merged params, and the calibration passes it cost beyond the shared statistics."""

    hparams: dict
    merged: Any
    passes: CalibrationPasses


def candidates(problem: Problem, preference, key: jax.Array, cfg):
    """The menu of one preference, lazily (one merged model held at a time).

    cfg: `config.param_level.data_aware` (methods, calibration_rows, regmean_alphas, tsv_scales, fisher_seed,
      fisher_num_samples, adamerging.{num_steps, learning_rate, init, batch_size}). Yields `Candidate`s.
    """
    methods = tuple(cfg.methods)
    unknown = [m for m in methods if m not in MENU_METHODS]
    if unknown:
        raise ValueError(f"param_level.data_aware.methods: unknown {unknown}; known: {MENU_METHODS}")
    rows = int(cfg.calibration_rows)
    common = {"calibration_rows": rows}
    if int(cfg.get("continuation_tokens", 0)) > 0:
        common["continuation_tokens"] = int(cfg.continuation_tokens)
    fisher = {
        "fisher_seed": int(cfg.get("fisher_seed", 0)),
        "num_samples": int(cfg.get("fisher_num_samples", 1)),
    }
    if "regmean" in methods:
        for alpha in cfg.regmean_alphas:
            hp = {"method": "regmean", "alpha": float(alpha), **common, **fisher}
            yield Candidate(hp, merge_from_hparams(problem, preference, key, hp), NO_PASSES)
    if "regmean_plusplus" in methods:
        for alpha in cfg.regmean_alphas:
            hp = {"method": "regmean_plusplus", "alpha": float(alpha), **common, **fisher}
            merged = merge_from_hparams(problem, preference, key, hp)
            yield Candidate(hp, merged, regmean_plusplus_passes(problem, preference, hp))
    if "fisher" in methods:
        hp = {"method": "fisher", "floor": 1e-6, **common, **fisher}
        yield Candidate(hp, merge_from_hparams(problem, preference, key, hp), NO_PASSES)
    if "tsv" in methods:
        for scale in cfg.tsv_scales:
            hp = {"method": "tsv", "scale": float(scale)}
            yield Candidate(hp, merge_from_hparams(problem, preference, key, hp), NO_PASSES)
    if "adamerging" in methods:
        ada = cfg.adamerging
        hp = {
            "method": "adamerging",
            "granularity": "layer",
            "num_steps": int(ada.num_steps),
            "learning_rate": float(ada.learning_rate),
            "init": float(ada.init),
            "batch_size": int(ada.batch_size),
            **common,
            **fisher,
        }
        result = run_adamerging(problem, preference, key, hp)
        hp = {**hp, "coefficients": coefficients_to_json(result.coefficients)}
        yield Candidate(hp, result.merged, adamerging_passes(problem, preference, hp))


def shared_cost(problem: Problem, cfg) -> CalibrationPasses:
    """The calibration passes of the statistics the menu `cfg` uses (computed once per run)."""
    settings = (int(cfg.get("fisher_seed", 0)), int(cfg.get("fisher_num_samples", 1)))
    settings += (int(cfg.get("continuation_tokens", 0)),)
    return statistics(problem, int(cfg.calibration_rows), *settings).cost(tuple(cfg.methods))
