"""Teacher-forced objectives of many paths as one prefix tree (`prefix_tree.py`): every distinct prefix's
blocks run once, over the hidden states of every recorded input batch (`recording.record_objectives`), and the
objectives read the LM head at each path's end. Exactly the scores of plain evaluation, with fewer block steps.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax import models
from hm3_jax.models.path import gather_positions
from hm3_jax.paths import prefix_tree as tree_lib
from hm3_jax.paths.recording import DECODE_METRICS


def make_tree_fn(config, objectives, tf_groups: dict, with_junction: bool, traces: dict, key) -> Callable:
    """The compiled scan over a chunk of tree nodes: `fn(shell, pool, buffers, ctxs, nodes) -> (buffers, outs)`
    (buffers donated). Without junction rows the nodes apply no affine map (as `run_path` without a junction:
    the same arithmetic as plain evaluation). Each trace adds one to `traces[key]`.

    tf_groups: {(B, S): int32 [n, B, S]} distinct input batches of the teacher-forced objectives by shape.
    """
    tf_objs = [o for o in objectives if o.metric not in DECODE_METRICS]
    groups = tf_groups

    def leaf_fn(shell, hs):
        # hs[g]: [n_g, B, S, D] hidden states of every batch of group g at this path's end
        by_shape = dict(zip(groups, hs, strict=True))

        def forward(ids, positions=None):
            shape = tuple(ids.shape)
            if shape not in by_shape:
                raise ValueError(f"forward called with input shape {shape} never seen when recording")
            h_all, known = by_shape[shape], groups[shape]
            if known.shape[0] == 1:
                h = h_all[0]
            else:  # which recorded batch is this? (objectives lax.map over their batches)
                same = jnp.all(jnp.asarray(known) == ids[None], axis=tuple(range(1, known.ndim)))
                h = h_all[jnp.argmax(same)]
            if positions is not None:
                h = gather_positions(config, h, positions)
            return models.head(config, shell, h)

        if config.family == "vit":  # no per-token head: the forward takes no positions
            return tuple(o.device_fn(lambda ids: forward(ids)) for o in tf_objs)
        return tuple(o.device_fn(forward) for o in tf_objs)

    def block_fn(p, h, ctx):  # h [n, B, S, D]: one batch at a time, the shapes plain evaluation runs
        return jax.lax.map(lambda x: models.block(config, p, x, ctx), h)

    chunk_fn = tree_lib.make_tree_chunk_fn(block_fn, leaf_fn, with_junction=with_junction)

    def traced(shell, pool, buffers, ctxs, nodes):
        traces[key] = traces.get(key, 0) + 1
        return chunk_fn(shell, pool, buffers, ctxs, nodes)

    return jax.jit(traced, donate_argnums=(2,))


def run_tree(
    tree_fn_for: Callable,
    embed_fn,
    shell,
    pool,
    paths,
    lengths,
    junction,
    node_chunk_size: int,
    hidden_size: int,
):
    """Teacher-forced device outputs of every row of `paths` [N, T_max] via the prefix tree.

    tree_fn_for(with_junction) gives `make_tree_fn`'s program; embed_fn(shell) the hidden states and block
    contexts of every recorded batch. Returns (per teacher-forced objective its outputs stacked [N, ...],
    {"block_steps": the tree's block steps})."""
    tree = tree_lib.build_prefix_tree(paths, lengths, junction)
    fn = tree_fn_for(tree.scale is not None)
    t_max = paths.shape[1]
    h0s, ctxs = embed_fn(shell)
    buffers = tuple(jnp.zeros((t_max + 1,) + h.shape, h.dtype).at[0].set(h) for h in h0s)
    num = tree.num_nodes
    chunks_out = []
    for nodes in tree_lib.chunk_nodes(tree, node_chunk_size, hidden_size):
        buffers, outs = fn(shell, pool, buffers, ctxs, jax.tree.map(jnp.asarray, nodes))
        chunks_out.append(outs)
    stacked = jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs])[:num], *chunks_out)
    rows = np.full(paths.shape[0], -1)
    term = np.nonzero(tree.terminal >= 0)[0]
    rows[tree.terminal[term]] = term
    per_obj = [jax.tree.map(lambda a: a[rows], o) for o in stacked]
    return per_obj, {"block_steps": tree.num_block_steps}
