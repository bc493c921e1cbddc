"""Grid-search baseline over a structured family of paths (the paper's Table 7 "Grid Search").

Family: the layer-wise source choices ("frankenmerge by layer"): for each layer position l = 0..L-1 pick a
source m_l, giving the path ``(m_0 * L + 0, m_1 * L + 1, ..., m_{L-1} * L + L-1)`` padded with -1 to T_max,
no junction scaling. There are ``S ** L`` such paths. If the budget covers the family, every path is
evaluated in lexicographic order of ``(m_0, ..., m_{L-1})``; otherwise ``budget`` distinct paths are drawn
uniformly without replacement (deterministically from the key) and evaluated in the drawn order. The family
needs ``T_max >= L``.

The search is preference-free: it returns every evaluated path, the non-dominated front and, for each given
preference, the path with the best weighted sum.
"""

import jax
import numpy as np

from hm3_jax.baselines.common import BudgetedEvaluator, check_budget, check_geometry, select_rows
from hm3_jax.moo.pareto import pareto_mask
from hm3_jax.moo.preferences import validate_preference


def family_size(geometry) -> int:
    g = check_geometry(geometry)
    return g.num_sources**g.num_layers


def family_paths(geometry, indices) -> np.ndarray:
    """Paths ``[len(indices), T_max]`` of the family members with the given indices (base-S digits, most
    significant = layer 0)."""
    g = check_geometry(geometry)
    indices = np.asarray(indices, dtype=object)  # Python ints: S ** L may exceed int64
    digits = np.zeros((len(indices), g.num_layers), np.int64)
    rest = indices.copy()
    for l in range(g.num_layers - 1, -1, -1):
        digits[:, l] = (rest % g.num_sources).astype(np.int64)
        rest = rest // g.num_sources
    paths = np.full((len(indices), g.t_max), -1, np.int32)
    paths[:, : g.num_layers] = digits * g.num_layers + np.arange(g.num_layers)
    return paths


_ENUMERATE_LIMIT = 1 << 20


def _sample_indices(key, geometry, count: int) -> list[int]:
    """``count`` distinct family indices drawn uniformly (exact for any family size, deterministic)."""
    size = geometry.num_sources**geometry.num_layers
    if size <= _ENUMERATE_LIMIT:  # jax.random.choice materialises range(size)
        return [int(i) for i in np.asarray(jax.random.choice(key, size, (count,), replace=False))]
    # Huge family: draw the L base-S digits uniformly and reject repeats.
    weights = [geometry.num_sources ** (geometry.num_layers - 1 - l) for l in range(geometry.num_layers)]
    chosen: dict[int, None] = {}
    draw = 0
    while len(chosen) < count:
        shape = (count, geometry.num_layers)
        digits = np.asarray(jax.random.randint(jax.random.fold_in(key, draw), shape, 0, geometry.num_sources))
        for row in digits.tolist():
            chosen.setdefault(sum(d * w for d, w in zip(row, weights, strict=True)), None)
            if len(chosen) == count:
                break
        draw += 1
    return list(chosen)


def run_grid_search(
    key: jax.Array,
    evaluate_fn,
    geometry,
    budget: int,
    *,
    preferences=None,
    batch_size: int = 32,
    progress: bool = True,
) -> dict:
    """Evaluates the layer-wise source-choice family (all of it, or a uniform subsample of ``budget``).

    Args:
      key: PRNG key (used only when the family is larger than the budget).
      evaluate_fn, geometry, budget: as ``run_ea``.
      preferences: optional ``[P, K]`` preferences; the best weighted-sum path is returned for each.
      batch_size: paths per ``evaluate_fn`` call.

    Returns:
      dict with ``archive`` and ``front`` (``paths``, ``junction_scales`` = None, ``scores``),
      ``best_per_preference`` (list of ``{preference, path, scores, fitness}``, empty without preferences),
      ``evaluations``, ``family_size``, ``exhaustive`` and ``history`` (per batch: evaluations so far and the
      best score per objective so far).
    """
    g = check_geometry(geometry)
    budget = check_budget(budget)
    if g.t_max < g.num_layers:
        raise ValueError(f"grid search paths have L={g.num_layers} steps but t_max={g.t_max} < L")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    size = family_size(g)
    exhaustive = size <= budget
    indices = list(range(size)) if exhaustive else _sample_indices(key, g, budget)

    evaluator = BudgetedEvaluator(evaluate_fn, g, budget, progress)
    history = []
    try:
        for start in range(0, len(indices), batch_size):
            evaluator(family_paths(g, indices[start : start + batch_size]), None)
            history.append(
                {
                    "evaluations": evaluator.evaluations,
                    "best_scores": evaluator.archive()["scores"].max(0).tolist(),
                }
            )
    finally:
        evaluator.close()
    archive = evaluator.archive()
    best = []
    if preferences is not None:
        prefs = validate_preference(np.atleast_2d(preferences), k=archive["scores"].shape[1])
        fitness = archive["scores"] @ prefs.T  # [A, P]
        for j, pref in enumerate(prefs):
            i = int(np.argmax(fitness[:, j]))
            best.append(
                {
                    "preference": pref,
                    "path": archive["paths"][i],
                    "scores": archive["scores"][i],
                    "fitness": float(fitness[i, j]),
                }
            )
    return {
        "method": "grid_search",
        "archive": archive,
        "front": select_rows(archive, pareto_mask(archive["scores"])),
        "best_per_preference": best,
        "evaluations": evaluator.evaluations,
        "family_size": size,
        "exhaustive": exhaustive,
        "history": history,
    }
