"""Scores of a model or a layer path on an `Objective`.

Scoring helpers `score_path` / `score_model` jit the objective's kernel with the config static and every array
(params, pool, path, junction, the split's padded arrays) traced, so new models, new paths and other splits of
the same shapes never recompile.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax import models
from hm3_jax.models.path import check_junction, validate_path
from hm3_jax.models.pool import pool_size
from hm3_jax.paths.engine import DECODE_METRICS
from hm3_jax.tasks.objectives import Objective


def _path_forward(config, shell, pool, path, junction, metric: str):
    if metric in DECODE_METRICS:
        return lambda ids, mask, n: models.greedy_decode(
            config, shell, pool, path, ids, mask, n, junction=junction
        )
    if metric == "accuracy":
        return lambda ids: models.apply_path(config, shell, pool, path, ids, junction=junction)
    return lambda ids, positions=None: models.apply_path(  # exact match, multiple choice: teacher-forced
        config, shell, pool, path, ids, junction=junction, positions=positions
    )


@functools.partial(jax.jit, static_argnames=("config", "kernel", "metric"))
def _path_kernel(config, shell, pool, path, junction, arrays, kernel, metric):
    return kernel(_path_forward(config, shell, pool, path, junction, metric), arrays)


def path_device_scores(config, shell, pool, path, junction, objective: Objective):
    """Jitted device part of `objective` for a layer path: ``kernel(forward, arrays)``.

    Config, kernel and metric are static; everything else (params, path, junction, the split's arrays) is
    traced, so new models, paths and same-shaped splits reuse one compilation. Returns the padded device
    output (host_fn accepts it).
    """
    arrays = jax.tree.map(jnp.asarray, objective.arrays.tree)
    return _path_kernel(config, shell, pool, path, junction, arrays, objective.kernel, objective.metric)


def score_path(config, shell, pool, path, objective: Objective, junction=None) -> float:
    """Score in [0, 100] of the path model (`hm3_jax.models.apply_path` semantics) on `objective`.

    Args:
      config: ModelConfig of the shell; shell: embed/final/head params; pool: stacked blocks [P, ...];
      path: int32 [T_max] pool indices (-1 = padding); junction: None or {"scale", "shift": [T_max, D]}.
    """
    path = np.asarray(path, np.int32)
    validate_path(path, pool_size(pool))
    check_junction(junction, path.shape[0], config.hidden_size)
    return objective.host_fn(path_device_scores(config, shell, pool, jnp.asarray(path), junction, objective))


def score_model(config, params, objective: Objective) -> float:
    """Score in [0, 100] of a single model (the identity path over its own blocks) on `objective`."""
    pool = params["blocks"]  # == make_pool([params["blocks"]]) without a copy
    path = np.arange(config.num_layers, dtype=np.int32)
    return score_path(config, models.shell_of(params), pool, path, objective)


def score_models(config, params_list: Sequence[Any], objectives: Sequence[Objective]) -> np.ndarray:
    """Score matrix [len(params_list), len(objectives)] (rows: models, columns: objectives)."""
    return np.array([[score_model(config, p, o) for o in objectives] for p in params_list], np.float64)
