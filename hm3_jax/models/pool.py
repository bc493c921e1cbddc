"""Block pools: the blocks of several source models under one index (HM3's architecture space).

Pool index of (source m, block l) is `m * L + l`. A pool is one of two kinds:

* stacked (`make_pool`): a blocks pytree whose leaves are [P, ...], the sources' blocks concatenated on the
  leading axis (a copy of them);
* parted (`make_parted_pool`): a tuple of the sources' own `blocks` pytrees (leaves [L, ...], the same array
  objects the source params hold: no copy). At Qwen2.5-0.5B's shapes a stacked pool of four sources is a
  2.7 GiB copy; a parted one is free (issue 16, docs/scaling.md "Session 12").

`pool_block(pool, idx)` reads block `idx` of either kind under jit (a traced index); `pool_size` and
`block_signature` accept both, so every consumer takes either.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _check_blocks(blocks_list: Sequence[dict], who: str, same_length: bool) -> None:
    """Raises ValueError unless every blocks pytree has blocks 0's structure and per-block shapes (and, when
    `same_length`, its number of blocks L), naming the first one that differs."""
    if len(blocks_list) == 0:
        raise ValueError(f"{who} needs at least one blocks pytree")
    ref = jax.tree.structure(blocks_list[0])
    ref_shapes = [tuple(x.shape[1:]) for x in jax.tree.leaves(blocks_list[0])]
    ref_len = {int(x.shape[0]) for x in jax.tree.leaves(blocks_list[0])}
    if len(ref_len) != 1:
        raise ValueError(f"{who}: blocks 0's leaves disagree on the number of blocks: {sorted(ref_len)}")
    for i, blocks in enumerate(blocks_list[1:], start=1):
        if jax.tree.structure(blocks) != ref:
            raise ValueError(f"{who}: blocks {i} has a different tree structure than blocks 0")
        shapes = [tuple(x.shape[1:]) for x in jax.tree.leaves(blocks)]
        if shapes != ref_shapes:
            paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(blocks)[0]]
            bad = [(p, a, b) for p, a, b in zip(paths, shapes, ref_shapes, strict=True) if a != b]
            raise ValueError(f"{who}: blocks {i} has per-block shapes differing from blocks 0: {bad[:3]}")
        lengths = {int(x.shape[0]) for x in jax.tree.leaves(blocks)}
        if same_length and lengths != ref_len:
            raise ValueError(
                f"{who}: blocks {i} holds {sorted(lengths)} blocks, blocks 0 holds {sorted(ref_len)} "
                "(every part of a pool has the same L: pool index m * L + l)"
            )


def make_pool(blocks_list: Sequence[dict]) -> dict:
    """Concatenates the `"blocks"` of several models on the leading axis (a copy).

    Args: blocks_list: sequence of `params["blocks"]` pytrees with identical structure and per-block shapes
      (leaves [L_m, ...]).
    Returns: pool with leaves [sum_m L_m, ...]; (source m, block l) sits at `m * L + l` when all L_m = L.
    """
    _check_blocks(blocks_list, "make_pool", same_length=False)
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *blocks_list)


def make_parted_pool(blocks_list: Sequence[dict]) -> tuple:
    """A parted pool: the sources' own blocks pytrees, not copied.

    Args: blocks_list: sequence of M `params["blocks"]` pytrees, identical structure, per-block shapes and
      number of blocks L (leaves [L, ...]).
    Returns: tuple of the same M pytrees (the same array objects); pool index m * L + l reads part m, block l.
    """
    _check_blocks(blocks_list, "make_parted_pool", same_length=True)
    return tuple(blocks_list)


def is_parted(pool) -> bool:
    """Whether `pool` is a parted pool (a tuple of per-source blocks pytrees) rather than a stacked one."""
    return isinstance(pool, tuple)


def check_parted_pool(pool: tuple) -> None:
    """Raises ValueError naming the part unless every part has part 0's structure, per-block shapes and L."""
    _check_blocks(list(pool), "parted pool", same_length=True)


def part_length(pool) -> int:
    """L of a parted pool (blocks per part); a stacked pool is one part of `pool_size` blocks."""
    first = pool[0] if is_parted(pool) else pool
    return int(jax.tree.leaves(first)[0].shape[0])


def pool_size(pool) -> int:
    """Number of blocks P in a pool: the leading axis of a stacked pool, M * L of a parted one."""
    if is_parted(pool):
        return len(pool) * part_length(pool)
    return int(jax.tree.leaves(pool)[0].shape[0])


def block_signature(pool):
    """The structure, per-block shapes and dtypes of one block of `pool` (either kind): a hashable value equal
    for pools whose blocks are interchangeable."""
    first = pool[0] if is_parted(pool) else pool
    leaves, treedef = jax.tree.flatten(first)
    return str(treedef), tuple((tuple(x.shape[1:]), str(x.dtype)) for x in leaves)


def pool_block(pool, idx):
    """Block `idx` of `pool` (either kind) under jit: a pytree of one block's leaves (no leading axis).

    Stacked: `dynamic_index_in_dim(leaf, idx)` (XLA clamps idx into [0, P)). Parted: `lax.switch` on
    `idx // L` over the parts, each reading block `idx % L` of its part, with idx first clamped into
    [0, P) as the stacked gather clamps it; under `vmap` with a batched idx every part is read and one
    selected (the same values)."""
    if not is_parted(pool):
        return jax.tree.map(lambda leaf: jax.lax.dynamic_index_in_dim(leaf, idx, 0, keepdims=False), pool)
    num_layers = part_length(pool)
    idx = jnp.clip(jnp.asarray(idx, jnp.int32), 0, len(pool) * num_layers - 1)

    def reader(part):
        return lambda l: jax.tree.map(
            lambda leaf: jax.lax.dynamic_index_in_dim(leaf, l, 0, keepdims=False), part
        )

    if len(pool) == 1:
        return reader(pool[0])(idx)
    return jax.lax.switch(idx // num_layers, [reader(part) for part in pool], idx % num_layers)


def gather_blocks(pool, indices) -> dict:
    """Blocks `indices` (concrete ints, each in [0, P)) of either kind stacked: leaves [len(indices), ...]."""
    indices = np.asarray(indices, np.int64)
    if not is_parted(pool):
        return jax.tree.map(lambda x: x[indices], pool)
    if indices.size == 0:
        return jax.tree.map(lambda x: x[:0], pool[0])
    num_layers = part_length(pool)
    rows = [jax.tree.map(lambda x, i=int(i): x[i % num_layers], pool[int(i) // num_layers]) for i in indices]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *rows)


def leading_blocks(pool, num_blocks: int):
    """The pool of its first `num_blocks` blocks: the leading rows of a stacked pool, the first
    `num_blocks / L` parts of a parted one (no copy; `num_blocks` must be a multiple of L)."""
    if not is_parted(pool):
        return jax.tree.map(lambda x: x[:num_blocks], pool)
    num_layers = part_length(pool)
    if num_blocks % num_layers:
        raise ValueError(
            f"a parted pool's leading blocks come in whole parts of L={num_layers}, got {num_blocks}"
        )
    return tuple(pool[: num_blocks // num_layers])


def stacked(pool) -> dict:
    """A stacked pool of `pool`'s blocks (itself when already stacked; a copy of the parts otherwise)."""
    return make_pool(list(pool)) if is_parted(pool) else pool
