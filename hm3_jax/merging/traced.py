"""DARE-TIES with traced hyperparameters (HM3_SPEC Eq. 5), for searches over the merge's hyperparameters.

`dare_ties_traced` takes density, drop rate, scale and sign election as traced scalars and per-block task
weights, so a search (the parameter level's CMA-ES, `hm3_jax.search.param_level`) scores new candidates
without recompiling; it streams tensor by tensor (`dare_ties_leaf`, one jitted program per tensor shape).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hm3_jax.merging.groups import is_stacked, path_name
from hm3_jax.merging.host_leaves import fetched, on_host, stacked


def dare_ties_traced(base, experts, key, block_weights, shell_weights, density, drop_rate, scale, elect=1.0):
    """DARE-TIES (HM3_SPEC Eq. 5) with traced hyperparameters, for the CMA-ES search.

    Per leaf and block: `delta_k = theta_k - base`; DARE keeps each entry with probability `1 - p` and
    rescales by `1 / (1 - p)`; TIES keeps the entries whose magnitude is at or above the `(1 - density)`
    quantile of `|delta_k|` (a quantile threshold instead of an exact top-k, so `density` can be traced);
    the sign per entry is the sign of `sum_k w_k delta_k`; `Theta = base + scale * sum_k w_k m_k delta_k`
    over the entries that agree with it (no normalisation, as `hm3_merge`). With `elect = 0` no sign is
    elected (every entry is kept): at density 1 and drop rate 0 this is task arithmetic
    `Theta = base + scale * sum_k w_k delta_k` (Ilharco et al. 2023).

    Streams tensor by tensor (issue 16): each shell leaf and each block of a stacked `blocks/...` leaf is one
    call of a jitted program (`dare_ties_leaf`, compiled once per tensor shape; the hyperparameters stay traced),
    so the float32 temporaries are those of one tensor's K copies, never of the whole model (the whole-model
    program needed 16.7 GiB of temporaries for three Qwen2.5-0.5B-shaped experts, 262 GiB for Llama-2-7B's;
    `python -m experiments.plan`).

    Args: base / experts: params pytrees; key; block_weights [K, L]; shell_weights [K]; density, drop_rate,
      scale: scalars; elect: scalar, 1 (TIES sign election) or 0 (none). Returns: merged params with the
      base's dtypes: host (numpy) arrays when base and experts are host arrays (a run on a mesh; each tensor
      fetched as it is made, so device 0 never holds the merged model whole: `host_leaves`), else device arrays.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(base)
    expert_leaves = [jax.tree.leaves(e) for e in experts]
    host = on_host(base, *experts)  # host sources (a run on a mesh): each merged tensor to the host when made
    hp = [jnp.asarray(x, jnp.float32) for x in (density, drop_rate, scale, elect)]
    out = []
    for index, (path, leaf) in enumerate(leaves):
        leaf_key, thetas = jax.random.fold_in(key, index), [el[index] for el in expert_leaves]
        if is_stacked(
            path_name(path)
        ):  # block by block: block l with key fold_in(leaf_key, l), weights [:, l]
            blocks = [
                fetched(
                    dare_ties_leaf(
                        False,
                        jax.random.fold_in(leaf_key, l),
                        leaf[l],
                        [t[l] for t in thetas],
                        block_weights[:, l],
                        *hp,
                    ),
                    host,
                )
                for l in range(leaf.shape[0])
            ]
            out.append(stacked(blocks, host))
        else:
            out.append(fetched(dare_ties_leaf(False, leaf_key, leaf, thetas, shell_weights, *hp), host))
    return jax.tree_util.tree_unflatten(treedef, out)


@functools.partial(jax.jit, static_argnames=("stacked",))
def dare_ties_leaf(stacked, leaf_key, leaf, thetas, weights, density, drop_rate, scale, elect):
    """One leaf of `dare_ties_traced`: base `leaf` [...] (a stacked `blocks/...` leaf [L, ...], block l with
    key `fold_in(leaf_key, l)` and weights `weights[:, l]`), the K experts' `thetas`, `weights` [K] or [K, L]."""
    thetas = jnp.stack(thetas).astype(jnp.float32)  # [K, ...]

    def one(k, b, th, w):
        delta = th - b[None]
        keep = jax.random.bernoulli(k, 1.0 - drop_rate, delta.shape)
        delta = jnp.where(keep, delta / (1.0 - drop_rate), 0.0)
        mag = jnp.abs(delta).reshape(delta.shape[0], -1)
        thr = jnp.quantile(mag, 1.0 - density, axis=1)
        delta = jnp.where(jnp.abs(delta) >= thr.reshape((-1,) + (1,) * (delta.ndim - 1)), delta, 0.0)
        weighted = delta * w.reshape((-1,) + (1,) * (delta.ndim - 1))
        sign = jnp.sign(weighted.sum(0))
        agree = (jnp.sign(delta) == sign[None]) | (elect < 0.5)
        return b + scale * jnp.where(agree, weighted, 0.0).sum(0)

    b32 = leaf.astype(jnp.float32)
    if stacked:
        keys = jax.vmap(lambda i: jax.random.fold_in(leaf_key, i))(jnp.arange(b32.shape[0]))
        merged = jax.vmap(one, in_axes=(0, 0, 1, 1))(keys, b32, thetas, weights)
    else:
        merged = one(leaf_key, b32, thetas, weights)
    return merged.astype(leaf.dtype)
