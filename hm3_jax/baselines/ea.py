"""EA baseline: Sakana's evolutionary data-flow-space merging (Akiba et al. 2024) for one preference.

CMA-ES (evosax 0.3 ``CMA_ES``) searches the DFS genome of ``hm3_jax.baselines.dfs`` (inclusion genes over the
layers of all sources repeated r times, plus per-slot junction scales). The fitness is the scalarised
normalised score of the decoded path, by default the weighted sum ``sum_k lambda_k f_k`` (maximised); evosax
minimises, so the fitness is negated at the ``tell`` call and nowhere else.

Budget: one decoded candidate sent to ``evaluate_fn`` is one evaluation (duplicates within the run are
cached and free). Each generation evaluates the whole population; the last generation is cut to the
remaining budget and is not told to CMA-ES. The loop also stops after ``max_generations``.
"""

import functools
import math

import jax
import jax.numpy as jnp

from hm3_jax.baselines.common import BudgetedEvaluator, check_budget, check_geometry, strong_types
from hm3_jax.baselines.dfs import make_representation
from hm3_jax.baselines.single_preference import Tracker, ask_tell_generations, make_fitness_fn


@functools.lru_cache(maxsize=32)
def _strategy(population_size: int, num_genes: int):
    """evosax's ``CMA_ES`` for this shape, one object per shape.

    evosax jits ask/tell with the strategy object as a static argument (hashed by identity): reusing one
    object per shape lets every run with that shape (e.g. one per preference) share the compiled code.
    evosax is imported here, not at the module top: it creates jax arrays at import time, which starts the XLA
    backend, and a multi-process run must call ``jax.distributed.initialize`` before that (issue 7).
    """
    from evosax.algorithms import CMA_ES

    return CMA_ES(population_size=population_size, solution=jnp.zeros(num_genes, jnp.float32))


def default_population_size(num_genes: int) -> int:
    """CMA-ES's default ``4 + floor(3 ln n)`` (Hansen 2016)."""
    return 4 + int(3 * math.log(num_genes))


def run_ea(
    key: jax.Array,
    evaluate_fn,
    geometry,
    preference,
    budget: int,
    *,
    population_size: int | None = None,
    sigma: float = 1.0,
    repeats: int = 2,
    use_scales: bool = True,
    max_log_scale: float = 1.0,
    scalarization: str = "weighted_sum",
    ideal=None,
    max_generations: int | None = None,
    max_stale_generations: int = 20,
    progress: bool = True,
) -> dict:
    """CMA-ES over the DFS genome for one preference.

    Args:
      key: PRNG key (the whole run is a deterministic function of it and ``evaluate_fn``).
      evaluate_fn: ``(paths int32 [N, T_max], junction_scales [N, T_max] | None) -> scores [N, K]``.
      geometry: ``(num_sources, num_layers, t_max)``.
      preference: ``[K]`` on the simplex.
      budget: maximum number of path evaluations.
      population_size: CMA-ES lambda (default ``4 + floor(3 ln num_genes)``).
      sigma: initial CMA-ES step size.
      repeats, use_scales, max_log_scale: the DFS representation (see ``dfs``).
      scalarization: ``"weighted_sum"`` (default) or ``"tchebycheff"`` (with ``ideal``, default ones).
      max_generations: hard cap on generations (default ``10 * budget``).
      max_stale_generations: stop early (converged) after this many consecutive generations whose
        candidates were all cached, i.e. cost no evaluation; ``evaluations`` may then be below the budget.
      progress: show a tqdm bar over evaluations.

    Returns:
      dict with ``best_path [T_max]``, ``best_junction_scales [T_max] | None``, ``best_scores [K]``,
      ``best_fitness``, ``evaluations``, ``generations``, ``history`` (per generation: evaluations so far,
      generation best/mean fitness, best so far), ``archive`` (every distinct evaluated candidate) and the
      settings used.
    """
    geometry = check_geometry(geometry)
    budget = check_budget(budget)
    fitness_fn, pref = make_fitness_fn(preference, scalarization, ideal)
    rep = make_representation(geometry, repeats, use_scales, max_log_scale)
    pop_size = int(population_size or default_population_size(rep.num_genes))
    if pop_size < 2:
        raise ValueError(f"population_size must be >= 2, got {pop_size}")
    max_generations = int(max_generations or 10 * budget)

    strategy = _strategy(pop_size, rep.num_genes)
    params = strategy.default_params.replace(std_init=jnp.asarray(sigma, jnp.float32))
    key_init, key_loop = jax.random.split(key)
    state = strong_types(strategy.init(key_init, jnp.asarray(rep.initial_mean(sigma)), params))

    evaluator = BudgetedEvaluator(evaluate_fn, geometry, budget, progress)
    tracker = Tracker()
    try:
        ask_tell_generations(
            strategy,
            state,
            params,
            key_loop,
            rep,
            evaluator,
            tracker,
            fitness_fn,
            pop_size,
            range(max_generations),
            max_stale_generations,
        )
    finally:
        evaluator.close()
    return tracker.result(
        "ea",
        pref,
        evaluator,
        population_size=pop_size,
        sigma=sigma,
        repeats=rep.repeats,
        use_scales=rep.use_scales,
        scalarization=scalarization,
    )
