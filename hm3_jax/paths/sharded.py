"""The path engine on a device mesh (strategy "shard"; `make_engine(..., mesh=mesh)` with the
("paths", "data", "model") mesh of `hm3_jax.distributed.make_mesh`; `make_problem(..., mesh=mesh)` does this for
HM3 runs):

- "paths": each chunk of candidate paths is split over the "paths" devices (`shard_map`, manual over "paths"
  only); a chunk is rounded up to a multiple of the axis size.
- "data": the objectives' batches are fixed by the objectives (each `lax.map`s over its split's batches), so
  "data" splits the *examples inside every batch*: the forward closure constrains its inputs (`input_ids
  [B, S]`, or the decode prompt ids and mask [B, P]) to `PartitionSpec("data")` (`split_examples`), and XLA's
  partitioner runs every block on B / data examples per device (the KV cache of greedy decoding follows). A
  batch whose B is not divisible by the axis stays replicated (logged once). Nothing is summed across devices
  by hand: per-example outputs (correct flags, tokens) are gathered by the partitioner.
- "model": tensor parallelism. The shell and pool are placed with `distributed.model_sharding` (Megatron's
  split: q/k/v/gate/up kernels by output columns, o/down by input rows, the embedding and an untied head by
  vocabulary; norms and biases replicated; `place_model`) and XLA's partitioner (auto over "data" and "model"
  inside the `shard_map`) inserts the all-reduces, so each device holds 1/model of the pool's matrices.
- "data" and "model" together: the head's logits come out split over both (examples over "data", vocabulary
  over "model"), and XLA's partitioner (jaxlib 0.10.2) aborts the process (`spmd_partitioner_util.cc:497`,
  SIGABRT) on a gather from such an array inside the partially manual `shard_map`: `take_along_axis` of the
  target's logit or log-probability, so every teacher-forced objective (exact match, multiple choice) on e.g.
  `paths:2,data:2,model:2`. The partitioner keeps the vocabulary split for the gather, then fails to form the
  device groups of the all-reduce over "model" that follows (`ExpandDeviceGroupsWithIota`) when the devices
  are also split over the manual "paths" axis and the batch over "data". The same gather works without the
  `shard_map`, with "paths" of size 1, on a replicated batch, or with the vocabulary whole; so on a mesh
  with all three axes split the forward gathers the vocabulary of its logits (`needs_whole_vocabulary`,
  `gather_vocabulary`: each device then holds its examples' logits [B / data, S, V]; the values are the
  same, the all-gather is exact). Greedy decoding (argmax inside `models.greedy_decode`) is not affected.
- the prefix tree is a sequential scan over nodes (nothing to split over "paths"), so on a mesh of more than
  one device teacher-forced objectives are evaluated path-parallel by the plain engine instead
  (`prefix_sharing` is turned off and logged); scores are the same (the tree is exact), FLOP and block-step
  counts are the plain ones.
- multi-process (`jax.distributed`): every process calls `evaluate` with the same paths (the multi-controller
  contract of `hm3_jax.distributed`); chunks, shell and pool are placed as global arrays and the scores come
  back to every process (`distributed.to_host`), so caches and decisions agree; `compile_then_align` keeps the
  processes together before each chunk's collectives.

Scores equal the 1-device ones: the per-path computation is the same, only where it runs differs (checked by
tests/test_hm3_distributed.py, which runs a whole HM3 smoke run on 8 devices and 2 processes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from hm3_jax import distributed


def place_model(shell: dict, pool: dict, mesh) -> tuple[dict, dict]:
    """(shell, pool) placed as strategy "shard" reads them on `mesh` (`distributed.model_sharding`: tensor
    parallel over "model", replicated over "paths" and "data").

    Engines built over arrays placed here share them: placing an array that already has its sharding returns
    it (no copy). So a Problem places its pool once for the engines of all its splits (each engine placed a
    copy of its own before, a pool per split on every device) and drops the unplaced one from device 0."""
    return jax.tree.map(distributed.place, (shell, pool), distributed.model_sharding(shell, pool, mesh))


def place_paths_chunk(args, mesh):
    """A chunk's arguments (paths [c, T_max], junction rows [c, T_max, D]) split over the mesh axis "paths"
    (global arrays on a multi-process mesh)."""
    split = NamedSharding(mesh, PartitionSpec("paths"))
    return jax.tree.map(lambda a, s=split: distributed.place(a, s), args)


def abstract_like(x, sharding=None) -> jax.ShapeDtypeStruct:
    """The shape, dtype (and placement) of an array or of a ShapeDtypeStruct, as a ShapeDtypeStruct."""
    return jax.ShapeDtypeStruct(jnp.shape(x), x.dtype, sharding=sharding)


def data_axis_size(mesh) -> int:
    """Size of the mesh axis "data" (1 without a mesh or without the axis)."""
    return int(dict(mesh.shape).get("data", 1)) if mesh is not None else 1


def uniform_steps(strategy: str, mesh) -> bool:
    """Model-parallel mesh: no data-dependent branches over padding steps (`models.run_path`'s `uniform`).
    The devices of two path groups run different paths; around a `lax.cond` holding the partitioner's
    "model" collectives they would branch differently, and XLA:CPU's collectives wait for every device of
    the program (a deadlock, then an abort). Padding steps then cost a block each."""
    return strategy == "shard" and dict(mesh.shape).get("model", 1) > 1


def split_examples(x, num_data: int):
    """Inside "shard": the examples (axis 0) of an objective's batch split over the mesh axis "data" of size
    `num_data` (unchanged when it is 1, or when the batch is not divisible by it: then logged once)."""
    if num_data == 1:
        return x
    if x.shape[0] % num_data:
        logging.log_first_n(
            logging.WARNING,
            "batch of %d examples is not divisible by data=%d: replicated",
            1,
            x.shape[0],
            num_data,
        )
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec("data"))


def needs_whole_vocabulary(strategy: str, mesh) -> bool:
    """Whether the forward's logits must have their vocabulary gathered (`gather_vocabulary`): strategy
    "shard" on a mesh whose "paths", "data" and "model" axes all have more than one device. Only there did
    XLA's partitioner abort on 8 devices (paths:2,data:2,model:2 aborts; paths:1,data:4,model:2,
    paths:1,data:2,model:4, paths:4,model:2, paths:2,model:4 and paths:2,data:4 do not: a manual axis of size
    1 is trivial); every other mesh keeps its layout and bitwise its results (tests/test_mesh_data_model.py)."""
    if strategy != "shard":
        return False
    sizes = dict(mesh.shape)
    return all(sizes.get(axis, 1) > 1 for axis in ("paths", "data", "model"))


def gather_vocabulary(logits, num_data: int):
    """Inside "shard": a forward's logits [B, ..., V] with the vocabulary whole on every device and the
    examples split over "data" as `split_examples` splits them (unchanged when `num_data` is 1 or does not
    divide B: the batch is then replicated and the partitioner handles a vocabulary split over "model").

    Why: logits split over "data" and "model" abort XLA's partitioner at the objectives' `take_along_axis`
    inside the partially manual `shard_map` (module docstring). Constraining them to `PartitionSpec("data")`
    all-gathers the vocabulary once per forward (exact: the logits keep their values; the objectives'
    reductions over V then run on one device each instead of across "model"). Memory: each device holds
    [B / data, P, V] logits instead of [B / data, P, V / model] (P: the positions a forward with `positions=`
    reads, S otherwise)."""
    if num_data == 1 or logits.shape[0] % num_data:
        return logits
    return jax.lax.with_sharding_constraint(logits, PartitionSpec("data"))


def compile_then_align(fn, key, shell, pool, args, compiled: set) -> None:
    """Multi-process: compile `fn` for these inputs first (once per shape, remembered in `compiled`; the call
    then reuses it), then wait for every process, so none enters the program's collectives while another
    still compiles it (gloo allows 30 s; process 1 compiles what process 0 loads from the persistent cache)."""
    sig = (key, tuple((tuple(a.shape), str(a.dtype)) for a in jax.tree.leaves((shell, pool, args))))
    if sig not in compiled:
        fn.lower(shell, pool, *args).compile()
        compiled.add(sig)
    distributed.align_processes("engine")
