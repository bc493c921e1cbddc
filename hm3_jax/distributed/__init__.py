"""Scale-out: one code path from one CPU to a multi-host TPU/GPU slice.

JAX's own multi-controller runtime does the work: ``jax.distributed`` joins the processes, a device ``Mesh``
with named axes describes the devices, ``NamedSharding`` places arrays, ``jax.shard_map`` runs per-shard code.
This module only fixes the conventions every HM3 binary shares.

Mesh axes (always all three, size 1 when not asked for, so code can name them unconditionally):
  * ``"paths"``: candidate inference paths (and parallel RL episodes) are split over it; default: all devices.
  * ``"data"``: the evaluation batch (examples) is split over it; per-path partial sums are ``psum``-ed.
  * ``"model"``: the large matrices of the stacked block pool are split over it (tensor parallelism chosen by
    XLA's SPMD partitioner from the pool's ``NamedSharding``; see ``pool_sharding``). Needed only when the
    pool does not fit one device (Llama-2-7B/13B experts; see docs/scaling.md).

The mesh is built with ``AxisType.Auto`` axes (classic GSPMD): model code written without sharding
annotations (``hm3_jax.models``) runs unchanged; ``shard_map`` is manual over ``paths`` and ``data`` only.

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

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("paths", "data", "model")
# Pool leaves whose *input* dim is sharded over "model" (row-parallel, Megatron-style: the column-parallel
# q/k/v/gate/up outputs feed them shard-for-shard, so one all-reduce per attention/MLP suffices).
ROW_PARALLEL = ("o", "down", "out_proj", "fc2", "c_proj", "proj")

_MULTIHOST_MODES = ("auto", "on", "off")


# ----------------------------------------------------------------------------------------------------------
# Flags and initialisation.


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Registers the scale-out flags (idempotent: a second call, or a binary that already has them, is a
    no-op).

    Flags: --mesh, --multihost, --coordinator_address, --num_processes, --process_id, --distributed_timeout
    (documented in the module docstring).
    """
    if "mesh" in flag_values:
        return
    flags.DEFINE_string(
        "mesh",
        None,
        'Device mesh, e.g. "paths:4,data:2,model:2"; axes from {paths, data, model}; the sizes must '
        "multiply to the number of devices; -1 for one axis means 'the rest'. Default: all devices on paths.",
        flag_values=flag_values,
    )
    flags.DEFINE_enum(
        "multihost",
        "auto",
        list(_MULTIHOST_MODES),
        "auto: join jax.distributed when --coordinator_address is given or a SLURM/MPI/TPU-pod "
        "environment is detected; on: always call jax.distributed.initialize (TPU VM pods need nothing "
        "else); off: never.",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "coordinator_address", None, "host:port of process 0's coordinator service.", flag_values=flag_values
    )
    flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).", flag_values=flag_values)
    flags.DEFINE_integer(
        "process_id", None, "This process's index in [0, num_processes).", flag_values=flag_values
    )
    flags.DEFINE_integer(
        "distributed_timeout", 300, "Seconds to wait for every process to join.", flag_values=flag_values
    )


