"""The data-aware merges' statistics in a run's memory plan (issue 16; the merges are issue 19's).

RegMean needs each expert's input Gram matrices and Fisher merging each expert's diagonal Fisher
(`search.data_aware_menu.SearchStatistics`, computed once per run on the search split's prompts). A run computes
them when HM3's upper level has the data-aware menu (`param_level.data_aware.enabled` with "regmean" or "fisher"
among its methods) or a RegMean / Fisher baseline runs (`baselines.param_methods`), and then keeps them on
device 0 for the rest of the process (`data_aware_menu.statistics` shares them between the parameter level and the
baselines, which run after HM3), so every later program has them resident beside it. Their size does not depend on
the calibration rows:

    Grams per expert  = sum over the linear layers' kernels W [in, out] of (L x) in^2 float32 (every kernel its own
                        Gram, so q, k and v hold three equal ones),
    Fisher per expert = the model's float parameters in float32,

for Llama-2-7B about 28 and 25 GiB per expert (`docs/scaling.md`), far beyond a 32 GiB chip: a plan says so before
launch. The programs that compute them are planned too, each with the largest objective's calibration rows (the
run passes all of an expert's rows in one call, `merging.model_grams` / `model_fishers`):

* ``statistics/grams``: `merging.layer_inputs.linear_input_stats` (one forward of an expert with every linear
  layer's input Gram accumulated), on device 0;
* ``statistics/fisher``: `merging.fisher.diagonal_fisher` (a forward and `num_samples` backward passes per row).

Resident beside them: the sources on device 0 as `program_memory.sources_device0_bytes` gives them (less the
expert that is the program's argument) and every other expert's statistics. AdaMerging's training steps (a
backward pass through the merged model per step) are not planned.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax.merging.fisher import diagonal_fisher, fisher_jit
from hm3_jax.merging.layer_inputs import input_stats_jit, linear_input_stats
from hm3_jax.pipeline.baseline_runs import CALIBRATION
from hm3_jax.pipeline.program_memory import (
    ProgramMemory,
    abstract_params,
    compile_memory,
    sources_device0_bytes,
    tree_bytes,
)
from hm3_jax.search.calibration_rows import objective_calibration

STATISTICS = ("regmean", "fisher")  # the methods whose statistics a run computes and keeps


def _statistics_of(methods) -> tuple[str, ...]:
    """The methods whose statistics `methods` keep: RegMean++ starts from RegMean's Grams (its per-preference
    Grams through the merged prefix are transient, one expert's at a time)."""
    return tuple("regmean" if m == "regmean_plusplus" else m for m in methods)


def _settings(run_config) -> tuple[tuple[str, ...], int, int, int]:
    """`statistics_settings` plus the most continuation tokens (`merging.own_continuation`) those statistics'
    calibration rows get (the menu's `continuation_tokens`, the baselines' `CALIBRATION`; 0 for none)."""
    methods, rows, samples, tokens = set(), 0, 1, 0
    menu = run_config.param_level.get("data_aware")
    if menu is not None and menu.get("enabled", False) and run_config.param_level.cmaes.enabled:
        used = set(_statistics_of(menu.get("methods", ()))) & set(STATISTICS)
        if used:
            methods |= used
            rows = max(rows, int(menu.calibration_rows))
            samples = max(samples, int(menu.get("fisher_num_samples", 1)))
            tokens = max(tokens, int(menu.get("continuation_tokens", 0)))
    baselines = set(_statistics_of(run_config.baselines.get("param_methods", ()))) & set(STATISTICS)
    if baselines:
        methods |= baselines
        rows = max(rows, int(CALIBRATION["calibration_rows"]))
        samples = max(samples, int(CALIBRATION["num_samples"]))
        tokens = max(tokens, int(CALIBRATION.get("continuation_tokens", 0)))
    return tuple(m for m in STATISTICS if m in methods), rows, samples, tokens


def statistics_settings(run_config) -> tuple[tuple[str, ...], int, int]:
    """(methods among STATISTICS the run computes statistics for, the most calibration rows per task any of them
    uses, the Fisher's label draws per row) from the upper level's menu and the parameter baselines."""
    return _settings(run_config)[:3]


