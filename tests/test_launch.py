"""launch/: every script runs dry (prints its commands, exits 0) and rejects bad usage (the paper configs the
scripts run are built by tests/test_memory_plan.py)."""

import os
import shlex
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH="/usr/bin:/bin")  # no gcloud/ssh/srun here: --dry_run must not need them
    return subprocess.run(
        ["bash", os.path.join(LAUNCH, script), *args], capture_output=True, text=True, env=env, timeout=30
    )


def _commands(result: subprocess.CompletedProcess) -> list[list[str]]:
    assert result.returncode == 0, result.stderr
    return [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]


def test_create_tpu_vm_dry_run():
    cmds = _commands(
        _run(
            "create_tpu_vm.sh",
            "--name=hm3",
            "--zone=us-central2-b",
            "--accelerator_type=v4-32",
            "--project=proj",
            "--spot",
            "--dry_run",
        )
    )
    assert cmds == [
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "create",
            "hm3",
            "--zone=us-central2-b",
            "--project=proj",
            "--accelerator-type=v4-32",
            "--version=tpu-ubuntu2204-base",
            "--spot",
        ]
    ]


def test_setup_tpu_vm_dry_run_installs_jax_tpu_on_every_worker():
    cmds = _commands(_run("setup_tpu_vm.sh", "--name=hm3", "--zone=z", "--dry_run"))
    assert [c[0] for c in cmds] == ["tar", "gcloud", "gcloud"]
    assert "--exclude=.venv" in cmds[0] and cmds[0][4] == REPO
    assert cmds[1][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in cmds[1]
    ssh = cmds[2]
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "hm3"] and "--worker=all" in ssh
    remote = next(a for a in ssh if a.startswith("--command="))
    assert "python3 -m venv .venv" in remote and "pip install -q -e . 'jax[tpu]>=0.10,<0.11'" in remote


def test_run_tpu_dry_run_runs_module_on_every_worker():
    cmds = _commands(
        _run(
            "run_tpu.sh",
            "--name=hm3",
            "--zone=z",
            "--dry_run",
            "--",
            "experiments.run_hm3",
            "--config=c.py",
            "--workdir=gs://b/run 1",
        )
    )
    assert len(cmds) == 1 and "--worker=all" in cmds[0]
    remote = shlex.split(next(a for a in cmds[0] if a.startswith("--command="))[len("--command=") :])
    assert remote[remote.index("-m") :] == [
        "-m",
        "experiments.run_hm3",
        "--multihost=on",
        "--config=c.py",
        "--workdir=gs://b/run 1",
    ]


def test_run_gpu_multihost_dry_run_ssh_and_slurm():
    cmds = _commands(
        _run(
            "run_gpu_multihost.sh",
            "--hosts=g0,g1,g2",
            "--port=2222",
            "--dry_run",
            "--",
            "experiments.run_hm3",
            "--mesh=paths:3,model:8",
        )
    )
    assert [c[:2] for c in cmds] == [["ssh", "g0"], ["ssh", "g1"], ["ssh", "g2"]]
    for i, cmd in enumerate(cmds):
        remote = shlex.split(cmd[2])
        assert remote[remote.index("-m") :] == [
            "-m",
            "experiments.run_hm3",
            "--coordinator_address=g0:2222",
            "--num_processes=3",
            f"--process_id={i}",
            "--mesh=paths:3,model:8",
        ]
    cmds = _commands(
        _run("run_gpu_multihost.sh", "--slurm", "--nodes=2", "--dry_run", "--", "experiments.x", "--a=1")
    )
    assert cmds == [
        [
            "srun",
            "--nodes=2",
            "--ntasks-per-node=1",
            "hm3_jax/.venv/bin/python",
            "-m",
            "experiments.x",
            "--multihost=on",
            "--a=1",
        ]
    ]


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("create_tpu_vm.sh", ["--zone=z", "--accelerator_type=v4-8", "--dry_run"], "--name needs a value"),
        (
            "create_tpu_vm.sh",
            ["--name=a", "--zone=z", "--accelerator_type=v4", "--dry_run"],
            "not like v4-32",
        ),
        ("create_tpu_vm.sh", ["--name=a", "--bogus", "--dry_run"], "unknown argument '--bogus'"),
        ("setup_tpu_vm.sh", ["--name=a", "--dry_run"], "--zone needs a value"),
        ("run_tpu.sh", ["--name=a", "--zone=z", "--dry_run"], "missing the module"),
        ("run_tpu.sh", ["--name=a", "--zone=z", "--dry_run", "--", "rm -rf"], "not a python module name"),
        ("run_gpu_multihost.sh", ["--dry_run", "--", "experiments.x"], "--hosts needs a value"),
        ("run_gpu_multihost.sh", ["--slurm", "--dry_run", "--", "experiments.x"], "--slurm needs --nodes"),
        (
            "run_gpu_multihost.sh",
            ["--hosts=a", "--port=x", "--dry_run", "--", "experiments.x"],
            "not a number",
        ),
    ],
)
def test_usage_errors(script, args, message):
    result = _run(script, *args)
    assert result.returncode == 2 and message in result.stderr and not result.stdout.startswith("+ ")


def test_help_exits_zero():
    for script in ("create_tpu_vm.sh", "setup_tpu_vm.sh", "run_tpu.sh", "run_gpu_multihost.sh"):
        result = _run(script, "--help")
        assert result.returncode == 0 and "--dry_run" in result.stdout, script
