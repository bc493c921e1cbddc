"""Placement of host values as global arrays on a mesh (``jax.make_array_from_callback`` on several processes):
replicated, split over "paths" or "data", and the path model's tensor-parallel split over "model"."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Pool leaves whose *input* dim is sharded over "model" (row-parallel, Megatron-style: the column-parallel
# q/k/v/gate/up outputs feed them shard-for-shard, so one all-reduce per attention/MLP suffices).
ROW_PARALLEL = ("o", "down", "out_proj", "fc2", "c_proj", "proj")


def place(x: Any, sharding: NamedSharding) -> jax.Array:
    """Global array with ``sharding`` from a value every process holds identically (numpy or jax array).

    One process: ``jax.device_put``. Several: ``jax.make_array_from_callback`` (each process materialises only
    the shards of its own devices). An array that is already global is resharded on device.
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.jit(lambda a: a, out_shardings=sharding)(x)  # already global: reshard on device
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every leaf replicated on every device of ``mesh`` (RL params, the shell, junction scales)."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: place(x, sharding), tree)


def pad_to_multiple(x: np.ndarray, multiple: int, fill) -> np.ndarray:
    """Pads axis 0 of ``x`` with ``fill`` up to the next multiple of ``multiple``. [N, ...] ->
    [ceil(N/m)*m, ...]."""
    x = np.asarray(x)
    pad = (-x.shape[0]) % multiple
    if pad == 0:
        return x
    return np.concatenate([x, np.full((pad,) + x.shape[1:], fill, x.dtype)], axis=0)


def shard_paths(paths, mesh: Mesh, fill: int = -1) -> tuple[jax.Array, int]:
    """Pads a batch of paths to a multiple of the "paths" axis and splits it over that axis.

    Args:
      paths: int32 [N, T_max] pool indices (-1 = padding step); the same on every process.
      mesh: from ``make_mesh``.
      fill: value of the padding paths' steps (-1: the empty path, embed + head only).
    Returns: (global int32 array [N_pad, T_max] with ``NamedSharding(mesh, P("paths"))``, N). Results for rows
      N.. are padding: drop them (``to_host(...)[:N]``).
    """
    paths = np.asarray(paths)
    if paths.ndim != 2 or not np.issubdtype(paths.dtype, np.integer):
        raise ValueError(
            f"paths must be an integer array [num_paths, t_max], got {paths.dtype}{list(paths.shape)}"
        )
    if paths.shape[0] == 0:
        raise ValueError("paths is empty: nothing to evaluate")
    num_paths = paths.shape[0]
    padded = pad_to_multiple(paths.astype(np.int32), mesh.shape["paths"], fill)
    return place(padded, NamedSharding(mesh, P("paths"))), num_paths


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Splits every leaf's leading (example) axis over "data"; the batch is the same on every process.

    Raises ValueError if a leaf's leading size is not divisible by the "data" axis (padding examples would
    change
    the scores unless the objective masks them; pad with a zero mask upstream if needed).
    """
    num_data = mesh.shape["data"]
    sharding = NamedSharding(mesh, P("data"))

    def place_leaf(path, x):
        shape = np.shape(x)
        if not shape or shape[0] % num_data:
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path)} has shape {shape}: its leading (example) axis "
                f"must be divisible by the mesh's data axis ({num_data})"
            )
        return place(x, sharding)

    return jax.tree_util.tree_map_with_path(place_leaf, batch)


def pool_partition_specs(pool: Any, mesh: Mesh, row_parallel: tuple[str, ...] = ROW_PARALLEL) -> Any:
    """PartitionSpecs of a stacked block pool for the "model" axis (tensor parallelism).

    Leaves with ndim >= 3 ([P, in, out] kernels) are split over "model": along the output dim (column
    parallel:
    q/k/v/gate/up) or, for leaves under a key in ``row_parallel`` (o/down), along the input dim, so the
    partitioner needs one all-reduce per attention and per MLP. Norm scales and biases ([P, D]) are
    replicated,
    as is any matrix whose split dim is not divisible by the axis size (logged). With "model" of size 1 every
    leaf is replicated.
    """
    num_model = mesh.shape.get("model", 1)

    def spec(path, x):
        shape = tuple(x.shape)  # arrays or jax.ShapeDtypeStruct (memory plans)
        if num_model == 1 or len(shape) < 3:
            return P()
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        dim = len(shape) - 2 if any(n in row_parallel for n in names) else len(shape) - 1
        if shape[dim] % num_model:
            logging.warning(
                "pool leaf %s %s: dim %d not divisible by model=%d; replicated",
                jax.tree_util.keystr(path),
                shape,
                dim,
                num_model,
            )
            return P()
        axes = [None] * len(shape)
        axes[dim] = "model"
        return P(*axes)

    return jax.tree_util.tree_map_with_path(spec, pool)


def shell_partition_specs(shell: Any, mesh: Mesh) -> Any:
    """PartitionSpecs of a shell (embeddings, final norm, head) for the "model" axis: the token embedding
    `embed/embedding [V, D]` split over the vocabulary (rows) and an untied LM head `head/kernel [D, V]` over
    its output columns, when V is divisible by the axis; everything else replicated (positions, norms, a
    classifier head). With "model" of size 1 every leaf is replicated."""
    num_model = mesh.shape.get("model", 1)

    def spec(path, x):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        shape = tuple(x.shape)
        if num_model == 1 or len(shape) != 2:
            return P()
        if names[-2:] == ["embed", "embedding"] and shape[0] % num_model == 0:
            return P("model", None)
        if names[-2:] == ["head", "kernel"] and shape[1] % num_model == 0:
            return P(None, "model")
        return P()

    return jax.tree_util.tree_map_with_path(spec, shell)


def model_sharding(shell: Any, pool: Any, mesh: Mesh) -> tuple[Any, Any]:
    """(shell, pool) `NamedSharding` pytrees of a path model on `mesh`: tensor parallel over "model"
    (`shell_partition_specs`, `pool_partition_specs`), replicated over "paths" and "data"."""
    named = lambda specs: jax.tree.map(lambda s: NamedSharding(mesh, s), specs)  # noqa: E731
    return named(shell_partition_specs(shell, mesh)), named(pool_partition_specs(pool, mesh))


def pool_sharding(pool: Any, mesh: Mesh, row_parallel: tuple[str, ...] = ROW_PARALLEL) -> Any:
    """``NamedSharding`` pytree for the pool (see ``pool_partition_specs``); pass to ``place_pool`` or jit."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), pool_partition_specs(pool, mesh, row_parallel))


def place_pool(pool: Any, mesh: Mesh, row_parallel: tuple[str, ...] = ROW_PARALLEL) -> Any:
    """The pool placed with ``pool_sharding`` (each device holds 1/model of every large matrix)."""
    return jax.tree.map(place, pool, pool_sharding(pool, mesh, row_parallel))
