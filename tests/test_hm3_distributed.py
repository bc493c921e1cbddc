"""The whole HM3 run on a device mesh and in two processes gives the same report as on one device (issue 7).

Three runs of `tiny3.py:smoke_mesh` through the real binary (`python -m experiments.run_hm3`), each in a
subprocess (XLA_FLAGS must be set before jax is imported) bounded by a timeout:

* the reference: one CPU device, no mesh (the default engine: strategy "map", prefix tree; the PPO loop with
  the host callback);
* (a) 8 simulated CPU devices, `--mesh=paths:4,data:2` (candidate paths over "paths", the examples of each
  evaluation batch over "data"; no prefix tree; the split PPO loop);
* (b) two `jax.distributed` processes on 127.0.0.1 (gloo CPU collectives, a free port, 4 devices each, the
  `paths:4,data:2` mesh spanning both, one shared workdir as on a shared filesystem).

"Same report" (`_assert_same_report`): the same tasks and methods; per method the held-out points, normalised
points, hypervolume, evaluation counts and HM3's chosen paths; the ideal and reference points. Wall seconds and
FLOP counts are not compared (the mesh engine runs without the prefix tree). (b) also checks that only process
0 printed the claims and that no temporary stage file is left behind.

Cost: compilation dominates these tiny runs. The subprocesses share a persistent XLA compilation cache under
.pytest_cache/hm3/jax_cache_mesh (XLA_FLAGS' device count is not part of its keys, so the reference's single-device
programs — merges, RL — are reused by (a) and process 0 of (b)); the reference runs first, then (a) and (b)
run concurrently. docs/scaling.md has the measured times, cold and warm.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 480  # per run (process group); a cold cache on a loaded 2-core machine needs several minutes
CONFIG = os.path.join(REPO, "experiments", "configs", "tiny3.py") + ":smoke_mesh"
MESH = "--mesh=paths:4,data:2"
CACHE = os.path.join(
    os.environ.get("HM3_TEST_CACHE", os.path.join(REPO, ".pytest_cache", "hm3")), "jax_cache_mesh"
)


def _env(num_devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"  # as tests/conftest.py sets for in-process tests
    env["JAX_COMPILATION_CACHE_DIR"] = CACHE
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(4 << 30)  # > 0: jax locks the cache for concurrent writers;
    # a directory used without a size limit lacks the "-atime" files this mode expects: hence our own directory
    env["TQDM_DISABLE"] = "1"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Run:
    """One or more processes of `experiments.run_hm3` on one workdir, each logging to its own file."""

    def __init__(self, name: str, base, zoo_dir: str, num_devices: int, per_process_extra: list[tuple]):
        self.name, self.workdir = name, base / name
        self.logs = [base / f"{name}.p{i}.log" for i in range(len(per_process_extra))]
        self.procs = []
        self.start = time.perf_counter()
        self.seconds = None
        for log_path, extra in zip(self.logs, per_process_extra, strict=True):
            cmd = [sys.executable, "-m", "experiments.run_hm3", f"--config={CONFIG}", f"--workdir={self.workdir}",
                   f"--zoo_dir={zoo_dir}", *extra]  # fmt: skip
            with open(log_path, "w") as log:  # the child keeps its own descriptor
                self.procs.append(subprocess.Popen(cmd, env=_env(num_devices), cwd=REPO, stdout=log,
                                                   stderr=subprocess.STDOUT))  # fmt: skip

    def wait(self) -> list:
        """Exit codes (None for a process killed at the timeout); kills every process still running."""
        deadline = self.start + TIMEOUT
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(deadline - time.perf_counter(), 1)))
            except subprocess.TimeoutExpired:
                codes.append(None)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        self.seconds = round(time.perf_counter() - self.start, 1)
        return codes

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def log_text(self, i: int = 0) -> str:
        return self.logs[i].read_text()

    def check(self, codes) -> dict:
        tails = "\n----\n".join(f"{p.name}:\n{p.read_text()[-3000:]}" for p in self.logs)
        assert codes == [0] * len(self.procs), (
            f"{self.name}: exit codes {codes} after {self.seconds} s\n{tails}"
        )
        return json.loads((self.workdir / "report.json").read_text())


@pytest.fixture(scope="module")
def runs(smoke_zoo_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("hm3_mesh")
    ref = _Run("reference", base, smoke_zoo_dir, 1, [()])
    started = [ref]
    try:
        ref_codes = ref.wait()  # first: its single-device programs fill the cache (a) and (b) read
        if ref_codes != [0]:  # nothing to compare with: fail fast with the reference's log
            ref.check(ref_codes)
        port = _free_port()
        multi = [(MESH, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
                  "--distributed_timeout=120") for i in range(2)]  # fmt: skip
        mesh8 = _Run("mesh8", base, smoke_zoo_dir, 8, [(MESH,)])
        started.append(mesh8)
        two = _Run("two_processes", base, smoke_zoo_dir, 4, multi)
        started.append(two)
        results = {"reference": (ref, ref_codes), "mesh8": (mesh8, mesh8.wait()), "two": (two, two.wait())}
        print({name: r.seconds for name, (r, _) in results.items()})  # shown with pytest -s / on failure
        yield results
    finally:
        for r in started:
            r.kill()


@pytest.fixture(scope="module")
def reference(runs):
    run, codes = runs["reference"]
    report = run.check(codes)
    # The comparison must be able to fail: the points differ between methods and preferences.
    points = np.concatenate([np.asarray(m["points"]) for m in report["methods"].values()])
    assert np.ptp(points) > 0.5
    assert "mesh {" not in run.log_text()  # one device, no mesh: the default engine
    return report


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


def test_same_report_on_8_devices_with_a_paths_data_mesh(runs, reference):
    run, codes = runs["mesh8"]
    report = run.check(codes)
    log = run.log_text()
    assert "mesh {'paths': 4, 'data': 2, 'model': 1} over 1 process(es)" in log, log[-2000:]
    _assert_same_report(report, reference, "paths:4,data:2 mesh vs 1 device")


def test_same_report_in_two_processes(runs, reference):
    run, codes = runs["two"]
    report = run.check(codes)
    logs = [run.log_text(i) for i in range(2)]
    assert "mesh {'paths': 4, 'data': 2, 'model': 1} over 2 process(es)" in logs[0], logs[0][-2000:]
    # Only process 0 prints the claims (host-side output); both computed the same report.
    assert any(line.startswith("{'") for line in logs[0].splitlines()), logs[0][-2000:]
    assert not any(line.startswith("{'") for line in logs[1].splitlines()), logs[1][-2000:]
    _assert_same_report(report, reference, "2 processes vs 1 process")
    stages = sorted(os.listdir(run.workdir / "stages"))
    assert stages and not [s for s in stages if s.startswith(".tmp")], stages


def test_importing_the_binary_leaves_the_xla_backend_uninitialised():
    """`jax.distributed.initialize` (in the binaries' main) must come before the XLA backend starts; a module
    that makes jax arrays at import time (evosax does) must not be imported at the top of the run's modules,
    nor of the baselines (hm3_jax.baselines imports evosax inside the functions that use it)."""
    code = (
        "import sys\n"
        "import jax._src.xla_bridge as xb\n"
        "import experiments.run_hm3\n"
        "import hm3_jax.baselines, hm3_jax.hm3.baselines_runner\n"
        "assert not xb._backends, f'backend started at import: {list(xb._backends)}'\n"
        "assert 'evosax' not in sys.modules, 'evosax imported at module level'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=_env(1), cwd=REPO, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
