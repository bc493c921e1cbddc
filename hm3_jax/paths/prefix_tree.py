"""Prefix-tree evaluation: paths that share a prefix share its hidden states.

A batch of (canonical, distinct) paths is a trie whose node at depth d is one (pool block, junction row) step
after a given prefix. `build_prefix_tree` lists the nodes in depth-first preorder (= the paths sorted
lexicographically, shorter prefixes first); `make_tree_chunk_fn` runs them with a `lax.scan` over nodes that
carries one hidden-state slot per depth, `H [T_max + 1, B, S, D]`:

    node (depth d, block p, junction s, b):   H[d] = block_p(H[d - 1] * s + b)
    node that ends a path:                    outputs = leaf_fn(shell, H[d])       (LM head + objectives)

In preorder the parent of a node at depth d is the last node visited at depth d - 1, so `H[d - 1]` always
holds it. A plain evaluation runs sum_i T_i block steps; the tree runs one per distinct prefix. The node list
is cut into fixed-size chunks (the scan carry `H` passes from chunk to chunk), so the compiled function never
depends on the batch and new batches never recompile. Results equal plain evaluation exactly when the block
and head computations are bitwise deterministic for equal inputs (they are on CPU; checked in the tests).

Only teacher-forced objectives go through the tree; greedy decoding (chrF) re-runs every generated token
through the whole path, so decode objectives are evaluated per distinct path by the plain engine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax import models


class PrefixTree(NamedTuple):
    """Nodes of a prefix tree in depth-first preorder (all arrays [num_nodes], junction rows [num_nodes, D]).

    depth: 1..T (0 for the root of an empty path and for padding nodes); block: pool index (0 when no block
    is applied); apply: whether the node applies a block; terminal: index (into the batch given to
    `build_prefix_tree`) of the path that ends at this node, or -1; scale / shift: junction rows or None.
    """

    depth: np.ndarray
    block: np.ndarray
    apply: np.ndarray
    terminal: np.ndarray
    scale: np.ndarray | None
    shift: np.ndarray | None

    @property
    def num_nodes(self) -> int:
        return int(self.depth.shape[0])

    @property
    def num_block_steps(self) -> int:
        """Block applications the tree runs (its distinct non-empty prefixes)."""
        return int(self.apply.sum())


def build_prefix_tree(paths: np.ndarray, lengths: np.ndarray, junction: dict | None = None) -> PrefixTree:
    """Builds the preorder node list of distinct canonical paths.

    Args:
      paths: int32 [N, T_max], real steps first (see `cache.canonicalize`); rows must be distinct models.
      lengths: int32 [N] number of real steps per row.
      junction: None or {"scale", "shift"} [N, T_max, D] (rows aligned with `paths`).
    Returns: a `PrefixTree`; every path is the `terminal` of exactly one node.
    """
    n = paths.shape[0]

    def step_key(i, t):
        if junction is None:
            return (int(paths[i, t]),)
        return (int(paths[i, t]), junction["scale"][i, t].tobytes(), junction["shift"][i, t].tobytes())

    seqs = [tuple(step_key(i, t) for t in range(int(lengths[i]))) for i in range(n)]
    order = sorted(range(n), key=lambda i: seqs[i])
    depth, block, apply, terminal, rows = [], [], [], [], []
    prev: tuple = ()
    for i in order:
        seq = seqs[i]
        if seq == prev and i != order[0]:
            raise ValueError("build_prefix_tree needs distinct paths; deduplicate them first")
        common = 0
        while common < min(len(seq), len(prev)) and seq[common] == prev[common]:
            common += 1
        if len(seq) == 0:  # the empty path: the head runs on the embeddings
            depth.append(0)
            block.append(0)
            apply.append(False)
            terminal.append(i)
            rows.append((i, 0))
        for t in range(common, len(seq)):
            depth.append(t + 1)
            block.append(int(paths[i, t]))
            apply.append(True)
            terminal.append(i if t == len(seq) - 1 else -1)
            rows.append((i, t))
        if common == len(seq) and len(seq) > 0:
            # impossible for distinct paths in lexicographic order (a prefix sorts before its extensions)
            raise AssertionError("prefix-tree invariant violated")
        prev = seq
    scale = shift = None
    if junction is not None:
        d = junction["scale"].shape[-1]
        idx_i = np.array([r[0] for r in rows], np.int64)
        idx_t = np.array([r[1] for r in rows], np.int64)
        scale = junction["scale"][idx_i, idx_t].reshape(-1, d).astype(np.float32)
        shift = junction["shift"][idx_i, idx_t].reshape(-1, d).astype(np.float32)
    return PrefixTree(
        depth=np.asarray(depth, np.int32),
        block=np.asarray(block, np.int32),
        apply=np.asarray(apply, bool),
        terminal=np.asarray(terminal, np.int32),
        scale=scale,
        shift=shift,
    )


def chunk_nodes(tree: PrefixTree, chunk_size: int, hidden_size: int):
    """Pads the nodes to a multiple of `chunk_size` with no-op nodes; yields dicts of [chunk_size] arrays."""
    num = tree.num_nodes
    padded = max(chunk_size, -(-num // chunk_size) * chunk_size)
    pad = padded - num

    def padarr(x, value):
        return np.concatenate([x, np.full((pad,) + x.shape[1:], value, x.dtype)])

    nodes = {
        "depth": padarr(tree.depth, 0),
        "block": padarr(tree.block, 0),
        "apply": padarr(tree.apply, False),
        "terminal": padarr(tree.terminal, -1),
    }
    if tree.scale is not None:
        nodes["scale"] = padarr(tree.scale.reshape(num, hidden_size), 1.0)
        nodes["shift"] = padarr(tree.shift.reshape(num, hidden_size), 0.0)
    for start in range(0, padded, chunk_size):
        yield {k: v[start : start + chunk_size] for k, v in nodes.items()}


def make_tree_chunk_fn(block_fn: Callable, leaf_fn: Callable, with_junction: bool) -> Callable:
    """The scan over one chunk of nodes (pure; the caller jits it).

    Args:
      block_fn: (block_params, h [B, S, D], ctx) -> h, one pool block.
      leaf_fn: (shell, hs tuple of [B, S, D]) -> pytree of per-path outputs (head + objectives).
      with_junction: whether nodes carry "scale"/"shift" rows.
    Returns:
      chunk_fn(shell, pool, buffers, ctxs, nodes) -> (buffers, outputs): buffers is a tuple (one entry per
      input batch) of [T_max + 1, B, S, D] slots, ctxs the matching block contexts, nodes a dict of
      [chunk] arrays from `chunk_nodes`; outputs is leaf_fn's pytree stacked on a leading [chunk] axis,
      zeros on non-terminal nodes.
    """

    def chunk_fn(shell, pool, buffers, ctxs, nodes):
        out_shape = jax.eval_shape(lambda: leaf_fn(shell, tuple(b[0] for b in buffers)))

        def visit(buffers, node):
            d = node["depth"]
            parent = jnp.maximum(d - 1, 0)

            def run_block(hs):
                if models.is_parted(pool):
                    p = models.pool_block(pool, node["block"])
                else:  # the stacked pool's gather as it always was (the same compiled programs)
                    p = jax.tree.map(lambda x: x[node["block"]], pool)
                out = []
                for h, ctx in zip(hs, ctxs, strict=True):
                    if with_junction:
                        h = h * node["scale"].astype(h.dtype) + node["shift"].astype(h.dtype)
                    out.append(block_fn(p, h, ctx))
                return tuple(out)

            hs = tuple(jax.lax.dynamic_index_in_dim(b, parent, 0, keepdims=False) for b in buffers)
            hs = jax.lax.cond(node["apply"], run_block, lambda hs: hs, hs)
            buffers = tuple(
                jax.lax.dynamic_update_index_in_dim(b, h, d, 0) for b, h in zip(buffers, hs, strict=True)
            )
            outputs = jax.lax.cond(
                node["terminal"] >= 0,
                lambda hs: leaf_fn(shell, hs),
                lambda hs: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape),
                hs,
            )
            return buffers, outputs

        return jax.lax.scan(visit, buffers, nodes)

    return chunk_fn
