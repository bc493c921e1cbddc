"""The whole HM3 run on a device mesh and in two processes gives the same report as on one device (issue 7).

The reference is the `tiny3.py:smoke_mesh` run computed here, in-process, on one CPU device with the default
engine (strategy "map", prefix tree). The same config then runs through the real binary
(`python -m experiments.run_hm3`) in subprocesses (XLA_FLAGS must be set before jax is imported there):
on 8 simulated devices with `--mesh=paths:4,data:2`, and as two `jax.distributed` processes on 127.0.0.1
(gloo CPU collectives, a free port chosen at runtime, 4 devices each, the mesh spanning both). "Same report"
means: the same methods, per-method held-out points, normalised points, hypervolumes and HM3 paths (wall
seconds and FLOP counts are not compared: the mesh engine evaluates paths without the prefix tree).

Every subprocess is bounded by a timeout. The subprocesses share a persistent XLA compilation cache under
.pytest_cache/hm3 (compilation dominates these tiny runs; programs with host callbacks are never cached).
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from experiments.configs import tiny3
from hm3_jax.hm3 import run as run_lib

# Known failure (issue 7, open): on 8 simulated CPU devices the run deadlocks in the first PPO chunk: the RL
# training jit calls the path engine from a host callback, and the engine's sharded computation (all-reduce over
# "data", collective permute over the mesh) waits forever for one device's participant (XLA aborts after 40 s;
# log in the commit message). A standalone nested callback -> sharded computation works, so the cause is still
# open. Opt in with HM3_RUN_MESH_TESTS=1; until fixed these tests would fail and cost ~7 minutes.
pytestmark = pytest.mark.skipif(
    os.environ.get("HM3_RUN_MESH_TESTS") != "1",
    reason="known deadlock of the engine's collectives inside the PPO host callback on a mesh; HM3_RUN_MESH_TESTS=1",
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 600
CONFIG = os.path.join(REPO, "experiments", "configs", "tiny3.py") + ":smoke_mesh"


def _env(num_devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"  # as tests/conftest.py sets for the reference
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(REPO, ".pytest_cache", "hm3", "jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["TQDM_DISABLE"] = "1"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(workdir, zoo_dir, *extra) -> list:
    return [sys.executable, "-m", "experiments.run_hm3", f"--config={CONFIG}", f"--workdir={workdir}",
            f"--zoo_dir={zoo_dir}", *extra]  # fmt: skip


def _assert_same_report(got: dict, want: dict, what: str) -> None:
    assert got["tasks"] == want["tasks"], what
    assert got["methods"].keys() == want["methods"].keys(), what
    np.testing.assert_allclose(got["ideal"], want["ideal"], rtol=1e-12, err_msg=what)
    np.testing.assert_allclose(got["reference_point"], want["reference_point"], rtol=1e-12, err_msg=what)
    for name, m in want["methods"].items():
        g = got["methods"][name]
        for field in ("points", "normalised_points"):
            np.testing.assert_allclose(g[field], m[field], rtol=1e-9, atol=1e-12, err_msg=f"{what}: {name}")
        np.testing.assert_allclose(g["hypervolume"], m["hypervolume"], rtol=1e-9, err_msg=f"{what}: {name}")
        assert g["evaluations"] == m["evaluations"], f"{what}: {name}"
        if "paths" in m:
            assert g["paths"] == m["paths"], f"{what}: {name}"


@pytest.fixture(scope="module")
def eight_devices(smoke_zoo_dir, tmp_path_factory):
    """Starts the 8-device run in the background (it overlaps with the in-process reference)."""
    workdir = tmp_path_factory.mktemp("mesh8") / "run"
    log_path = workdir.parent / "log.txt"
    log = open(log_path, "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        _cmd(workdir, smoke_zoo_dir, "--mesh=paths:4,data:2"),
        env=_env(8), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    yield proc, workdir, log_path
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture(scope="module")
def reference(eight_devices, smoke_zoo_dir, tmp_path_factory):
    del eight_devices  # started first, so it runs while the reference is computed
    workdir = str(tmp_path_factory.mktemp("ref") / "run")
    report = run_lib.run_hm3(tiny3.get_config("smoke_mesh"), workdir, zoo_dir=smoke_zoo_dir)
    # The comparison must be able to fail: paths and points differ between methods and preferences.
    points = np.concatenate([np.asarray(m["points"]) for m in report["methods"].values()])
    assert np.ptp(points) > 0.5
    return json.loads(json.dumps(report))  # through JSON, as the subprocesses' reports are read


def test_same_report_on_8_devices_with_a_paths_data_mesh(eight_devices, reference):
    proc, workdir, log_path = eight_devices
    try:
        code = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"8-device run exceeded {TIMEOUT} s")
    assert code == 0, log_path.read_text()[-4000:]
    log = log_path.read_text()
    assert "mesh {'paths': 4, 'data': 2, 'model': 1}" in log, log[-2000:]
    report = json.loads((workdir / "report.json").read_text())
    _assert_same_report(report, reference, "paths:4,data:2 mesh vs 1 device")


def test_same_report_in_two_processes(reference, smoke_zoo_dir, tmp_path):
    port = _free_port()
    workdir = tmp_path / "run"  # one shared workdir, as on a shared filesystem
    procs = []
    for i in range(2):
        extra = ("--mesh=paths:4,data:2", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                 f"--process_id={i}", "--distributed_timeout=120")  # fmt: skip
        log = open(tmp_path / f"p{i}.log", "w")  # noqa: SIM115 (closed below)
        procs.append((subprocess.Popen(_cmd(workdir, smoke_zoo_dir, *extra), env=_env(4), cwd=REPO,
                                       stdout=log, stderr=subprocess.STDOUT), log))  # fmt: skip
    try:
        codes = [p.wait(timeout=TIMEOUT) for p, _ in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    logs = [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], "\n----\n".join(t[-3000:] for t in logs)
    assert "over 2 process(es)" in logs[0]
    # Only process 0 prints the claims (host-side output); both computed the same report.
    assert any(line.startswith("{'") for line in logs[0].splitlines()), logs[0][-2000:]
    assert not any(line.startswith("{'") for line in logs[1].splitlines()), logs[1][-2000:]
    report = json.loads((workdir / "report.json").read_text())
    _assert_same_report(report, reference, "2 processes vs 1 process")
    stages = sorted(os.listdir(workdir / "stages"))
    assert not [s for s in stages if s.startswith(".tmp")], stages
