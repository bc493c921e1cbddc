"""A run directory that resumes stage by stage and never mixes two runs.

Every stage of the end-to-end run (zoo, parameter level, architecture level, each baseline, the report) writes
its result as one JSON file under ``workdir/stages/``; a re-run of the same command reads finished stages back
instead of recomputing them, so a killed run resumes where it stopped and ends with the same report. The run's
config fingerprint is written to ``workdir/run.json`` on first use; a workdir created by a different config is
refused with an error that names the config keys that differ (run.json keeps the config).

All writes go to a temporary file in the same directory and are moved into place with ``os.replace``, so an
interruption never leaves a half-written stage that looks finished.

Multi-process runs (``jax.distributed``; every process runs the same program, see ``hm3_jax.distributed``):
every process computes every stage (stages may contain collectives, e.g. path evaluation on a mesh that spans
the processes, so all must take part), only process 0 writes ``run.json`` and the stage files, a barrier
follows each write, and then every process reads the stage back from the file process 0 wrote. Whether a
stage is already finished is process 0's answer broadcast to all, so all processes resume (or compute)
the same stages. The directory must be shared storage (NFS, a GCS fuse mount) on multi-host runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from filelock import FileLock, Timeout

from hm3_jax import distributed
from hm3_jax.io import atomic


class WorkdirError(RuntimeError):
    """The workdir cannot be used for this run (different config, unwritable, full)."""


BUSY = type("Busy", (), {"__repr__": lambda self: "BUSY"})()  # `Workdir.try_stage`: another process has it


def _to_jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, np.generic)) or type(x).__module__.startswith("jax"):
        return _to_jsonable(np.asarray(x).tolist())
    if isinstance(x, float) and not np.isfinite(x):
        return None if np.isnan(x) else (1e308 if x > 0 else -1e308)
    return x


def fingerprint(obj: Any) -> str:
    """A stable 16-hex-digit digest of a JSON-able object (e.g. ``config.to_dict()``)."""
    blob = json.dumps(_to_jsonable(obj), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        return {k: v for key, value in obj.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: obj}


def config_diff(old: dict, new: dict, limit: int = 8) -> list[str]:
    """`key: old -> new` for each dotted key whose value differs between two configs (as JSON: a tuple equals
    the list it is stored as); `(absent)` for a key only one has; at most `limit` entries, then `... (n more)`.
    """
    canon = [_flat(json.loads(json.dumps(_to_jsonable(c), default=str))) for c in (old, new)]
    keys = sorted(k for k in set(canon[0]) | set(canon[1]) if canon[0].get(k, ()) != canon[1].get(k, ()))
    show = [
        f"{k}: {json.dumps(canon[0].get(k)) if k in canon[0] else '(absent)'} -> "
        f"{json.dumps(canon[1].get(k)) if k in canon[1] else '(absent)'}"
        for k in keys[:limit]
    ]
    return show + ([f"... ({len(keys) - limit} more)"] if len(keys) > limit else [])


def stage_file(workdir: str, name: str) -> str:
    """Where stage `name` of the run in `workdir` is stored (`Workdir.stage_path`, usable before a Workdir is
    made, e.g. to read what an earlier run recorded without binding the directory to a config)."""
    return os.path.join(workdir, "stages", name.replace(":", "_").replace("/", "_") + ".json")


COMPILATION_CACHE = "jax_cache"  # WORKDIR/jax_cache: the run's persistent XLA compilation cache


def use_compilation_cache(workdir: str) -> str:
    """Points JAX's persistent compilation cache at `workdir/jax_cache` unless one is already configured (e.g.
    JAX_COMPILATION_CACHE_DIR), so a resumed run and `suggest` in a fresh process load the run's compiled
    programs instead of compiling them again. Every program is cached, also the many that compile in a tenth of
    a second (together most of a fresh `suggest`'s compile time). Returns the directory in use."""
    current = jax.config.jax_compilation_cache_dir
    if not current:
        current = os.path.join(os.path.abspath(workdir), COMPILATION_CACHE)
        jax.config.update("jax_compilation_cache_dir", current)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return current


def atomic_write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temp file in the same directory and ``os.replace``
    (`hm3_jax.io.atomic.write_text`: the umask's mode, no temporary left by a SIGTERM or, once ``path`` is
    written again, a SIGKILL).

    In a multi-process JAX run only process 0 writes (every process computed the same text; two writers of
    one path would race); the others return at once.
    """
    if not distributed.is_main_process():
        return
    try:
        atomic.write_text(path, text)
    except OSError as e:
        raise WorkdirError(f"could not write {path}: {e}") from e


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_to_jsonable(obj), indent=2, sort_keys=False) + "\n")


# Config sections that choose where and how much is held, never a result: left out of the fingerprint, so a run
# resumes under other values (e.g. `memory.resident_preferences` lowered after running out of memory).
NOT_FINGERPRINTED = ("memory",)


def run_identity(config_dict: dict) -> dict:
    """The part of a config that identifies a run's results: `config_dict` without `NOT_FINGERPRINTED`, and
    without `param_level.data_aware` while it is switched off (the parameter level's entries are then those of
    a config without the section, so runs made before it existed resume)."""
    out = {k: v for k, v in config_dict.items() if k not in NOT_FINGERPRINTED}
    param = out.get("param_level")
    if isinstance(param, dict) and not (param.get("data_aware") or {}).get("enabled", False):
        out["param_level"] = {k: v for k, v in param.items() if k != "data_aware"}
    return out


class Workdir:
    """A run directory bound to one config fingerprint.

    Args:
      path: the directory (created if missing).
      config_dict: the run's config as a plain dict; its fingerprint identifies the run.
    """

    def __init__(self, path: str, config_dict: dict):
        self.path = os.path.abspath(path)
        self.fingerprint = fingerprint(run_identity(config_dict))
        try:
            os.makedirs(os.path.join(self.path, "stages"), exist_ok=True)
        except OSError as e:
            raise WorkdirError(f"workdir {self.path} is not writable: {e}") from e
        if not os.access(self.path, os.W_OK):
            raise WorkdirError(f"workdir {self.path} is not writable")
        free = shutil.disk_usage(self.path).free
        if free < 200 * 2**20:
            raise WorkdirError(
                f"workdir {self.path} has only {free / 2**20:.0f} MiB free; need at least 200 MiB"
            )
        meta_path = os.path.join(self.path, "run.json")
        main = distributed.is_main_process()
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
            if meta.get("fingerprint") != self.fingerprint:
                differ = (
                    config_diff(run_identity(meta["config"]), run_identity(config_dict))
                    if "config" in meta
                    else []
                )
                what = (
                    f"whose config differs in {'; '.join(differ)}"
                    if differ
                    else f"with config fingerprint {meta.get('fingerprint')}, not this config's {self.fingerprint}"
                )
                raise WorkdirError(
                    f"workdir {self.path} holds a run {what}; use a new --workdir (or delete it, or run with "
                    "the recorded config: run.json) so two runs are never mixed"
                )
        elif main:
            atomic_write_json(meta_path, {"fingerprint": self.fingerprint, "config": config_dict})
        _barrier("workdir:run.json")

    def subdir(self, *parts: str) -> str:
        """`workdir/parts...` as a directory (created)."""
        p = os.path.join(self.path, *parts)
        os.makedirs(p, exist_ok=True)
        return p

    def stage_path(self, name: str) -> str:
        return stage_file(self.path, name)

    def has_stage(self, name: str) -> bool:
        return os.path.exists(self.stage_path(name))

    def load_stage(self, name: str) -> Any:
        with open(self.stage_path(name)) as f:
            return json.load(f)

    def stage(self, name: str, compute_fn: Callable[[], Any], *, main_only: bool = False) -> Any:
        """Returns the stored result of stage ``name`` or computes, stores and returns it.

        The stored result is read back through JSON even on the first run, so a resumed run sees exactly what
        an uninterrupted run saw. Concurrent processes on one workdir compute each stage once (file lock).

        In a multi-process JAX run (see the module docstring) every process computes the stage and process 0
        writes it; with ``main_only=True`` (host-side I/O such as exports, no collectives inside) only
        process 0 computes it and the others read its result.
        """
        if _process_count() > 1:
            return self._stage_multiprocess(name, compute_fn, main_only)
        # One process computes a stage; another one asking for it meanwhile waits and reads its result (two
        # writers of one stage would also share its checkpoint directory).
        with FileLock(self.stage_path(name) + ".lock"):
            if not self.has_stage(name):
                atomic_write_json(self.stage_path(name), compute_fn())
        return self.load_stage(name)

    def try_stage(self, name: str, compute_fn: Callable[[], Any]) -> Any:
        """`stage(name, compute_fn)` unless another process is computing stage `name` right now (it holds the
        stage's lock): then `BUSY` at once, without waiting. For stage workers (`pipeline.stage_workers`), which
        each take the stages nobody has taken yet; one-process runs only."""
        if _process_count() > 1:
            raise WorkdirError(
                "try_stage is for one-process runs; a multi-process run computes every stage together"
            )
        lock = FileLock(self.stage_path(name) + ".lock", timeout=0)
        try:
            lock.acquire()
        except Timeout:
            return BUSY
        try:
            if not self.has_stage(name):
                atomic_write_json(self.stage_path(name), compute_fn())
        finally:
            lock.release()
        return self.load_stage(name)

    def _stage_multiprocess(self, name: str, compute_fn: Callable[[], Any], main_only: bool) -> Any:
        done = bool(distributed.broadcast_from_main(np.int32(self.has_stage(name))))
        if not done:
            main = distributed.is_main_process()
            result = compute_fn() if (main or not main_only) else None
            if main:
                atomic_write_json(self.stage_path(name), result)
            distributed.barrier(f"workdir:stage:{name}")
        return self.load_stage(name)


def _process_count() -> int:
    return jax.process_count()


def _barrier(name: str) -> None:
    if _process_count() > 1:
        distributed.barrier(name)
