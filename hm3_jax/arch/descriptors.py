"""Block descriptors phi(block) and the fixed action embeddings used by Wolpertinger selection.

HM3 leaves phi open (HM3_SPEC "The path MDP"); ours is cheap, deterministic and computed once per pool. For pool
block ``(m, l)`` (pool index ``m * L + l``) and every weight-matrix leaf ``w`` of the block pytree (leaves with at
least 2 per-block axes; biases and norm scales are skipped), with the task vector
``tau_{m,l}^w = vec(block_{m,l}^w - base_l^w)``:

* ``||tau_{m,l}^w||_2`` (the size of the block's change from the base);
* ``cos(tau_{m,l}^w, tau_{m',l}^w)`` for every other source ``m' != m`` in increasing order of ``m'`` (the merged
  model included), 0 when either vector is zero;
* the relative depth ``l / (L - 1)`` (0 when ``L = 1``), once per block.

Leaves are taken in ``jax.tree.leaves`` order (sorted dict keys), so the feature layout is deterministic. The
raw feature matrix ``[P, d]`` (``d = num_matrices * num_sources + 1``) is then standardised column-wise over
the P blocks (zero mean, unit variance; constant columns become 0), so features of very different scales
(norms vs cosines) enter the network's linear layer on an equal footing.

Action embeddings (Wolpertinger's discrete action set, HM3_SPEC): action ``a < P`` is
``[one_hot(m, num_sources + 1); l / L; phi_a]``, STOP is ``[one_hot(num_sources, num_sources + 1); 0; 0]``,
i.e. STOP is a source of its own.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from hm3_jax import models


def block_descriptors(pool: Any, base_blocks: Any, num_sources: int) -> jax.Array:
    """phi for every pool block (module docstring), standardised.

    Args:
      pool: pytree whose leaves are ``[P, ...]`` with ``P = num_sources * L`` (``make_pool`` layout: source ``m``'s
        block ``l`` at index ``m * L + l``), or a parted pool of ``num_sources`` parts (leaves ``[L, ...]``;
        ``models.make_parted_pool``): each leaf's parts are stacked (in float32) one leaf at a time.
      base_blocks: the base model's ``"blocks"`` pytree, same structure, leaves ``[L, ...]``.
      num_sources: number of sources (K experts + 1 merged).

    Returns:
      ``[P, num_matrices * num_sources + 1]`` float32 standardised descriptors.
    """
    if models.is_parted(pool):
        if len(pool) != num_sources:
            raise ValueError(f"parted pool has {len(pool)} parts, expected num_sources={num_sources}")
        models.check_parted_pool(pool)
        pool_def = jax.tree.structure(pool[0])
        pool_leaves = [list(group) for group in zip(*(jax.tree.leaves(part) for part in pool), strict=True)]
    else:
        pool_leaves, pool_def = jax.tree.flatten(pool)
    base_leaves, base_def = jax.tree.flatten(base_blocks)
    if pool_def != base_def:
        raise ValueError(f"pool and base_blocks must share one tree structure, got {pool_def} vs {base_def}")
    if not pool_leaves:
        raise ValueError("pool has no leaves")
    num_layers = base_leaves[0].shape[0]
    pool_size = num_sources * num_layers
    features = []
    for index, (p, b) in enumerate(zip(pool_leaves, base_leaves, strict=True)):
        if isinstance(p, list):  # a parted pool's leaf: its parts [L, ...] -> [P, ...] as float32
            if p[0].ndim < 3:  # biases and norm scales: not a weight matrix
                continue
            p = jnp.concatenate([jnp.asarray(x, jnp.float32) for x in p])
        if p.shape[0] != pool_size or b.shape[0] != num_layers or p.shape[1:] != b.shape[1:]:
            raise ValueError(
                f"leaf {index}: pool shape {p.shape} and base shape {b.shape} do not match "
                f"num_sources={num_sources} x L={num_layers}"
            )
        if p.ndim < 3:  # biases and norm scales: not a weight matrix
            continue
        p32 = jnp.asarray(p, jnp.float32).reshape(num_sources, num_layers, -1)
        tau = p32 - jnp.asarray(b, jnp.float32).reshape(1, num_layers, -1)
        norms = jnp.linalg.norm(tau, axis=-1)  # [S, L]
        unit = tau / jnp.where(norms > 0, norms, 1.0)[..., None]
        cos = jnp.einsum("mld,nld->lmn", unit, unit)  # [L, S, S]
        others = [[n for n in range(num_sources) if n != m] for m in range(num_sources)]
        cos_others = cos[
            :, jnp.arange(num_sources)[:, None], jnp.array(others, jnp.int32).reshape(num_sources, -1)
        ]
        # [L, S, S-1] -> [S, L, S-1] -> [P, S-1]
        cos_others = jnp.transpose(cos_others, (1, 0, 2)).reshape(pool_size, num_sources - 1)
        features.append(norms.reshape(pool_size, 1))
        features.append(cos_others)
    if not features:
        raise ValueError("pool has no weight-matrix leaves (leaves with >= 2 axes per block)")
    depth = jnp.arange(num_layers, dtype=jnp.float32) / max(num_layers - 1, 1)
    features.append(jnp.tile(depth, num_sources)[:, None])
    raw = jnp.concatenate(features, axis=1)
    return standardise(raw)


def standardise(features: jax.Array) -> jax.Array:
    """Column-wise ``(x - mean) / std`` over the rows of ``features [P, d]``; constant columns become 0."""
    mean = features.mean(axis=0)
    std = features.std(axis=0)
    return jnp.where(std > 1e-8, (features - mean) / jnp.where(std > 1e-8, std, 1.0), 0.0)


def action_embeddings(descriptors: jax.Array, num_sources: int) -> jax.Array:
    """Fixed embeddings of the ``P + 1`` actions (module docstring).

    Args:
      descriptors: ``[..., P, d]`` phi of the pool blocks (leading axes, e.g. one table per preference, kept).
      num_sources: number of sources.

    Returns:
      ``[..., P + 1, num_sources + 2 + d]`` float32, row ``P`` is STOP.
    """
    pool_size, dim = descriptors.shape[-2:]
    if pool_size % num_sources:
        raise ValueError(f"pool size {pool_size} is not a multiple of num_sources={num_sources}")
    num_layers = pool_size // num_sources
    source = jnp.repeat(jnp.arange(num_sources), num_layers)
    layer = jnp.tile(jnp.arange(num_layers), num_sources)
    blocks = jnp.concatenate(
        [
            jax.nn.one_hot(source, num_sources + 1),
            (layer / num_layers)[:, None],
        ],
        axis=1,
    )  # [P, S + 2]
    stop = jnp.concatenate([jax.nn.one_hot(num_sources, num_sources + 1), jnp.zeros((1,))])[None]
    lead = descriptors.shape[:-2]
    fixed = jnp.broadcast_to(jnp.concatenate([blocks, stop], 0), lead + (pool_size + 1, num_sources + 2))
    phi = jnp.concatenate([descriptors, jnp.zeros(lead + (1, dim), descriptors.dtype)], axis=-2)
    return jnp.concatenate([fixed, phi.astype(jnp.float32)], axis=-1)
