"""AdaMerging (Yang et al., ICLR 2024): task-arithmetic coefficients learned by entropy minimisation on unlabelled
inputs.

The merged model is task arithmetic with learned coefficients (paper Eqs. 3 and 4):

    task-wise:   theta(c) = base + sum_k c_k delta_k,                  c [K]
    layer-wise:  theta(c)^(l) = base^(l) + sum_k c_k^(l) delta_k^(l),  one c_k^(l) per parameter tensor l
                 (here per leaf, and per block for a leaf stacked under "blocks": c [K] or [K, L] per leaf),

and c minimises the preference-weighted Shannon entropy of the merged model's predictions on each task's
unlabelled search-split inputs (paper Eq. 6, with the preference lambda in place of the uniform sum):

    min_c  sum_k lambda_k H_k(c),   H_k(c) = sum_{n,s} w_{n,s} H(softmax(f_k(theta(c), x_n))_s) / sum_{n,s} w_{n,s},

f_k = task k's `forward_fn` (its logits `[B, ..., C]`, e.g. a frozen task head on shared features), H the
entropy per prediction, w the token weights (1 on real tokens), lambda normalised to sum 1. As in the paper's
code, c starts at `init` (0.3) and lives in `bounds` ([0, 1]): here every Adam step (optax, `learning_rate`,
paper 1e-3) is followed by the projection `c <- clip(c, lo, hi)`. Each of the fixed `num_steps` steps draws a
minibatch of `batch_size` rows per task without replacement (`permutation(fold_in(step_key, k))[:batch]`,
step keys `split(key, num_steps)`), so a run is a pure function of its key.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hm3_jax.merging.calibration import Calibration, broadcast_weights, check_calibration, row_weights
from hm3_jax.merging.groups import is_stacked, path_name
from hm3_jax.merging.regmean import check_models, check_preference

GRANULARITIES = ("task", "layer")


class AdaMergingResult(NamedTuple):
    """merged: the pytree at the learned coefficients (base dtypes); coefficients: `[K]` (task-wise) or
    {leaf name: `[K]` or `[K, L]`} (layer-wise); losses: `[num_steps]` the objective on each step's minibatch
    before its update."""

    merged: Any
    coefficients: Any
    losses: jax.Array


def _float_leaves(base) -> list[tuple[str, int]]:
    """(name, flat index) of the floating leaves of `base`."""
    leaves = jax.tree_util.tree_flatten_with_path(base)[0]
    return [
        (path_name(p), i)
        for i, (p, x) in enumerate(leaves)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
    ]


def init_coefficients(base: Any, num_models: int, granularity: str, init: float = 0.3) -> Any:
    """Coefficients filled with `init`: `[K]` (task-wise) or {leaf name: `[K]` / `[K, L]` (stacked)} for every
    floating leaf of `base` (layer-wise)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"AdaMerging: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "task":
        return jnp.full((num_models,), init, jnp.float32)
    leaves = jax.tree.leaves(base)
    out = {}
    for name, i in _float_leaves(base):
        blocks = (np.shape(leaves[i])[0],) if is_stacked(name) and np.ndim(leaves[i]) >= 1 else ()
        out[name] = jnp.full((num_models,) + blocks, init, jnp.float32)
    return out


def merge_with_coefficients(base: Any, models: Sequence[Any], coefficients: Any) -> Any:
    """`theta(c) = base + sum_k c_k delta_k` (module docstring), float32 arithmetic, base dtypes out.

    Args:
      base: pytree; models: K pytrees like it.
      coefficients: `[K]` (every leaf) or {leaf name: `[K]` or `[K, L]`} (`init_coefficients`' layout).
    """
    leaves, treedef = jax.tree.flatten(base)
    model_leaves = [jax.tree.leaves(m) for m in models]
    out = list(leaves)
    for name, i in _float_leaves(base):
        b = jnp.asarray(leaves[i])
        deltas = jnp.stack([jnp.asarray(ml[i], jnp.float32) for ml in model_leaves]) - b.astype(jnp.float32)
        c = coefficients if not isinstance(coefficients, dict) else coefficients[name]
        c = c.reshape(c.shape + (1,) * (deltas.ndim - c.ndim))
        out[i] = (b.astype(jnp.float32) + jnp.sum(c * deltas, axis=0)).astype(b.dtype)
    return jax.tree.unflatten(treedef, out)


