"""Stage workers (`run_hm3 --stage_workers=N`, hm3_jax/pipeline/stage_workers.py): a stage another process holds
is skipped, not waited for, until nothing else is left; a parallel run's report is the one-process run's."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from hm3_jax.pipeline import stage_workers
from hm3_jax.pipeline.progress import RunProgress, Stage
from hm3_jax.pipeline.workdir import BUSY, Workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A process that takes stage `name`'s lock, says so, and after `hold` seconds writes the stage and exits.
HOLDER = """
import json, os, sys, time
from filelock import FileLock
path, hold, value = sys.argv[1], float(sys.argv[2]), sys.argv[3]
with FileLock(path + ".lock"):
    open(path + ".taken", "w").close()
    time.sleep(hold)
    with open(path, "w") as f:
        json.dump(value, f)
"""


def hold_stage(wd: Workdir, name: str, hold: float, value: str) -> subprocess.Popen:
    path = wd.stage_path(name)
    p = subprocess.Popen([sys.executable, "-c", HOLDER, path, str(hold), value])
    deadline = time.time() + 60
    while not os.path.exists(path + ".taken"):
        assert p.poll() is None and time.time() < deadline, "the lock holder did not start"
        time.sleep(0.05)
    return p


def progress_for(names) -> RunProgress:
    return RunProgress([Stage(n, "model", 1) for n in names], log_fn=lambda *a: None)


def test_try_stage_skips_a_stage_another_process_computes(tmp_path):
    wd = Workdir(str(tmp_path / "run"), {"seed": 0})
    holder = hold_stage(wd, "x", 1.0, "theirs")
    calls = []
    assert wd.try_stage("x", lambda: calls.append(1) or "mine") is BUSY and calls == []
    assert holder.wait(timeout=60) == 0
    assert wd.try_stage("x", lambda: calls.append(1) or "mine") == "theirs" and calls == []  # stored: read
    assert wd.try_stage("y", lambda: calls.append(1) or "mine") == "mine" and calls == [1]
    assert wd.load_stage("y") == "mine"


def test_run_stages_takes_free_stages_first_then_waits_for_the_held_ones(tmp_path):
    wd = Workdir(str(tmp_path / "run"), {"seed": 0})
    order = []

    def compute(name):
        return lambda: order.append(name) or f"mine:{name}"

    stages = [(n, compute(n)) for n in ("a", "b", "c")]
    holder = hold_stage(wd, "a", 3.0, "theirs:a")
    # without waiting (a worker): "a" is left to the process holding it
    got = stage_workers.run_stages(wd, progress_for("abc"), stages[:2], wait=False)
    assert got == {"b": "mine:b"} and order == ["b"]
    # the main process: "c" first (free; "b" is stored), then it waits for "a" and reads what the holder wrote
    prog = progress_for("abc")
    got = stage_workers.run_stages(wd, prog, stages, wait=True)
    assert got == {"b": "mine:b", "c": "mine:c", "a": "theirs:a"} and order == ["b", "c"]
    assert holder.wait(timeout=60) == 0 and prog.done == {"a", "b", "c"}


def test_a_stage_whose_holder_died_is_computed_by_the_waiting_process(tmp_path):
    wd = Workdir(str(tmp_path / "run"), {"seed": 0})
    holder = hold_stage(wd, "a", 600.0, "never")
    holder.kill()  # the lock goes with the process (flock); nothing was written
    holder.wait(timeout=60)
    got = stage_workers.run_stages(wd, progress_for("a"), [("a", lambda: "mine")], wait=True)
    assert got == {"a": "mine"}


def strip_times(x):
    """The report without what depends on the clock."""
    if isinstance(x, dict):
        return {k: strip_times(v) for k, v in x.items() if "seconds" not in k and k != "workdir"}
    if isinstance(x, list):
        return [strip_times(v) for v in x]
    return x


def test_stage_workers_give_the_one_process_report(smoke_run, smoke_zoo_dir, tmp_path):
    """The smoke run's ablation and baselines recomputed by `run_hm3 --stage_workers=2` (the main process and one
    worker; the stages before them copied): the same report, every stage computed once, some by the worker."""
    config, workdir, report = smoke_run
    par = str(tmp_path / "parallel")
    os.makedirs(os.path.join(par, "stages"))
    shutil.copy(os.path.join(workdir, "run.json"), par)
    for name in ("spec", "source_scores", "preferences", "param_level", "hm3"):
        shutil.copy(os.path.join(workdir, "stages", f"{name}.json"), os.path.join(par, "stages"))
    cmd = [
        sys.executable,
        "-m",
        "experiments.run_hm3",
        "--config=experiments/configs/tiny3.py:smoke",
        f"--workdir={par}",
        f"--zoo_dir={smoke_zoo_dir}",
        "--stage_workers=2",
        "--stage_worker_nice=0",  # the same priority: the worker takes its share on a busy test machine
    ]
    # the session's compilation cache (conftest's JAX_COMPILATION_CACHE_DIR) and its matmul precision
    env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest")
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=1500)
    log = open(os.path.join(par, stage_workers.WORKER_LOG.format(index=1))).read()
    assert out.returncode == 0, out.stderr[-3000:] + "\nworker:\n" + log[-3000:]
    with open(os.path.join(par, "report.json")) as f:
        again = json.load(f)
    want = json.loads(json.dumps(report))  # as written: JSON types
    assert set(again["methods"]) == set(want["methods"])
    for name, m in want["methods"].items():
        np.testing.assert_allclose(again["methods"][name]["points"], m["points"], err_msg=name)
    for key in ("methods", "bootstrap", "claims", "dominance", "balanced", "budget"):
        assert strip_times(again.get(key)) == strip_times(want.get(key)), key
    assert "done in" in log, log[-3000:]  # the worker computed at least one stage


class FakeEngine:
    """`kept_example_stats` / `add_example_stats` of a PathEngine, over a plain dict."""

    def __init__(self, kept=None):
        self.kept = dict(kept or {})

    def kept_example_stats(self):
        return dict(self.kept)

    def add_example_stats(self, kept):
        self.kept.update(kept)
        return self


def test_kept_stats_written_by_a_worker_are_read_back_exactly(tmp_path):
    rng = np.random.default_rng(0)
    rows = {
        bytes([i]) * 20: [rng.integers(0, 2, 7).astype(np.float32), rng.integers(0, 9, (7, 4)), rng.random(7)]
        for i in range(3)
    }
    worker = FakeEngine(rows)
    save = stage_workers.saving_kept_stats(
        lambda: "result", worker, str(tmp_path / "stage_worker_1.stats.npz")
    )
    assert save() == "result"
    stage_workers.save_kept_stats(  # another worker's file too
        FakeEngine({b"x" * 20: [np.zeros(2)]}), str(tmp_path / "stage_worker_2.stats.npz")
    )
    main = FakeEngine()
    assert stage_workers.load_kept_stats(main, str(tmp_path)) == 4
    assert set(main.kept) == set(rows) | {b"x" * 20}
    for key, row in rows.items():
        assert len(main.kept[key]) == 3
        for a, b in zip(main.kept[key], row, strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
