"""Issue 22: a killed command leaves nothing behind, and what it finishes is readable as the umask says.

`hm3_jax.io.atomic` writes every result under a temporary name and renames it into place. Checked here on a
merge of tiny checkpoints: a SIGTERM at three points (while a shard is written, after the shards while the
side files are copied, and while an existing output is being replaced) removes the temporaries and exits with
143, leaving the old output or the new one whole; a SIGKILL's temporaries are removed by the next merge into
the same output (another host's or a live process's are kept). Two merges run as real processes killed from
outside (the binary installs the handler; SIGKILL cannot be caught); the other points signal this process.
The smoke run's kill and resume is tests/test_hm3_run_resume.py.
"""

import json
import os
import signal
import subprocess
import sys

import jax
import pytest

from hm3_jax import models
from hm3_jax.io import atomic
from hm3_jax.io.checkpoint import Model, load_pretrained, save_pretrained
from hm3_jax.merging import safetensors_stream, streaming
from hm3_jax.models.config import ModelConfig
from hm3_jax.pipeline import workdir as workdir_lib
from hm3_jax.tasks import zoo as zoo_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = ModelConfig(family="llama", vocab_size=16, hidden_size=8, intermediate_size=12, num_layers=2,
                     num_heads=2, max_position_embeddings=16)  # fmt: skip


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("leftovers")
    dirs = {}
    for i, name in enumerate(("a", "b")):
        dirs[name] = str(root / name)
        save_pretrained(Model(CONFIG, models.init(CONFIG, jax.random.key(i))), dirs[name])
    return dirs


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _merge(pool, out, **kw):
    return streaming.merge_checkpoints("linear", None, [pool["a"], pool["b"]], str(out), progress=False, **kw)


def test_finished_files_have_the_umasks_modes(pool, tmp_path, umask_027):
    """0750 directories and 0640 files under umask 027 (temp files are 0600/0700, safetensors writes 0600)."""
    save_pretrained(load_pretrained(pool["a"]), tmp_path / "saved")
    _merge(pool, tmp_path / "merged")
    atomic.write_text(tmp_path / "report.md", "x\n")
    workdir_lib.atomic_write_json(
        str(tmp_path / "run" / "run.json"), {"a": 1}
    )  # run.json, report.json, stages
    for d in ("saved", "merged"):
        assert os.stat(tmp_path / d).st_mode & 0o777 == 0o750, d
        for name in os.listdir(tmp_path / d):
            assert os.stat(tmp_path / d / name).st_mode & 0o777 == 0o640, (d, name)
    for f in ("report.md", "run/run.json"):
        assert os.stat(tmp_path / f).st_mode & 0o777 == 0o640, f


def test_a_merge_removes_what_killed_merges_of_its_output_left(pool, tmp_path, monkeypatch):
    dead, live, out = _dead_pid(), os.getppid(), tmp_path / "out"
    left = {
        atomic.temp_prefix(out, pid=dead) + "abc123": True,  # a killed merge's half-written output: removed
        atomic.temp_prefix(out, "old", pid=dead)
        + "def456": True,  # a killed replacement's old version: removed
        atomic.temp_prefix(out, pid=live) + "ghi789": False,  # a running process's: kept
        f".out.tmp-{dead}@other-host-jkl012": False,  # another host's (shared storage): kept
        ".out.tmp-mnopqr": False,  # not of this module's naming: kept
        atomic.temp_prefix(tmp_path / "other", pid=dead)
        + "stu345": False,  # another output's: kept until then
    }
    for name in left:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half")
    _merge(pool, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == sorted(["out", *(n for n, gone in left.items() if not gone)])
    load_pretrained(str(tmp_path / "out"))


def test_zoo_start_removes_a_killed_builds_temporaries(tmp_path, monkeypatch):
    """`ensure_built` (build_zoo, run_hm3) removes `.zoo.tmp-*` of a dead process even when the zoo is built."""
    stale = tmp_path / (atomic.temp_prefix(tmp_path / "zoo", pid=_dead_pid()) + "abc123")
    stale.mkdir()
    monkeypatch.setattr(zoo_lib, "read_manifest", lambda workdir: {"fingerprint": "f"})
    monkeypatch.setattr(zoo_lib, "config_fingerprint", lambda config: "f")
    zoo_lib.ensure_built(None, str(tmp_path / "zoo"))
    assert not stale.exists()


def _sigterm_at(monkeypatch, owner, name, when=lambda *args: True):
    """Makes `owner.name` send SIGTERM to this process before doing its work (on calls where `when(*args)`)."""
    real = getattr(owner, name)

    def hook(*args, **kwargs):
        if when(*args):
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, hook)


