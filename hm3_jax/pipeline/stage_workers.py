"""Stage workers: a run's independent stages computed by extra processes beside the main one (CPU hosts).

After HM3's architecture level, the no-parameter-level ablation and every baseline depend only on the spec, the
preferences and their keys (the path baselines also on HM3's evaluation count, their budget), not on each other
(`stage_plan.independent_stages`). With `run_hm3 --stage_workers=N`, N - 1 worker processes (the same command with
`--stage_worker=i`) start beside the main process. A worker waits for the main process's preferences, then takes
the independent stages nobody has taken yet in its own order (`Workdir.try_stage`: whoever holds a stage's file
lock computes it; the others skip it); the main process, after HM3, takes what is left the same way and then
waits for the stages the workers hold (computing any whose worker died: a dead process's lock is released).

Every stage is a pure function of the run's config, spec and keys, so the report is the one a single process
makes (tests/test_stage_workers.py), and a killed parallel run resumes like any other. What the processes do not
share is their engines' caches; the held-out per-example statistics a worker kept are written next to its stages
(WORKDIR/stage_worker_i.stats.npz, `save_kept_stats`) and read by the main process before the held-out bootstrap
(`load_kept_stats`), so the bootstrap re-runs no point a worker scored.

Costs: every worker loads the zoo and compiles its programs (the persistent compilation cache in WORKDIR/jax_cache
serves what another process compiled first), so host memory is N times one process's. One-process runs only
(no mesh, no jax.distributed): an accelerator belongs to one process. Pays where one process leaves cores idle
(small models on a CPU host: the parameter level's merges, PPO's updates and host work use about one core); a
worker runs at a lower CPU priority (`WORKER_NICE`), so the main process's critical path (the parameter level,
then HM3, which the path baselines wait for) keeps its speed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import logging

from hm3_jax.io import atomic
from hm3_jax.pipeline.workdir import BUSY, Workdir, stage_file

# A worker runs at this much lower CPU priority: the main process's parameter level and HM3 (which every path
# baseline waits for) keep their speed, and the worker takes the cores they leave idle (measured: with equal
# priority the two of them took 15 min where the main process alone takes 10, docs/speed.md).
WORKER_NICE = 10
WORKER_LOG = "stage_worker_{index}.log"  # WORKDIR/stage_worker_1.log, ...: a worker's output
WORKER_STATS = "stage_worker_{index}.stats.npz"  # its held-out engine's kept per-example statistics


def save_kept_stats(engine, path: str) -> None:
    """Writes `engine.kept_example_stats()` to `path` (npz: one array per row key and objective, named
    "<key hex>/<objective index>"; written atomically)."""
    arrays = {}
    for key, row in engine.kept_example_stats().items():
        # objectives without example_fn keep None: such rows are never bootstrapped
        if all(stats is not None for stats in row):
            arrays.update({f"{key.hex()}/{t}": np.asarray(stats) for t, stats in enumerate(row)})
    with atomic.atomic_file(path, "wb") as f:
        np.savez(f, **arrays)


def load_kept_stats(engine, workdir: str) -> int:
    """Adds to `engine` the kept statistics of every stage worker of the run in `workdir`
    (`save_kept_stats`); returns how many rows."""
    kept: dict[bytes, dict[int, np.ndarray]] = {}
    for name in sorted(os.listdir(workdir)):
        if name.startswith("stage_worker_") and name.endswith(".stats.npz"):
            with np.load(os.path.join(workdir, name), allow_pickle=False) as z:
                for entry in z.files:
                    key, t = entry.rsplit("/", 1)
                    kept.setdefault(bytes.fromhex(key), {})[int(t)] = z[entry]
    engine.add_example_stats({k: [row[t] for t in sorted(row)] for k, row in kept.items()})
    return len(kept)


def saving_kept_stats(compute: Callable[[], Any], engine, path: str) -> Callable[[], Any]:
    """`compute` that then writes `engine`'s kept statistics to `path` (before the stage file is written, so
    whoever reads the stage finds them)."""

    def run():
        result = compute()
        save_kept_stats(engine, path)
        return result

    return run


def run_stages(wd: Workdir, progress, stages: Sequence[tuple[str, Callable[[], Any]]], wait: bool) -> dict:
    """{name: result} of `stages` ((name, compute) pairs), each computed here or read back.

    Takes first, in order, the stages no other process is computing (`progress.try_stage`); then, with `wait`,
    waits for the ones other processes hold (the first such stage in order, then tries the rest again), and
    without `wait` leaves them to their processes (absent from the result).
    """
    results: dict[str, Any] = {}
    pending = list(stages)
    while pending:
        for k, (name, compute) in enumerate(pending):
            result = progress.try_stage(wd, name, compute)
            if result is not BUSY:
                results[name] = result
                del pending[k]
                break
        else:  # every pending stage is held by another process
            if not wait:
                break
            name, compute = pending.pop(0)
            logging.info("stage %s: computed by a stage worker; waiting for it", name)
            results[name] = progress.stage(wd, name, compute)
    return results


def wait_for_stage(workdir: str, name: str, poll_seconds: float = 1.0) -> None:
    """Blocks until stage `name` of the run in `workdir` is written; exits the process (code 1) when the process
    that started this one has gone (its main process died: nobody would write the stage)."""
    parent = os.getppid()
    path = stage_file(workdir, name)
    while not os.path.exists(path):
        if os.getppid() != parent:
            logging.error("stage worker: the main process is gone; stopping")
            sys.exit(1)
        time.sleep(poll_seconds)


def spawn(module: str, args: Sequence[str], count: int, workdir: str) -> list[subprocess.Popen]:
    """Starts stage workers 1..count-1: `python -m module *args --stage_worker=i` in this process's directory,
    each writing its output to WORKDIR/stage_worker_i.log. Returns the processes (`finish` waits for them)."""
    os.makedirs(workdir, exist_ok=True)
    procs = []
    for i in range(1, count):
        log = open(os.path.join(workdir, WORKER_LOG.format(index=i)), "w")  # noqa: SIM115 (the child's stdout)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", module, *args, f"--stage_worker={i}"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        )
        log.close()  # the child holds its own descriptor
    return procs


def finish(procs: Sequence[subprocess.Popen], workdir: str, ok: bool) -> None:
    """After the main process's run: waits for the workers (`ok`: they hold at most their last stage, which the
    main process waited for); when the main process failed, stops them (SIGTERM). A worker that failed is
    logged with its log file; the main process computed whatever it left."""
    for i, p in enumerate(procs, start=1):
        if not ok and p.poll() is None:
            p.terminate()
        code = p.wait()
        if ok and code != 0:
            log = os.path.join(workdir, WORKER_LOG.format(index=i))
            logging.warning("stage worker %d exited with code %d (see %s)", i, code, log)