def _abstract(x) -> jax.ShapeDtypeStruct | None:
    return None if x is None else jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)


def traced_statistics(
    config, num_experts: int, dtype, search_objectives, groups, tasks, run_config
) -> tuple[dict, dict]:
    """({name: (the run's jitted function, its arguments, its keyword arguments)}, {name: one expert's output
    bytes}) of the statistics the run computes (`statistics_settings`; both empty when none)."""
    methods, rows, samples, tokens = _settings(run_config)
    if not methods:
        return {}, {}
    calibration = objective_calibration(config, search_objectives, groups, tasks, rows)
    calib = max(calibration, key=lambda c: int(np.size(c.inputs)))
    params = abstract_params(config, dtype)
    inputs, weights = _abstract(calib.inputs), _abstract(calib.token_weights)
    extra = tokens if config.family != "vit" else 0
    if extra:  # rows continued by the expert: T more token columns (left-padded prompts are never wider)
        inputs = jax.ShapeDtypeStruct(inputs.shape[:-1] + (inputs.shape[-1] + extra,), inputs.dtype)
        weights = jax.ShapeDtypeStruct(weights.shape[:-1] + (weights.shape[-1] + extra,), weights.dtype)
    key, fwd = jax.ShapeDtypeStruct((2,), jnp.uint32), calib.forward_fn
    fns, outputs = {}, {}
    if "regmean" in methods:
        fns["grams"] = (input_stats_jit, (fwd, params, inputs, weights), {})
        outputs["grams"] = jax.eval_shape(  # what `layer_input_grams` keeps: the Grams without their counts
            lambda p, x, w: {n: st.gram for n, st in linear_input_stats(fwd, p, x, w).items()},
            params,
            inputs,
            weights,
        )
    if "fisher" in methods:
        kw = {"mode": "sample", "num_samples": samples}
        fns["fisher"] = (fisher_jit, (key, fwd, params, inputs, weights), kw)
        outputs["fisher"] = jax.eval_shape(
            lambda k, p, x, w: diagonal_fisher(k, fwd, p, x, w, **kw), key, params, inputs, weights
        )
    return fns, {name: tree_bytes(out) for name, out in outputs.items()}


def statistics_bytes(num_experts: int, traced: tuple[dict, dict]) -> int:
    """Bytes of all K experts' statistics the run computes and keeps on device 0 (0 when none; traced shapes
    only, nothing compiled), from `traced_statistics(...)`."""
    return num_experts * sum(traced[1].values())


def statistics_programs(
    config, num_experts: int, dtype, traced: tuple[dict, dict], mesh=None
) -> list[ProgramMemory]:
    """``statistics/grams`` and/or ``statistics/fisher`` for a run that computes them (`statistics_settings`),
    else []. Compiled with the largest expert calibration of the search split
    (`data_aware_menu.objective_calibration`: its real row and prompt shapes) and abstract params in `dtype`;
    `traced`: `traced_statistics(config, num_experts, dtype, search_objectives, groups, tasks, run_config)`
    (`groups`: each search objective's expert index; `tasks`: the K experts' objectives), traced once and
    shared with `statistics_bytes`."""
    fns, outputs = traced
    if not fns:
        return []
    total = num_experts * sum(outputs.values())
    params = abstract_params(config, dtype)
    sources, pool = sources_device0_bytes(params, num_experts, mesh)
    beside = max(sources - tree_bytes(params), 0) + pool  # the argument is one expert
    return [
        compile_memory(
            f"statistics/{name}",
            lambda fn=fn, args=args, kw=kw: fn.lower(*args, **kw),
            1,
            "device 0",
            beside + total - outputs[name],
        )
        for name, (fn, args, kw) in fns.items()
    ]


def add_statistics(programs, statistics_bytes: int) -> list[ProgramMemory]:
    """`programs` (every program of the run but the statistics' own) with the K experts' statistics resident
    beside them on device 0."""
    return [p._replace(resident_bytes=p.resident_bytes + int(statistics_bytes)) for p in programs]
