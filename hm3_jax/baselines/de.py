"""Differential-evolution baseline (the paper's Table 7) over the DFS genome, with evosax 0.3's
``DifferentialEvolution`` (DE/best/1/bin by default: ``elitism=True``, crossover rate 0.9, F = 0.8).

Generation 0 is a population drawn from ``N(initial_mean, sigma^2)`` (see ``dfs``); evosax's DE needs it
evaluated before ``init``. Fitness as in ``ea``: the scalarised normalised score, maximised, negated only at
evosax's boundary. Budget and caching as in ``ea``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax.baselines.common import BudgetedEvaluator, check_budget, check_geometry, strong_types
from hm3_jax.baselines.dfs import decode, make_representation
from hm3_jax.baselines.single_preference import Tracker, ask_tell_generations, make_fitness_fn


@functools.lru_cache(maxsize=32)
def _strategy(population_size: int, num_genes: int):
    """evosax's ``DifferentialEvolution`` for this shape, one object per shape so runs share evosax's compiled
    ask/tell; evosax imported lazily (see ``ea._strategy``)."""
    from evosax.algorithms import DifferentialEvolution

    return DifferentialEvolution(population_size=population_size, solution=jnp.zeros(num_genes, jnp.float32))


def run_de(
    key: jax.Array,
    evaluate_fn,
    geometry,
    preference,
    budget: int,
    *,
    population_size: int = 16,
    sigma: float = 1.0,
    differential_weight: float = 0.8,
    crossover_rate: float = 0.9,
    elitism: bool = True,
    repeats: int = 2,
    use_scales: bool = True,
    max_log_scale: float = 1.0,
    scalarization: str = "weighted_sum",
    ideal=None,
    max_generations: int | None = None,
    max_stale_generations: int = 20,
    progress: bool = True,
) -> dict:
    """Differential evolution over the DFS genome for one preference.

    Args: as ``run_ea``, plus DE's ``differential_weight`` F in [0, 2], ``crossover_rate`` in [0, 1] and
      ``elitism`` (base vector = best member if True, a random member otherwise); ``population_size >= 4``.
      ``max_stale_generations`` as in ``run_ea``.

    Returns:
      the same dict as ``run_ea`` (``method = "differential_evolution"``).
    """
    geometry = check_geometry(geometry)
    budget = check_budget(budget)
    fitness_fn, pref = make_fitness_fn(preference, scalarization, ideal)
    rep = make_representation(geometry, repeats, use_scales, max_log_scale)
    if int(population_size) < 4:
        raise ValueError(f"differential evolution needs population_size >= 4, got {population_size}")
    if not 0 <= crossover_rate <= 1 or not 0 <= differential_weight <= 2:
        raise ValueError(
            f"need crossover_rate in [0, 1] and differential_weight in [0, 2], got "
            f"{crossover_rate}, {differential_weight}"
        )
    pop_size = int(population_size)
    max_generations = int(max_generations or 10 * budget)

    strategy = _strategy(pop_size, rep.num_genes)
    params = strategy.default_params.replace(
        elitism=bool(elitism),
        crossover_rate=float(crossover_rate),
        differential_weight=float(differential_weight),
        differential_weight_min=float(differential_weight),
        differential_weight_max=float(differential_weight),
    )
    key_init, key_pop, key_loop = jax.random.split(key, 3)
    mean = rep.initial_mean(sigma)
    population = mean + sigma * np.asarray(jax.random.normal(key_pop, (pop_size, rep.num_genes)), np.float32)

    evaluator = BudgetedEvaluator(evaluate_fn, geometry, budget, progress)
    tracker = Tracker()
    try:
        paths, scales = decode(rep, population)
        scores = evaluator(paths, scales)
        fitness = fitness_fn(scores) if len(scores) else np.zeros(0)
        tracker.record(0, evaluator.evaluations, paths, scales, scores, fitness)
        if len(scores) == pop_size:
            fitness_min = jnp.asarray(-fitness, jnp.float32)
            state = strong_types(strategy.init(key_init, jnp.asarray(population), fitness_min, params))
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
                range(1, max_generations),
                max_stale_generations,
            )
    finally:
        evaluator.close()
    return tracker.result(
        "differential_evolution",
        pref,
        evaluator,
        population_size=pop_size,
        sigma=sigma,
        repeats=rep.repeats,
        use_scales=rep.use_scales,
        scalarization=scalarization,
    )
