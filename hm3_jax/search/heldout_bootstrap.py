"""Bootstrap intervals of every method's held-out hypervolume (`hm3_jax.moo.bootstrap`), from per-example outputs.

The held-out engine keeps, for every model it scores, each objective's per-example statistics (0/1
correctness, or chrF sentence statistics of the greedy decodes; `PathEngine.keep_example_stats`), so a reported
point's statistics are read back, not recomputed; a point scored in an earlier process (a resumed run) is
re-run once through the same engine. Their full-sample score must reproduce the reported point (checked: a
mismatch is an error, never a silent interval of something else). Then `num_samples` paired resamples of the
held-out examples give each method's hypervolume distribution against the report's fixed reference point.

A model is given as a `ModelSpec` (`hm3_jax.models.apply_path` semantics, plus the engine cache identity it
was scored under), so parameter merges (their identity path over the pool `experts + [merge]`, as
`problem.score_params` scores them), HM3's paths over its pool and the path baselines' paths are all treated
alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from absl import logging

from hm3_jax import models
from hm3_jax.moo import bootstrap, hypervolume, normalize_by_ideal
from hm3_jax.search.problem import MIN_IDEAL, Problem, pool_for, reuse_placed_parts


class ModelSpec(NamedTuple):
    """One model as a path: `shell`, `pool` (of the engines' pool shape), `path` [T], `junction` (None or
    {"scale", "shift": [T, D]}) and `model_id`, the engine cache identity it was scored under (None: a hash of
    the shell and pool bytes, what `PathEngine.with_model` uses by default). A 4-tuple is a spec without id."""

    shell: Any
    pool: Any
    path: Any
    junction: Any = None
    model_id: str | None = None


def params_spec(problem: Problem, params: dict) -> ModelSpec:
    """A plain model as `problem.score_params` scores it: the identity path of source K over the pool
    `experts + [params]`, with the model's own shell."""
    K, L = len(problem.experts), problem.config.num_layers
    path = (K * L + np.arange(L)).astype(np.int32)
    return ModelSpec(models.shell_of(params), pool_for(problem.experts, params), path)


def example_stats(problem: Problem, spec, split: str = "heldout"):
    """Per task the per-example statistics of one model on `split` (see `moo.bootstrap`): each objective's
    `example_fn` of its device output, kept by the split's engine when it scored the model (else computed now).

    Returns: ([stats per task], [full-sample score per task]).
    """
    spec = ModelSpec(*spec)
    base = problem.engines[split]
    shell, pool = reuse_placed_parts(
        base, spec.shell, spec.pool, len(problem.experts)
    )  # on a mesh: own part only
    engine = base.with_model(shell, pool, pool_id=spec.model_id)
    junction = None if spec.junction is None else {k: np.asarray(v)[None] for k, v in spec.junction.items()}
    stats = engine.example_stats(np.asarray(spec.path, np.int32)[None], junction)[0]
    scores = [bootstrap.full_score(s, o.metric) for s, o in zip(stats, engine.objectives, strict=True)]
    return list(stats), scores


def run_bootstrap(
    problem: Problem,
    method_specs: dict[str, Callable[[], list[ModelSpec]]],
    method_points: dict,
    reference,
    num_samples: int,
    seed: int,
    source_specs: list[ModelSpec],
    tol: float = 1e-3,
) -> dict:
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
        return problem.objective_scores(
            np.stack(
                [bootstrap.resampled_scores(s, m, i) for s, m, i in zip(stats, metrics, idx, strict=True)], -1
            )
        )  # [B, K]

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
        logging.info("bootstrap: %s per-example statistics (%d points)", name, len(specs))
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