def prediction_entropy(logits: jax.Array, weights: jax.Array) -> jax.Array:
    """Weighted mean Shannon entropy of `softmax(logits)` over predictions: logits `[B, ..., C]`, weights a
    prefix shape of `[B, ...]`; 0 when the weights sum to 0."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)  # [B, ...]
    w = broadcast_weights(weights, entropy.shape, "AdaMerging")
    return jnp.sum(w * entropy) / jnp.maximum(jnp.sum(w), 1e-12)


def adamerging(
    key: jax.Array,
    base: Any,
    models: Sequence[Any],
    calibration: Sequence[Calibration],
    *,
    num_steps: int,
    weights: Sequence[float] | None = None,
    granularity: str = "layer",
    learning_rate: float = 1e-3,
    init: float = 0.3,
    batch_size: int = 16,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> AdaMergingResult:
    """Learns AdaMerging coefficients (module docstring) and returns the merged model.

    Args:
      key: PRNG key of the minibatch draws.
      base: pytree; models: K pytrees of its structure and shapes.
      calibration: K `Calibration`s, task k's search-split inputs and `forward_fn` (logits `[B, ..., C]`).
      num_steps: the fixed number of Adam steps (>= 1; the paper runs 500).
      weights: the preference lambda (K numbers >= 0 not all 0; default uniform, the paper). A task of weight 0
        is not run.
      granularity: "task" or "layer".
      learning_rate: Adam's step size. init: the starting coefficient. batch_size: rows per task per step.
      bounds: (lo, hi), the box the coefficients are projected to after every step.
    Returns:
      AdaMergingResult(merged, coefficients, losses [num_steps]).
    Raises:
      ValueError: no models, structure/shape mismatch, bad weights, missing/empty calibration data, a bad
        granularity, num_steps or batch_size < 1, or an init outside the bounds.
    """
    models = check_models(base, models, "AdaMerging")
    lam = check_preference(weights, len(models), "AdaMerging")
    check_calibration(calibration, len(models), "AdaMerging")
    if int(num_steps) < 1 or int(batch_size) < 1:
        raise ValueError(f"AdaMerging: num_steps and batch_size must be >= 1, got {num_steps}, {batch_size}")
    lo, hi = float(bounds[0]), float(bounds[1])
    if not lo <= init <= hi:
        raise ValueError(
            f"AdaMerging: need lo <= init <= hi for bounds (lo, hi), got {bounds} and init {init}"
        )
    coefficients = init_coefficients(base, len(models), granularity, init)
    lam = lam / lam.sum()
    live = tuple(k for k in range(len(models)) if lam[k] > 0)
    coefficients, losses = _fit(
        key,
        base,
        models,
        coefficients,
        tuple(jnp.asarray(calibration[k].inputs) for k in live),
        tuple(row_weights(calibration[k]) for k in live),
        jnp.asarray(lam[list(live)], jnp.float32),
        forward_fns=tuple(calibration[k].forward_fn for k in live),
        live=live,
        sizes=tuple(min(int(batch_size), calibration[k].num_rows) for k in live),
        num_steps=int(num_steps),
        learning_rate=float(learning_rate),
        bounds=(lo, hi),
    )
    return AdaMergingResult(merge_with_coefficients(base, models, coefficients), coefficients, losses)


@functools.partial(
    jax.jit, static_argnames=("forward_fns", "live", "sizes", "num_steps", "learning_rate", "bounds")
)
def _fit(
    key,
    base,
    models,
    coefficients,
    inputs,
    weights,
    lam,
    *,
    forward_fns,
    live,
    sizes,
    num_steps,
    learning_rate,
    bounds,
):
    """The Adam loop of `adamerging`, jitted once per forward, shapes and settings (the preference `lam` [K'],
    the tasks of positive weight `live`, is traced): (coefficients, losses [num_steps])."""
    lo, hi = bounds

    def objective(coeffs, step_key):
        merged = merge_with_coefficients(base, models, coeffs)
        total = jnp.zeros((), jnp.float32)
        for j, (k, forward_fn, x, w, size) in enumerate(
            zip(live, forward_fns, inputs, weights, sizes, strict=True)
        ):
            rows = jax.random.permutation(jax.random.fold_in(step_key, k), x.shape[0])[:size]
            total = total + lam[j] * prediction_entropy(forward_fn(merged, x[rows]), w[rows])
        return total

    optimiser = optax.adam(learning_rate)

    def step(carry, step_key):
        coeffs, opt_state = carry
        loss, grads = jax.value_and_grad(objective)(coeffs, step_key)
        updates, opt_state = optimiser.update(grads, opt_state, coeffs)
        coeffs = jax.tree.map(lambda c: jnp.clip(c, lo, hi), optax.apply_updates(coeffs, updates))
        return (coeffs, opt_state), loss

    (coefficients, _), losses = jax.lax.scan(
        step, (coefficients, optimiser.init(coefficients)), jax.random.split(key, num_steps)
    )
    return coefficients, losses
