"""Joining the multi-process JAX runtime (``jax.distributed``) from explicit arguments, flags or a detected
cluster launch, and what every experiment binary does first in ``main`` (``runtime_from_flags``)."""

from __future__ import annotations

import os
import re

import jax
from absl import flags, logging
from jax.sharding import Mesh

from hm3_jax.distributed.mesh import make_mesh
from hm3_jax.distributed.processes import quiet_non_main_processes

MULTIHOST_MODES = ("auto", "on", "off")


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
        list(MULTIHOST_MODES),
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
    if mode not in MULTIHOST_MODES:
        raise ValueError(f"multihost mode must be one of {MULTIHOST_MODES}, got {mode!r}")
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
