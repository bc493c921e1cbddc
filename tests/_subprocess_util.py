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


def child_result(code: str, *args: str, num_devices: int = 8, timeout: float = 900) -> dict:
    """Runs `python -c code *args` in `subprocess_env(num_devices)` from the repo and returns the JSON object of
    its last stdout line `RESULT {...}`; AssertionError with the child's stderr when it fails or prints none."""
    import json
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env=subprocess_env(num_devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("RESULT ")]
    assert result.returncode == 0 and lines, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT ") :])