def _cluster_env_detected() -> bool:
    """True when the environment names a multi-process launch that jax.distributed can auto-detect."""
    env = os.environ
    if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1 and "SLURM_JOB_ID" in env:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    return "," in hosts or "MEGASCALE_COORDINATOR_ADDRESS" in env


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    mode: str = "auto",
    timeout_seconds: int = 300,
) -> bool:
    """Joins the multi-process JAX runtime when asked to; idempotent. Must run before any other JAX call.

    Args:
      coordinator_address: "host:port" of process 0 (explicit setup; then num_processes and process_id too).
      num_processes, process_id: explicit setup; process_id in [0, num_processes).
      mode: "auto" (join if explicit arguments are given or a SLURM/Open MPI/TPU-pod launch is detected),
        "on" (always call ``jax.distributed.initialize``, with the explicit arguments if any), "off" (never).
      timeout_seconds: how long to wait for every process to join.
    Returns: True if this process is part of an initialised multi-process runtime.
    Raises: ValueError naming the inconsistent arguments.

    On CPU, cross-process collectives use gloo (``jax_cpu_collectives_implementation``); it is set before
    joining, which is harmless on TPU/GPU.
    """
    if mode not in _MULTIHOST_MODES:
        raise ValueError(f"multihost mode must be one of {_MULTIHOST_MODES}, got {mode!r}")
    if jax.distributed.is_initialized():
        return True
    explicit = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    given = {k for k, v in explicit.items() if v is not None}
    if given and given != set(explicit):
        missing = sorted(set(explicit) - given)
        raise ValueError(
            f"multi-process setup needs --coordinator_address, --num_processes and --process_id together; "
            f"got {sorted(given)}, missing {missing}"
        )
    if given:
        if not re.fullmatch(r"[^:\s]+:\d+", coordinator_address):
            raise ValueError(f"coordinator_address must be 'host:port', got {coordinator_address!r}")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(
                f"need num_processes >= 1 and 0 <= process_id < num_processes, got "
                f"num_processes={num_processes}, process_id={process_id}"
            )
    if mode == "off" or (mode == "auto" and not given and not _cluster_env_detected()):
        return False
    if given and num_processes == 1 and mode == "auto":
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout_seconds,
    )
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def initialize_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> bool:
    """``initialize`` from the flags of ``define_flags`` (call first in ``main``). Returns whether
    multi-process."""
    return initialize(
        flag_values.coordinator_address,
        flag_values.num_processes,
        flag_values.process_id,
        mode=flag_values.multihost,
        timeout_seconds=flag_values.distributed_timeout,
    )


def runtime_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> Mesh | None:
    """What every experiment binary does first in ``main``: join the processes (``initialize_from_flags``),
    quiet the non-main processes' logs, and build the mesh.

    Returns: ``make_mesh(--mesh)`` when ``--mesh`` is given or there is more than one device (all on "paths"
      by default); None on a single device without ``--mesh``, so a plain one-CPU run is unchanged.
    """
    initialize_from_flags(flag_values)
    quiet_non_main_processes()
    if flag_values.mesh or jax.device_count() > 1:
        mesh = make_mesh(flag_values.mesh)
        logging.info("mesh %s over %d process(es)", dict(mesh.shape), jax.process_count())
        return mesh
    return None


# ----------------------------------------------------------------------------------------------------------
# Mesh.


