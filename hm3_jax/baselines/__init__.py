"""Path-space baselines at an equal evaluation budget (HM3_SPEC "Baselines"; issue 6).

All of them talk to the model only through a host-side callback
``evaluate_fn(paths int32 [N, T_max] (-1 padding), junction_scales [N, T_max] | None) -> scores [N, K]``
(normalised task scores, maximised) and count the budget in path evaluations (rows sent to the callback;
repeats within a run are cached and free). See ``common`` for the contract.

* ``run_ea``: Sakana's data-flow-space merging, CMA-ES (evosax) on one preference's weighted sum.
* ``run_moea``: NSGA-II over the same genome, returns a front.
* ``run_grid_search``: layer-wise source choices, enumerated or uniformly subsampled to the budget.
* ``run_de``: differential evolution (evosax) over the same genome, one preference.
"""

from hm3_jax.baselines.common import BudgetedEvaluator, PathGeometry
from hm3_jax.baselines.de import run_de
from hm3_jax.baselines.dfs import DFSRepresentation, decode, make_representation
from hm3_jax.baselines.ea import run_ea
from hm3_jax.baselines.grid import family_paths, family_size, run_grid_search
from hm3_jax.baselines.moea import run_moea

__all__ = [
    "BudgetedEvaluator",
    "DFSRepresentation",
    "PathGeometry",
    "decode",
    "family_paths",
    "family_size",
    "make_representation",
    "run_de",
    "run_ea",
    "run_grid_search",
    "run_moea",
]
