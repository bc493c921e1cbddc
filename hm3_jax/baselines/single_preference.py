"""Host-side bookkeeping shared by the single-preference searches (EA with CMA-ES, DE): the scalarised
fitness (maximised), the best candidate so far and a per-generation history."""

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax.baselines.dfs import decode
from hm3_jax.moo.preferences import validate_preference
from hm3_jax.moo.scalarize import tchebycheff

SCALARIZATIONS = ("weighted_sum", "tchebycheff")


def make_fitness_fn(preference, scalarization: str = "weighted_sum", ideal=None):
    """Returns ``fitness_fn(scores [N, K]) -> [N]``, maximised.

    ``weighted_sum``: ``sum_k lambda_k f_k``; ``tchebycheff``: `moo.tchebycheff`, ``-max_k lambda_k |f_k - z*_k|``
    (maximised too; ``ideal`` defaults to ones, the ideal of normalised scores).
    """
    pref = validate_preference(preference)
    if pref.ndim != 1:
        raise ValueError(f"preference must be one vector [K], got shape {pref.shape}")
    if scalarization not in SCALARIZATIONS:
        raise ValueError(f"unknown scalarization {scalarization!r}; expected one of {SCALARIZATIONS}")
    z = np.ones_like(pref) if ideal is None else np.asarray(ideal, dtype=np.float64)
    if z.shape != pref.shape:
        raise ValueError(f"ideal has shape {z.shape} but the preference has shape {pref.shape}")

    def fitness_fn(scores: np.ndarray) -> np.ndarray:
        if scores.shape[1] != pref.shape[0]:
            raise ValueError(
                f"evaluate_fn returned K={scores.shape[1]} scores but the preference has {pref.size}"
            )
        if scalarization == "weighted_sum":
            return scores @ pref
        return tchebycheff(scores, pref, z)  # numpy scores: numpy float64, as the scores

    return fitness_fn, pref


class Tracker:
    """Best candidate so far and the per-generation history of a single-objective search."""

    def __init__(self):
        self.best_fitness = -np.inf
        self.best = None
        self.history: list[dict] = []

    def record(self, generation: int, evaluations: int, paths, scales, scores, fitness) -> None:
        if len(fitness) == 0:
            return
        i = int(np.argmax(fitness))
        if fitness[i] > self.best_fitness:
            self.best_fitness = float(fitness[i])
            self.best = (paths[i].copy(), None if scales is None else scales[i].copy(), scores[i].copy())
        self.history.append(
            {
                "generation": generation,
                "evaluations": evaluations,
                "num_candidates": len(fitness),
                "generation_best_fitness": float(fitness[i]),
                "generation_mean_fitness": float(np.mean(fitness)),
                "best_fitness": self.best_fitness,
            }
        )

    def result(self, method: str, pref, evaluator, **extra) -> dict:
        if self.best is None:
            raise RuntimeError(f"{method}: no candidate was evaluated (budget {evaluator.budget})")
        path, scales, scores = self.best
        return {
            "method": method,
            "preference": pref,
            "best_path": path,
            "best_junction_scales": scales,
            "best_scores": scores,
            "best_fitness": self.best_fitness,
            "evaluations": evaluator.evaluations,
            "generations": len(self.history),
            "history": self.history,
            "archive": evaluator.archive(),
            **extra,
        }


def ask_tell_generations(
    strategy,
    state,
    params,
    key_loop,
    rep,
    evaluator,
    tracker,
    fitness_fn,
    pop_size: int,
    generations,
    max_stale_generations: int,
):
    """The evosax ask -> decode -> evaluate -> tell loop shared by EA (CMA-ES) and DE.

    Generation g uses the keys `split(fold_in(key_loop, g))`. Stops when the budget is spent, when a batch was
    cut by the budget, or after `max_stale_generations` generations answered wholly from the cache. evosax
    minimises, so the (maximised) fitness is negated at `tell` only. Returns the strategy state.
    """
    stale = 0
    for generation in generations:
        if evaluator.remaining == 0:
            break
        key_ask, key_tell = jax.random.split(jax.random.fold_in(key_loop, generation))
        population, state = strategy.ask(key_ask, state, params)  # [pop, num_genes]
        paths, scales = decode(rep, np.asarray(population))
        before = evaluator.evaluations
        scores = evaluator(paths, scales)
        stale = stale + 1 if evaluator.evaluations == before else 0
        fitness = fitness_fn(scores) if len(scores) else np.zeros(0)
        tracker.record(generation, evaluator.evaluations, paths, scales, scores, fitness)
        if len(scores) < pop_size or stale >= max_stale_generations:
            break
        state, _ = strategy.tell(key_tell, population, jnp.asarray(-fitness, jnp.float32), state, params)
    return state
