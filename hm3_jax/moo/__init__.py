"""Multi-objective toolkit: preferences, scalarisations, Pareto sets, hypervolume, normalisation, plots.

Sign convention (stated once for the whole package): **every objective is maximised**. A point is a row of
task scores, ``points: [n, k]``, higher is better on every axis. Preferences are rows on the probability
simplex, ``[n, k]`` or ``[k]``. Both scalarisations are maximised too (Tchebycheff is the *negated* distance
to the ideal point); searches that minimise (evosax's CMA-ES, the parameter level's Tchebycheff fitness)
negate at their boundary only, never inside this package.

Host-side functions (Pareto masks, dominance, hypervolume, normalisation, plots) take and return numpy
arrays and validate their inputs (NaN, shapes, empty sets) with ``ValueError`` messages that name the
argument. The scalarisations are jittable (``jax.numpy``) and check shapes only.
"""

from hm3_jax.moo.hypervolume import hypervolume
from hm3_jax.moo.normalize import ideal_point, normalize_by_ideal, reference_point
from hm3_jax.moo.pareto import (
    crowding_distance,
    dominance_matrix,
    dominance_summary,
    non_dominated_ranks,
    pareto_mask,
)
from hm3_jax.moo.preferences import das_dennis, dirichlet, validate_preference
from hm3_jax.moo.scalarize import tchebycheff, weighted_sum

__all__ = [
    "crowding_distance",
    "das_dennis",
    "dirichlet",
    "dominance_matrix",
    "dominance_summary",
    "hypervolume",
    "ideal_point",
    "non_dominated_ranks",
    "normalize_by_ideal",
    "pareto_mask",
    "reference_point",
    "tchebycheff",
    "validate_preference",
    "weighted_sum",
]
