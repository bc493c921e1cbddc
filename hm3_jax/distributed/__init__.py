"""Scale-out: one code path from one CPU to a multi-host TPU/GPU slice (the package face of runtime.py,
mesh.py, placement.py and processes.py).

JAX's own multi-controller runtime does the work: ``jax.distributed`` joins the processes, a device ``Mesh``
with named axes describes the devices, ``NamedSharding`` places arrays, ``jax.shard_map`` runs per-shard code.
This module only fixes the conventions every HM3 binary shares.

Mesh axes (always all three, size 1 when not asked for, so code can name them unconditionally):
  * ``"paths"``: candidate inference paths (and parallel RL episodes) are split over it; default: all devices.
  * ``"data"``: the examples of every evaluation batch are split over it (XLA's partitioner gathers the
    per-example outputs; nothing is summed across devices by hand).
  * ``"model"``: the large matrices of the stacked block pool are split over it (tensor parallelism chosen by
    XLA's SPMD partitioner from the pool's ``NamedSharding``; see ``pool_sharding``). Needed only when the
    pool does not fit one device (Llama-2-7B/13B experts; see docs/scaling.md).

The mesh is built with ``AxisType.Auto`` axes (classic GSPMD): model code written without sharding
annotations (``hm3_jax.models``) runs unchanged. The one sharded path scorer is the path engine's strategy
"shard" (``hm3_jax.paths``: ``shard_map`` manual over ``paths`` only); experiments/distributed_demo.py runs it on
a toy pool on any mesh.

Multi-host contract (multi-controller SPMD): every process runs the same program on the same host values
(the same paths, evaluation batch, config and keys); ``shard_paths``, ``shard_batch``, ``replicate`` and
``place_pool`` build global arrays from those host values with ``jax.make_array_from_callback`` (each process
materialises only its own shards on its devices); ``to_host`` brings a global result back to *every* process
(``multihost_utils.process_allgather``), so host-side decisions (caches, RL rewards, Pareto filtering) agree
everywhere. Only host-side I/O is restricted to process 0 (``is_main_process``, ``main_process_only``).

Checkpoints (orbax, multi-host): *every* process calls ``ocp.CheckpointManager(...).save(step, args=...)`` on
the same directory (it must be shared storage, e.g. a GCS bucket, on multi-host runs); orbax writes each
array's shards from the process that owns them (a replicated array's single copy from process 0) and lets the
primary process (0) write metadata and finalise the step atomically after a barrier. Do not guard orbax
saves with ``main_process_only`` (that deadlocks); do guard plain JSON/plot/report writes with it.

Flags (``define_flags()`` registers them once; every experiment binary calls it before ``app.run``):
  --mesh=paths:4,data:2[,model:2]   default: all devices on "paths".
  --multihost=auto|on|off           auto: join when --coordinator_address is given or a SLURM/Open MPI/TPU-pod
                                    environment with >1 process is detected; on: always call
                                    ``jax.distributed.initialize`` (TPU VMs need no other flag); off: never.
  --coordinator_address=host:port --num_processes=N --process_id=i   explicit multi-process setup (GPU hosts,
                                    local tests); all three or none.
  --distributed_timeout=300         seconds to wait for the other processes.
Call ``runtime_from_flags()`` first thing in ``main`` (before any other JAX call): it runs
``initialize_from_flags()``, quiets non-main processes and returns ``make_mesh(FLAGS.mesh)`` (None on one
device without --mesh).
"""

from hm3_jax.distributed.mesh import AXES, make_mesh, parse_mesh_spec
from hm3_jax.distributed.placement import (
    ROW_PARALLEL,
    model_sharding,
    pad_to_multiple,
    place,
    place_pool,
    pool_partition_specs,
    pool_sharding,
    replicate,
    shard_batch,
    shard_paths,
    shell_partition_specs,
)
from hm3_jax.distributed.processes import (
    ALIGN_TIMEOUT_SECONDS,
    align_processes,
    barrier,
    broadcast_from_main,
    is_main_process,
    main_process_only,
    quiet_non_main_processes,
    to_host,
)
from hm3_jax.distributed.runtime import (
    MULTIHOST_MODES,
    define_flags,
    initialize,
    initialize_from_flags,
    runtime_from_flags,
)

__all__ = [
    "ALIGN_TIMEOUT_SECONDS",
    "AXES",
    "MULTIHOST_MODES",
    "ROW_PARALLEL",
    "align_processes",
    "barrier",
    "broadcast_from_main",
    "define_flags",
    "initialize",
    "initialize_from_flags",
    "is_main_process",
    "main_process_only",
    "make_mesh",
    "model_sharding",
    "pad_to_multiple",
    "parse_mesh_spec",
    "place",
    "place_pool",
    "pool_partition_specs",
    "pool_sharding",
    "quiet_non_main_processes",
    "replicate",
    "runtime_from_flags",
    "shard_batch",
    "shard_paths",
    "shell_partition_specs",
    "to_host",
]