def parse_mesh_spec(spec: str | None, num_devices: int) -> dict[str, int]:
    """Parses "paths:4,data:2[,model:2]" into {"paths": 4, "data": 2, "model": 2} (every axis present).

    ``None`` or "" puts every device on "paths". One size may be -1 ("the rest"). Missing axes get size 1.
    Raises ValueError naming the spec and the device count when the sizes do not multiply to ``num_devices``.
    """
    if not spec:
        return {"paths": num_devices, "data": 1, "model": 1}
    sizes: dict[str, int] = {}
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\w+)\s*:\s*(-?\d+)\s*", part)
        if m is None:
            raise ValueError(
                f"mesh spec {spec!r}: cannot parse {part!r}; expected 'axis:size', e.g. 'paths:4,data:2'"
            )
        name, size = m.group(1), int(m.group(2))
        if name not in AXES:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; axes are {AXES}")
        if name in sizes:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
        if size == 0 or size < -1:
            raise ValueError(
                f"mesh spec {spec!r}: axis {name!r} has size {size}; sizes are >= 1 (or -1 for the rest)"
            )
        sizes[name] = size
    rest = [k for k, v in sizes.items() if v == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh spec {spec!r}: only one axis may be -1, got {rest}")
    known = math.prod(v for v in sizes.values() if v != -1)
    if rest:
        if num_devices % known:
            raise ValueError(f"mesh spec {spec!r}: {num_devices} devices are not divisible by {known}")
        sizes[rest[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"mesh spec {spec!r} has {math.prod(sizes.values())} devices "
            f"({' x '.join(str(v) for v in sizes.values())}) but there are {num_devices} devices "
            f"(jax.device_count() across {jax.process_count()} process(es))"
        )
    return {axis: sizes.get(axis, 1) for axis in AXES}


def make_mesh(spec: str | None = None, devices=None) -> Mesh:
    """A ``Mesh`` with axes ("paths", "data", "model") from a spec string (``--mesh``).

    Args:
      spec: "paths:4,data:2[,model:2]" (any order, missing axes size 1, one -1 allowed); None: all on "paths".
      devices: defaults to ``jax.devices()`` (all processes' devices).
    Returns: Mesh of shape (paths, data, model), ``AxisType.Auto`` axes. ``jax.make_mesh`` orders the devices
      for the physical topology (contiguous rings on TPU), "model" innermost so tensor-parallel collectives
      stay on the fastest links.
    """
    devices = jax.devices() if devices is None else list(devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


# ----------------------------------------------------------------------------------------------------------
# Host-side helpers.


def is_main_process() -> bool:
    """True on process 0 (the one that does host-side I/O, logging and progress bars)."""
    return jax.process_index() == 0


def main_process_only(fn: Callable) -> Callable:
    """Decorator: runs ``fn`` on process 0 only; other processes get ``None`` back.

    For host-side I/O that must happen once (JSON reports, plots, ``print``); not for orbax saves or anything
    containing a collective (every process must take part in those). Progress bars:
    ``tqdm(..., disable=not is_main_process())``.
    """

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        return fn(*args, **kwargs) if is_main_process() else None

    return wrapped


_ALIGN_COUNT = [0]
ALIGN_TIMEOUT_SECONDS = 900


def align_processes(name: str) -> None:
    """Waits until every process gets here (no-op with one process): a barrier of the coordination service,
    not a device collective, with a long timeout (``ALIGN_TIMEOUT_SECONDS``).

    Call it before a program with cross-process collectives whenever the processes may have drifted apart:
    gloo gives a new communication context only 30 s for every process to join (a hard-coded key-value
    timeout), and the processes drift by whole compilations (jax writes the persistent compilation cache from
    process 0 only, so process 1 compiles what process 0 loads). Every process must call it equally often.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed

    _ALIGN_COUNT[0] += 1
    client = jax_distributed.global_state.client
    client.wait_at_barrier(f"hm3_align:{name}:{_ALIGN_COUNT[0]}", ALIGN_TIMEOUT_SECONDS * 1000)


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (no-op with one process).

    ``align_processes`` then ``multihost_utils.sync_global_devices`` (a tiny collective), so every process must
    call it, in the same order. Use it after process 0 writes a file that the others read next.
    """
    if jax.process_count() > 1:
        align_processes(name)
        multihost_utils.sync_global_devices(name)


def broadcast_from_main(value: Any) -> Any:
    """Process 0's value of a pytree of numpy-compatible leaves on every process (identity with one process).

    For host-side decisions that must agree, e.g. whether a stage file already exists (a collective)."""
    if jax.process_count() == 1:
        return value
    align_processes("broadcast_from_main")
    return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(value))


def quiet_non_main_processes() -> None:
    """absl logging at WARNING on processes other than 0 (their INFO lines only repeat process 0's)."""
    if not is_main_process():
        logging.set_verbosity(logging.WARNING)


# ----------------------------------------------------------------------------------------------------------
# Placement.


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


def to_host(tree: Any) -> Any:
    """Every leaf as a numpy array holding the *global* value, on every process.

    Uses ``multihost_utils.process_allgather(tiled=True)`` for arrays spread over several processes (a
    collective: every process must call it). Fully addressable arrays are copied directly.
    """

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(get, tree)


# ----------------------------------------------------------------------------------------------------------
# Sharded path evaluation (the pattern hm3_jax/paths uses on a mesh).


def make_sharded_path_scores(score_sums_fn: Callable, mesh: Mesh) -> Callable:
    """Jitted per-path scores with paths split over "paths", examples over "data", the pool over "model".

    ``score_sums_fn(shell, pool, path, batch) -> sums`` scores ONE path ([T_max] int32) on a batch shard and
    returns a pytree of arrays that are *sums over examples* (e.g. {"correct": sum of exact matches,
    "count": number of scored examples}), so the shards' partial results add up: the returned function
    computes, for every path n,

        sums[n] = psum_over_data( score_sums_fn(shell, pool, paths[n], batch_shard) ),

    which equals ``score_sums_fn(shell, pool, paths[n], full_batch)`` up to float summation order. Inside a
    device the local paths run one after another (``lax.map``: on CPU sequential beats vmapping paths with
    different weights); ``"model"`` is left to XLA's SPMD partitioner (``shard_map`` is manual over paths and
    data only), which turns the pool's ``pool_sharding`` into tensor-parallel matmuls.

    Returns: ``fn(shell, pool, paths, batch) -> sums`` with leaves [N_pad, ...] sharded over "paths". Inputs
      should be placed with ``replicate`` (shell), ``place_pool`` (pool), ``shard_paths``, ``shard_batch``.
    """

    def body(shell, pool, paths, batch):  # paths: [N_pad / num_paths_devices, T_max] on this device
        sums = jax.lax.map(lambda path: score_sums_fn(shell, pool, path, batch), paths)
        return jax.lax.psum(sums, "data")

    mapped = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(), P(), P("paths"), P("data")),
        out_specs=P("paths"),
        axis_names={"paths", "data"},
        check_vma=False,  # model code is written without varying-axis annotations
    )
    return jax.jit(mapped)


