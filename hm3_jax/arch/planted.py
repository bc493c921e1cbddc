"""A planted path-search problem with a known optimal path per preference (for tests and smoke runs).

Scores (maximised, in [0, 1]) are position-wise tables: ``f_k(path) = sum_{j < T} W_k[j, path_j] / t_max``. For each
task ``k`` a planted target path ``target_k`` (a frankenmerge of expert ``k``'s blocks) earns ``W_k[j, target_k[j]]
= 1``; every block of the merged source (index ``K``) at its own depth earns ``merged_value`` on every task (it is
"good at everything, best at nothing"); every other entry is small noise in ``[0, noise)``; positions
``j >= num_layers`` hold only noise. With ``noise + ... < beta1`` an extra block never pays its length penalty
``beta1 / t_max``, so the optimum for preference lambda is, position by position, the block maximising
``sum_k lambda_k W_k[j, a]``, of length ``num_layers``: expert ``k``'s target for a lambda concentrated on ``k``,
the merged model's identity path for a balanced one. :func:`brute_force_optimum` checks this by enumerating every
path, independently of that reasoning.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax.arch import descriptors as descriptors_lib
from hm3_jax.arch import env


class PlantedProblem(NamedTuple):
    """``tables [K, t_max, P]`` (the W_k), ``targets [K, L]``, a synthetic ``pool`` / ``base_blocks`` with
    ``descriptors [P, d]``, and the static sizes."""

    tables: np.ndarray
    targets: np.ndarray
    descriptors: jax.Array
    num_tasks: int
    num_layers: int
    t_max: int

    @property
    def num_sources(self) -> int:
        return self.num_tasks + 1

    @property
    def pool_size(self) -> int:
        return self.num_sources * self.num_layers


def make_planted_problem(
    seed: int,
    num_tasks: int = 2,
    num_layers: int = 3,
    t_max: int = 4,
    merged_value: float = 0.7,
    noise: float = 0.08,
) -> PlantedProblem:
    """Draws the tables (numpy ``default_rng(seed)``) and a synthetic pool whose descriptors feed the network."""
    if t_max < num_layers:
        raise ValueError(f"t_max={t_max} must be >= num_layers={num_layers}")
    rng = np.random.default_rng(seed)
    num_sources = num_tasks + 1
    pool_size = num_sources * num_layers
    tables = rng.uniform(0.0, noise, size=(num_tasks, t_max, pool_size)).astype(np.float32)
    targets = np.stack(
        [k * num_layers + rng.integers(0, num_layers, size=num_layers) for k in range(num_tasks)]
    )
    for k in range(num_tasks):
        for j in range(num_layers):
            tables[k, j, targets[k, j]] = 1.0
            tables[k, j, num_tasks * num_layers + j] = merged_value
    # A synthetic pool of 4x4 "weight matrices": experts = base + own direction, merged = base + mean of them.
    key_base, key_dir = jax.random.split(jax.random.key(seed))
    base = {"w": jax.random.normal(key_base, (num_layers, 4, 4)), "b": jnp.zeros((num_layers, 4))}
    directions = jax.random.normal(key_dir, (num_tasks, num_layers, 4, 4))
    sources = [base["w"] + directions[k] for k in range(num_tasks)] + [base["w"] + directions.mean(0)]
    pool = {"w": jnp.concatenate(sources, 0), "b": jnp.zeros((pool_size, 4))}
    phi = descriptors_lib.block_descriptors(pool, base, num_sources)
    return PlantedProblem(tables, targets, phi, num_tasks, num_layers, t_max)


def make_score_fn(problem: PlantedProblem):
    """Jittable ``score_fn(paths [N, t_max] int32 -1 padded, preferences [N, K], preference_index [N]) -> scores
    [N, K]``."""
    tables = jnp.asarray(problem.tables)  # [K, t_max, P]

    def score_fn(paths, preferences, preference_index):
        del preferences, preference_index  # the planted scores do not depend on lambda
        valid = paths >= 0
        safe = jnp.where(valid, paths, 0)
        positions = jnp.arange(problem.t_max)
        gathered = tables[:, positions[None, :], safe]  # [K, N, t_max]
        return (jnp.where(valid[None], gathered, 0.0).sum(-1) / problem.t_max).T

    return score_fn


def numpy_scores(problem: PlantedProblem, path: tuple[int, ...]) -> np.ndarray:
    """``[K]`` scores of one unpadded path, by a plain loop (independent of :func:`make_score_fn`)."""
    return np.array(
        [
            sum(problem.tables[k, j, a] for j, a in enumerate(path)) / problem.t_max
            for k in range(problem.num_tasks)
        ]
    )


def brute_force_optimum(
    problem: PlantedProblem, preference: np.ndarray, beta1: float, t_min: int = 1
) -> tuple[tuple[int, ...], float]:
    """Enumerates every path of length ``t_min..t_max``; returns the one maximising the reward
    ``sum_k lambda_k f_k - beta1 T / t_max`` (`env.host_reward`) and that value."""
    preference = np.asarray(preference, np.float64)
    best, best_value = None, -np.inf
    for length in range(t_min, problem.t_max + 1):
        for path in itertools.product(range(problem.pool_size), repeat=length):
            value = float(
                env.host_reward(numpy_scores(problem, path), preference, length, beta1, problem.t_max)
            )
            if value > best_value:
                best, best_value = path, value
    return best, best_value