@pytest.mark.parametrize("point", ["writing_a_shard", "copying_side_files", "replacing_the_old_output"])
def test_sigterm_removes_the_temporaries_and_leaves_a_whole_output(pool, tmp_path, monkeypatch, point):
    out = tmp_path / "out"
    _merge(pool, out)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    if point == "writing_a_shard":
        _sigterm_at(monkeypatch, safetensors_stream.ShardWriter, "write")
    elif point == "copying_side_files":
        _sigterm_at(monkeypatch, streaming, "copy_side_files")
    else:  # the first rename moves the old output aside: the signal waits until the new one is in place
        _sigterm_at(monkeypatch, atomic.os, "replace", lambda src, dst: os.fspath(src) == str(out))
    previous = atomic.install_signal_cleanup(grace=None)  # no watchdog thread in the test process
    try:
        with pytest.raises(atomic.Terminated) as stopped:
            _merge(pool, out, overwrite=True, weights=[0.25, 0.75])
    finally:
        monkeypatch.undo()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert os.listdir(tmp_path) == ["out"]  # no temporary left
    after = {name: (out / name).read_bytes() for name in os.listdir(out)}
    assert sorted(after) == sorted(before)
    assert (after == before) == (point != "replacing_the_old_output")  # the old output whole, or the new one
    load_pretrained(str(out))


# A merge through the binary that stops (prints "writing") after its first tensor is in the temporary output.
_CHILD = r"""
import sys, time
from hm3_jax.merging import safetensors_stream
from experiments import cli_errors, merge

real = safetensors_stream.ShardWriter.write
def write(self, name, array):
    real(self, name, array)
    print("writing", flush=True)
    time.sleep(120)
safetensors_stream.ShardWriter.write = write
sys.argv = ["merge", "--method=linear", f"--models={sys.argv[1]},{sys.argv[2]}", f"--out={sys.argv[3]}", "--noprogress"]
cli_errors.run(merge.main)
"""


def test_killed_merge_processes_leave_nothing_after_the_next_merge(pool, tmp_path):
    """SIGTERM from outside: the binary's handler removes the temporary output (exit code 143). SIGKILL: the
    temporary output stays until the next merge into the same --out removes it."""
    procs = {}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        (tmp_path / sig.name).mkdir()
        procs[sig] = subprocess.Popen(
            [sys.executable, "-c", _CHILD, pool["a"], pool["b"], str(tmp_path / sig.name / "out")],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )  # fmt: skip
    errs = {}
    for sig, proc in procs.items():
        assert proc.stdout.readline().strip() == "writing", proc.stderr.read()[-2000:]
        assert [n.split("-")[0] for n in os.listdir(tmp_path / sig.name)] == [".out.tmp"]
        proc.send_signal(sig)
        errs[sig] = proc.communicate(timeout=60)[1]
        assert proc.returncode == (128 + sig if sig == signal.SIGTERM else -sig), errs[sig][-2000:]
    assert "Traceback" not in errs[signal.SIGTERM] and "SIGTERM: stopped" in errs[signal.SIGTERM]
    assert os.listdir(tmp_path / "SIGTERM") == []
    assert len(os.listdir(tmp_path / "SIGKILL")) == 1  # what SIGKILL leaves ...
    _merge(pool, tmp_path / "SIGKILL" / "out")
    assert os.listdir(tmp_path / "SIGKILL") == ["out"]  # ... the next merge removes
    assert json.loads((tmp_path / "SIGKILL" / "out" / "config.json").read_text())["hidden_size"] == 8


# A main thread that cannot run Python's handler (stuck in a C call; here SIGTERM is blocked in it, so only the
# watchdog thread sees the signal) while a temporary directory exists.
_STUCK = r"""
import os, signal, sys, time
from hm3_jax.io import atomic

atomic.install_signal_cleanup(grace=0.5)
tmp = atomic.make_temp_dir(sys.argv[1])
open(os.path.join(tmp, "part"), "w").close()
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
print("ready", flush=True)
time.sleep(60)
"""


def test_sigterm_stops_a_main_thread_stuck_in_a_c_call(tmp_path):
    """The watchdog removes the temporaries and exits 143 when the main thread does not get to the handler."""
    proc = subprocess.Popen([sys.executable, "-c", _STUCK, str(tmp_path / "out")], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-2000:]
    assert len(os.listdir(tmp_path)) == 1
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)  # long before the 60 s sleep ends
    assert proc.returncode == 128 + signal.SIGTERM and "SIGTERM: stopped" in err, err[-2000:]
    assert os.listdir(tmp_path) == []
