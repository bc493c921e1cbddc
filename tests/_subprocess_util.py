"""Helpers shared by the tests that run jax in subprocesses (simulated devices, `jax.distributed` processes).

`subprocess_env(num_devices)` is the environment of such a child: CPU only, `num_devices` simulated devices, the
repo on PYTHONPATH, and XLA's backend optimisations off. The last one is a compile-time choice: these children
are tiny and compile-bound (the HM3 smoke run compiles about 470 programs, three quarters of its time), and
`--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true` cut that compile time by about a
third with the identical HM3 report (docs/testing.md). Every run a test compares is made with the same flags.
"""

import os
import socket

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def subprocess_env(num_devices: int) -> dict:
    """os.environ plus XLA_FLAGS (device count, fast compile), JAX_PLATFORMS=cpu and the repo on PYTHONPATH."""
    if int(num_devices) < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={int(num_devices)} {FAST_COMPILE_XLA_FLAGS}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a `jax.distributed` coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
