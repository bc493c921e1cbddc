"""Where a merge's output leaves live: on the host when its sources are host arrays (issue 16).

A run on a mesh loads its sources as host (numpy) arrays (`run.setup`, `spec_zoo.load(..., on_host=True)`) and
places only the shards it reads. The in-memory merges (`api.merge`, `traced.dare_ties_traced`) then bring every
merged tensor (a shell leaf, or one block of a stacked `blocks/...` leaf) back to the host as soon as it is made,
so device 0 holds one tensor's program at a time, never the whole merged model (12.55 GiB for Llama-2-7B beside
the sources' shards); whoever scores the model places it sharded (`problem.score_params`, `place_own_part`).
The host copy has the device result's bytes: nothing else changes (tests/test_merge_shard.py). Sources on a
device (one-device runs, every small model, traced arguments under `jit`) keep device outputs, as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def on_host(*trees) -> bool:
    """Whether every leaf of `trees` is a host (numpy) array (False when there are none)."""
    leaves = [x for t in trees for x in jax.tree.leaves(t)]
    return bool(leaves) and all(type(x) is np.ndarray for x in leaves)


def fetched(x, host: bool):
    """`x` (one merged tensor) as a numpy array of its own when `host` (its device buffer is dropped with `x`),
    else `x`. A copy, not `np.asarray`: on the CPU backend that is a view that keeps the device buffer alive."""
    return np.array(x, copy=True) if host else x


def stacked(blocks: Sequence, host: bool):
    """The merged blocks [...] of a stacked leaf as one `[L, ...]` array: stacked on the host when `host` (each
    block `fetched` by the caller as it is made), else on the device (`jnp.stack`, as before)."""
    return np.stack(blocks) if host else jnp.stack(blocks)
