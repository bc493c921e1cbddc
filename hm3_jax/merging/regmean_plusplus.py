"""RegMean++ (Nguyen et al. 2025, arXiv 2508.03121): RegMean with each block's Grams measured through the merged
model's earlier blocks.

RegMean (`regmean.py`) measures every linear layer's input Gram in expert k alone, on task k's inputs. The merged
model will feed layer l with ITS OWN earlier layers' features, so RegMean++ measures block l's Grams with the
already merged blocks 0..l-1 in front of expert k's block l, and merges block by block in forward order. With
`h_k^(l)` the merged prefix's hidden states on task k's calibration inputs,

    X_k^(l) = inputs of block l's linear layers when expert k's block l runs on h_k^(l),
    h_k^(0) = the merged embedding of task k's inputs,  h_k^(l+1) = merged block l applied to h_k^(l),
    W*^(l) = (sum_k lambda_k G~_k^(l))^-1 (sum_k lambda_k G~_k^(l) W_k^(l)),  G_k^(l) = X_k^(l)T X_k^(l) / N_k,

the closed form of RegMean (paper Eq. 2, `G~` the off-diagonal scaling alpha) with the new Grams (RegMean++
Sec. 3; their code merges the embeddings first, then layer by layer, each next layer's inputs computed with the
merged layer). Here that is a fixed point of pure functions, without hooks into the model:

1. `theta_0 = regmean(...)` with the experts' own Grams (plain RegMean): its non-block leaves (embeddings,
   norms outside the blocks, non-block kernels) are the merged model's outside the blocks.
2. For l = 0..L-1: the hybrid `H_k^(l)` = theta's leaves outside the blocks, theta's blocks 0..l-1 (merged) and
   expert k's blocks l..L-1; block l's Grams are `layer_input_grams(H_k^(l))` at block l (blocks after l do not
   influence them), and block l of every stacked leaf is replaced by RegMean's solution with those Grams.
3. Kernels outside the blocks take their Grams through the merged model (all blocks merged): a kernel after the
   blocks (an untied LM head) sees the merged model's features; one before them (a patch embedding) sees the raw
   inputs, as in RegMean.

Leaves without a Gram are merged as in RegMean (the preference-weighted average of task vectors); those of block
l do not depend on the Grams, so each step only changes the kernels of block l. Cost: (L + 2) forward passes of
every expert of positive weight over its calibration rows (`calibration_passes("regmean_plusplus", ...)`), and the
Grams depend on the preference (through the merged prefix), so they are not shared between preferences.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax.merging.calibration import Calibration, check_calibration
from hm3_jax.merging.groups import is_stacked, path_name
from hm3_jax.merging.layer_inputs import layer_input_grams
from hm3_jax.merging.regmean import check_models, check_preference, model_grams, on_own_calibration, regmean


def num_blocks(base: Any) -> int:
    """L, the leading axis of the stacked leaves (0 when there are none)."""
    sizes = {
        int(np.shape(x)[0])
        for p, x in jax.tree_util.tree_flatten_with_path(base)[0]
        if is_stacked(path_name(p)) and np.ndim(x) >= 1
    }
    if len(sizes) > 1:
        raise ValueError(f"RegMean++: stacked leaves disagree on the number of blocks: {sorted(sizes)}")
    return sizes.pop() if sizes else 0


def hybrid(merged: Any, model: Any, block: int) -> Any:
    """`merged` outside the blocks and for blocks < `block`, `model` for blocks >= `block` (every stacked leaf)."""

    def pick(path, m, x):
        if not is_stacked(path_name(path)) or np.ndim(m) < 1:
            return m
        return jnp.concatenate([jnp.asarray(m)[:block], jnp.asarray(x)[block:]], axis=0)

    return jax.tree_util.tree_map_with_path(pick, merged, model)


def _with_block(merged: Any, solved: Any, block: int) -> Any:
    """`merged` with block `block` of every stacked leaf taken from `solved`."""

    def pick(path, m, s):
        if not is_stacked(path_name(path)) or np.ndim(m) < 1:
            return m
        return jnp.asarray(m).at[block].set(jnp.asarray(s)[block])

    return jax.tree_util.tree_map_with_path(pick, merged, solved)


def _outside_blocks(merged: Any, solved: Any) -> Any:
    """`merged` with every leaf outside the blocks taken from `solved`."""
    return jax.tree_util.tree_map_with_path(
        lambda p, m, s: m if is_stacked(path_name(p)) else s, merged, solved
    )


def regmean_plusplus(
    base: Any,
    models: Sequence[Any],
    calibration: Sequence[Calibration],
    *,
    weights: Sequence[float] | None = None,
    alpha: float = 0.9,
    ridge: float = 0.0,
    nonlinear_scale: float = 1.0,
    batch_size: int | None = None,
    grams: Sequence[Any] | None = None,
) -> Any:
    """RegMean++ merge of `models` (module docstring), the Grams measured on `calibration`.

    Args:
      base: pytree (blocks stacked under "blocks" on a leading axis L); models: K pytrees like it.
      calibration: K `Calibration`s, task k's search-split inputs and forward (`regmean.model_grams`' inputs).
      weights: the preference lambda (K numbers >= 0, not all 0; default uniform); a model of weight 0 is not run.
      alpha, ridge, nonlinear_scale: as `regmean`.
      batch_size: calibration rows per forward (None = all at once).
      grams: the experts' own Grams (`model_grams(models, calibration)`), if already computed: step 1's RegMean.
    Returns:
      The merged pytree (base dtypes).
    Raises:
      ValueError: every error of `regmean` and of the calibration check (naming the task or leaf).
    """
    models = check_models(base, models, "RegMean++")
    lam = check_preference(weights, len(models), "RegMean++")
    check_calibration(calibration, len(models), "RegMean++")
    hp = {"weights": lam, "alpha": alpha, "ridge": ridge, "nonlinear_scale": nonlinear_scale}
    if grams is None:
        grams = model_grams(models, calibration, weights=lam, batch_size=batch_size)
    merged = regmean(base, models, grams, **hp)

    def grams_through(params_of):  # K Gram dicts, model k's hybrid on task k's rows (weight-0 models: a copy)
        out = on_own_calibration(
            lambda k, model, calib: layer_input_grams(
                calib.forward_fn, params_of(model), calib.inputs, calib.token_weights, batch_size
            ),
            models,
            calibration,
            lam,
            "RegMean++",
        )
        ref = next(g for g in out if g is not None)
        return [ref if g is None else g for g in out]

    for block in range(num_blocks(base)):
        block_grams = grams_through(lambda model, block=block, merged=merged: hybrid(merged, model, block))
        merged = _with_block(merged, regmean(base, models, block_grams, **hp), block)
    outer_grams = grams_through(lambda model: merged)
    return _outside_blocks(merged, regmean(base, models, outer_grams, **hp))
