"""Scalarisations of a maximised objective vector for one preference (HM3_SPEC "Scalarisations"), both maximised.

Both are jittable and broadcast over leading axes: ``points [..., k]`` with ``pref [..., k]`` gives ``[...]``.
For every point against every preference use ``points[None, :, :]`` and ``pref[:, None, :]``.
"""

import jax
import jax.numpy as jnp
import numpy as np


def _check_last_axis(points, pref, ideal=None):
    if points.shape[-1] != pref.shape[-1] or (ideal is not None and ideal.shape[-1] != points.shape[-1]):
        shapes = f"points {points.shape}, pref {pref.shape}" + (
            "" if ideal is None else f", ideal {ideal.shape}"
        )
        raise ValueError(f"objective axes disagree (last dimension must be k everywhere): {shapes}")


def weighted_sum(points, pref) -> jnp.ndarray:
    """Weighted-sum scalarisation ``g(f; lambda) = sum_k lambda_k f_k`` (maximised; HM3's RL reward).

    Args:
      points: ``[..., k]`` objective values.
      pref: ``[..., k]`` preference weights (broadcast against ``points``).

    Returns:
      ``[...]`` scalarised values, higher is better.
    """
    points, pref = jnp.asarray(points), jnp.asarray(pref)
    _check_last_axis(points, pref)
    return jnp.sum(points * pref, axis=-1)


def tchebycheff(points, pref, ideal) -> jnp.ndarray:
    """Tchebycheff scalarisation ``g(f; lambda, z*) = -max_k lambda_k |f_k - z*_k|`` (maximised, like every
    objective here: the negated weighted Chebyshev distance to the ideal point; a minimiser negates it).

    Args:
      points: ``[..., k]`` objective values.
      pref: ``[..., k]`` preference weights.
      ideal: ``[k]`` (or broadcastable) ideal point z*, e.g. the best source-model score per task (1 after
        normalisation by the ideal point).

    Returns:
      ``[...]`` negated weighted Chebyshev distances to the ideal point; higher is better (0 at the ideal).
      Computed with jax.numpy (jittable) when any input is a jax array, else with numpy in the inputs' dtype
      (the path baselines' host-side float64 fitness).
    """
    xp = jnp if any(isinstance(x, jax.Array) for x in (points, pref, ideal)) else np
    points, pref, ideal = xp.asarray(points), xp.asarray(pref), xp.asarray(ideal)
    _check_last_axis(points, pref, ideal)
    return -xp.max(pref * xp.abs(points - ideal), axis=-1)
