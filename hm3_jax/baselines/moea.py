"""MOEA baseline: NSGA-II (Deb et al. 2002) over the DFS genome of ``dfs``, all K objectives at once.

One run serves every preference: it returns a front, not one model. Per generation:

1. parents: binary tournaments on (non-dominated rank, then larger crowding distance);
2. variation: uniform crossover (with probability ``crossover_rate`` a child takes each gene from either
   parent with probability 1/2, otherwise it copies the first parent), then Gaussian mutation (each gene
   with probability ``mutation_rate``, default ``1 / num_genes``, gets ``N(0, mutation_std^2)`` added);
3. survivors: the best ``population_size`` of parents + offspring by (rank, crowding distance).

Objectives are the normalised scores (maximised, ``hm3_jax.moo`` convention). Budget and caching as in
``ea``: generation 0 is the random initial population; the last generation is cut to the remaining budget.
The returned ``front`` is the non-dominated subset of everything evaluated (the archive), which contains
the final population's first front.
"""

import jax
import numpy as np

from hm3_jax.baselines.common import BudgetedEvaluator, check_budget, check_geometry, select_rows
from hm3_jax.baselines.dfs import decode, make_representation
from hm3_jax.moo.hypervolume import hypervolume
from hm3_jax.moo.pareto import crowding_distance, non_dominated_ranks, pareto_mask


def _survival_order(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices sorted best-first by (rank ascending, crowding descending), plus ranks and crowding."""
    ranks = non_dominated_ranks(scores)
    crowd = np.zeros(len(scores))
    for r in np.unique(ranks):
        members = np.flatnonzero(ranks == r)
        crowd[members] = crowding_distance(scores[members])
    order = np.lexsort((-crowd, ranks))
    return order, ranks, crowd


def run_moea(
    key: jax.Array,
    evaluate_fn,
    geometry,
    budget: int,
    *,
    population_size: int = 20,
    sigma: float = 1.0,
    crossover_rate: float = 0.9,
    mutation_rate: float | None = None,
    mutation_std: float = 0.5,
    repeats: int = 2,
    use_scales: bool = True,
    max_log_scale: float = 1.0,
    reference=None,
    max_generations: int | None = None,
    max_stale_generations: int = 20,
    progress: bool = True,
) -> dict:
    """NSGA-II over the DFS genome.

    Args:
      key: PRNG key.
      evaluate_fn, geometry, budget: as ``run_ea``.
      population_size: NSGA-II population (>= 4, even numbers pair up cleanly).
      sigma: std of the random initial genomes around ``dfs``'s initial mean.
      crossover_rate, mutation_rate, mutation_std: variation settings (see the module docstring).
      reference: optional ``[K]`` reference for the per-generation hypervolume in ``history`` (default: all
        zeros, fine for scores normalised to about [0, 1]).
      max_generations, max_stale_generations: as in ``run_ea``.

    Returns:
      dict with ``front`` (``paths``, ``junction_scales``, ``scores`` of the non-dominated archive points),
      ``population`` (final population in the same form), ``archive``, ``evaluations``, ``generations``,
      ``history`` (per generation: evaluations so far, front size, hypervolume of the archive front, or
      None when K > 4).
    """
    geometry = check_geometry(geometry)
    budget = check_budget(budget)
    rep = make_representation(geometry, repeats, use_scales, max_log_scale)
    pop_size = int(population_size)
    if pop_size < 4:
        raise ValueError(f"population_size must be >= 4, got {population_size}")
    if not 0 <= crossover_rate <= 1:
        raise ValueError(f"crossover_rate must be in [0, 1], got {crossover_rate}")
    mutation_rate = 1.0 / rep.num_genes if mutation_rate is None else float(mutation_rate)
    if not 0 <= mutation_rate <= 1:
        raise ValueError(f"mutation_rate must be in [0, 1], got {mutation_rate}")
    max_generations = int(max_generations or 10 * budget)

    key_pop, key_loop = jax.random.split(key)
    genomes = rep.initial_mean(sigma) + sigma * np.asarray(
        jax.random.normal(key_pop, (pop_size, rep.num_genes)), np.float32
    )
    evaluator = BudgetedEvaluator(evaluate_fn, geometry, budget, progress)
    history = []
    stale = 0

    def log(generation):
        archive_scores = evaluator.archive()["scores"]
        ref = np.zeros(archive_scores.shape[1]) if reference is None else reference
        history.append(
            {
                "generation": generation,
                "evaluations": evaluator.evaluations,
                "front_size": int(pareto_mask(archive_scores).sum()),
                # exact HV is cheap for k <= 4; in more dimensions it can take minutes per call
                "hypervolume": hypervolume(archive_scores, ref) if archive_scores.shape[1] <= 4 else None,
            }
        )

    try:
        scores = evaluator(*decode(rep, genomes))
        genomes = genomes[: len(scores)]
        if len(scores) == 0:
            raise RuntimeError("moea: no candidate was evaluated")
        log(0)
        for generation in range(1, max_generations):
            if evaluator.remaining == 0 or len(scores) < pop_size:
                break
            k_tour, k_cross, k_gene, k_mut, k_noise = jax.random.split(
                jax.random.fold_in(key_loop, generation), 5
            )
            _, ranks, crowd = _survival_order(scores)
            contenders = np.asarray(jax.random.randint(k_tour, (2 * pop_size, 2), 0, pop_size))
            a, b = contenders[:, 0], contenders[:, 1]
            a_wins = (ranks[a] < ranks[b]) | ((ranks[a] == ranks[b]) & (crowd[a] >= crowd[b]))
            parents = np.where(a_wins, a, b).reshape(pop_size, 2)
            do_cross = np.asarray(jax.random.uniform(k_cross, (pop_size, 1))) < crossover_rate
            take_second = np.asarray(jax.random.uniform(k_gene, (pop_size, rep.num_genes))) < 0.5
            children = np.where(do_cross & take_second, genomes[parents[:, 1]], genomes[parents[:, 0]])
            mutate = np.asarray(jax.random.uniform(k_mut, children.shape)) < mutation_rate
            noise = mutation_std * np.asarray(jax.random.normal(k_noise, children.shape))
            children = (children + mutate * noise).astype(np.float32)

            before = evaluator.evaluations
            child_scores = evaluator(*decode(rep, children))
            stale = stale + 1 if evaluator.evaluations == before else 0
            children = children[: len(child_scores)]
            merged_genomes = np.concatenate([genomes, children])
            merged_scores = np.concatenate([scores, child_scores])
            keep = _survival_order(merged_scores)[0][:pop_size]
            genomes, scores = merged_genomes[keep], merged_scores[keep]
            log(generation)
            if stale >= max_stale_generations:
                break
    finally:
        evaluator.close()

    archive = evaluator.archive()
    paths, scales = decode(rep, genomes)
    return {
        "method": "moea",
        "front": select_rows(archive, pareto_mask(archive["scores"])),
        "population": {"paths": paths, "junction_scales": scales, "scores": scores},
        "archive": archive,
        "evaluations": evaluator.evaluations,
        "generations": len(history),
        "history": history,
        "population_size": pop_size,
        "repeats": rep.repeats,
        "use_scales": rep.use_scales,
    }