def sharded_path_scores(
    score_sums_fn: Callable, shell: Any, pool: Any, paths, batch: Any, mesh: Mesh, row_parallel=ROW_PARALLEL
) -> Any:
    """Places everything on ``mesh``, evaluates every path, returns the global sums as numpy on every process.

    Args:
      score_sums_fn: ``(shell, pool, path [T_max], batch) -> pytree of sums over examples`` (see
        ``make_sharded_path_scores``).
      shell: embeddings / final norm / head (replicated). pool: stacked blocks [P, ...] (``place_pool``).
      paths: int [N, T_max], the same on every process. batch: pytree of [B, ...] arrays, B divisible by
      "data".
      mesh: from ``make_mesh``.
    Returns: pytree like ``score_sums_fn``'s output with leaves [N, ...] (padding paths dropped), numpy.
    For repeated calls build the function once with ``make_sharded_path_scores`` (this one re-places the
    pool).
    """
    fn = make_sharded_path_scores(score_sums_fn, mesh)
    paths_global, num_paths = shard_paths(paths, mesh)
    sums = fn(
        replicate(shell, mesh), place_pool(pool, mesh, row_parallel), paths_global, shard_batch(batch, mesh)
    )
    return jax.tree.map(lambda x: x[:num_paths], to_host(sums))


def lm_score_sums_fn(apply_path_fn: Callable) -> Callable:
    """A ``score_sums_fn`` for causal LMs: teacher-forced next-token log-likelihood and exact matches.

    Args:
      apply_path_fn: ``(shell, pool, path, input_ids [B, S], attention_mask [B, S]) -> logits [B, S, V]``,
        e.g. ``functools.partial(hm3_jax.models.apply_path, config)`` with the keyword ``attention_mask``.
    The batch is {"input_ids": [B, S], "attention_mask": [B, S], "loss_mask": [B, S]} where ``loss_mask``
    marks
    the target tokens (position s is predicted from positions < s).
    Returns sums {"log_likelihood": sum of log p(target), "correct_tokens": sum of argmax == target,
    "exact_match": number of examples whose every target token is the argmax, "num_tokens", "num_examples"}.
    """

    def score_sums(shell, pool, path, batch):
        logits = apply_path_fn(shell, pool, path, batch["input_ids"], batch["attention_mask"])  # [B, S, V]
        logits = logits[:, :-1].astype(jnp.float32)
        targets = batch["input_ids"][:, 1:]
        mask = batch["loss_mask"][:, 1:].astype(jnp.float32)  # [B, S-1]
        logp = jax.nn.log_softmax(logits, axis=-1)
        target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        hit = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
        example_hit = jnp.all((hit > 0) | (mask == 0), axis=-1) & (mask.sum(-1) > 0)
        return {
            "log_likelihood": jnp.sum(target_logp * mask),
            "correct_tokens": jnp.sum(hit * mask),
            "exact_match": jnp.sum(example_hit.astype(jnp.float32)),
            "num_tokens": jnp.sum(mask),
            "num_examples": jnp.sum((mask.sum(-1) > 0).astype(jnp.float32)),
        }

    return score_sums
