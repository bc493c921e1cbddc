"""Bootstrap intervals of every method's held-out hypervolume (`hm3_jax.moo.bootstrap`), from per-example outputs.

Each reported point is re-run once on the held-out split through the same jitted kernels the engine uses
(`objectives.path_device_scores`) to get per-example statistics (0/1 correctness, or chrF sentence statistics
of the greedy decodes); their full-sample score must reproduce the reported point (checked: a mismatch is an
error, never a silent interval of something else). Then `num_samples` paired resamples of the held-out
examples give each method's hypervolume distribution against the report's fixed reference point.

A model is given as `(shell, pool, path, junction)` (`hm3_jax.models.apply_path` semantics), so parameter
merges (identity path over their own blocks), HM3's paths over its pool and the path baselines' paths are all
treated alike.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from absl import logging

from hm3_jax import models
from hm3_jax.hm3.problem import MIN_IDEAL, Problem
from hm3_jax.moo import bootstrap, hypervolume, normalize_by_ideal
from hm3_jax.tasks import objectives as objectives_lib

ModelSpec = tuple  # (shell, pool, path [T], junction or None)


def params_spec(params: dict, num_layers: int) -> ModelSpec:
    """A plain model as a path model: its shell, its blocks, the identity path."""
    return models.shell_of(params), params["blocks"], np.arange(num_layers, dtype=np.int32), None


def example_stats(problem: Problem, spec: ModelSpec, split: str = "heldout"):
    """Per task the per-example statistics of one model on `split` (see `moo.bootstrap`): each objective's
    `example_fn` of its kernel output (0/1 correctness, or chrF sentence statistics of the stripped decodes;
    the objectives hold their references and tokenizer).

    Returns: ([stats per task], [full-sample score per task]).
    """
    shell, pool, path, junction = spec
    out, scores = [], []
    for obj in problem.objectives[split]:
        if getattr(obj, "example_fn", None) is None:
            raise ValueError(f"objective {obj.name!r} has no example_fn: no per-example statistics")
        raw = np.asarray(objectives_lib.path_device_scores(
            problem.config, shell, pool, jnp.asarray(path, jnp.int32), junction, obj))  # fmt: skip
        stats = obj.example_fn(raw)
        out.append(stats)
        scores.append(bootstrap.full_score(stats, obj.metric))
    return out, scores


def run_bootstrap(problem: Problem, method_specs: dict[str, Callable[[], list[ModelSpec]]], method_points: dict,
                  reference, num_samples: int, seed: int, source_specs: list[ModelSpec], tol: float = 1e-3) -> dict:  # fmt: skip
    """Hypervolume intervals of every method, paired over held-out example resamples.

    Args:
      method_specs: {name: () -> [ModelSpec] for the method's reported points, in order}.
      method_points: {name: [P, K] reported raw held-out points} (checked against the re-run).
      reference: [K] the report's reference point (normalised units); num_samples, seed: the bootstrap.
      source_specs: base then experts (the ideal point is the best source per task on each resample).
      tol: allowed |re-run score - reported score| (scores are in [0, 100]).
    Returns: {"num_samples", "seed", "level", "methods": {name: {hypervolume, interval, p_hm3_greater}},
      "ideal_interval": [[lo, hi] per task]}.
    """
    sizes = [o.num_examples for o in problem.objectives["heldout"]]
    idx = bootstrap.resample_indices(seed, sizes, num_samples)
    metrics = [o.metric for o in problem.objectives["heldout"]]

    def resampled(spec, expected=None, what=""):
        stats, full = example_stats(problem, spec)
        # per task -> per objective (a spec's objective: its tasks' mean)
        full = problem.objective_scores(full)
        if expected is not None and np.max(np.abs(full - np.asarray(expected))) > tol:
            raise RuntimeError(f"bootstrap: re-running {what} gives {full}, the report has {list(expected)}")
        return problem.objective_scores(np.stack(
            [bootstrap.resampled_scores(s, m, i) for s, m, i in zip(stats, metrics, idx, strict=True)], -1
        ))  # [B, K]  # fmt: skip

    sources = np.stack([resampled(s) for s in source_specs])  # [1 + K, B, K]
    ideal = np.maximum(sources.max(0), MIN_IDEAL)  # the Problem's rule (a task no source solves: 1.0)
    samples = {}
    for name, make in method_specs.items():
        specs = make()
        pts = np.asarray(method_points[name], np.float64)
        if len(specs) != len(pts):
            raise RuntimeError(f"bootstrap: {name} has {len(pts)} points but {len(specs)} models")
        samples[name] = np.stack(
            [resampled(s, p, f"{name} point {j}") for j, (s, p) in enumerate(zip(specs, pts, strict=True))], 1
        )  # [B, P, K]
        logging.info("bootstrap: %s re-run (%d points)", name, len(specs))
    ref = np.asarray(reference, np.float64)
    hv = bootstrap.hypervolume_samples(samples, ideal, ref)
    ideal_full = np.asarray(problem.ideal["heldout"], np.float64)
    point_hv = {
        n: hypervolume(normalize_by_ideal(np.asarray(method_points[n], np.float64), ideal_full), ref)
        for n in samples
    }
    level = 0.95
    return {
        "num_samples": int(num_samples),
        "seed": int(seed),
        "level": level,
        "examples_per_task": sizes,
        "methods": bootstrap.summarise(hv, point_hv, against="hm3", level=level),
        "ideal_interval": np.percentile(ideal, [2.5, 97.5], axis=0).T.tolist(),
    }
