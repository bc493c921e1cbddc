"""Files and directories that appear whole or not at all, with ordinary permissions, and no leftovers.

Everything hm3_jax writes for a user (checkpoints, zoo, run directory, reports, plots) is written under a
temporary name beside its final path and renamed into place when complete, so a reader or a resumed run never
sees half of it. Three things come with that, in this one module:

* Permissions. `tempfile` makes temporaries private (0600 files, 0700 directories) and safetensors writes 0600;
  what is renamed into place gets the modes of an ordinary file: `0o666 & ~umask` (`0o777 & ~umask` for
  directories), so another user of shared storage reads it as the umask intends.
* SIGTERM. `install_signal_cleanup` (the binaries call it first thing) makes SIGTERM remove this process's
  temporaries and raise `Terminated` (a SystemExit, exit code 143) in the main thread. Python runs the handler
  between two bytecodes of the main thread, so no write of ours is in flight while it deletes; the renames that
  put a result in place are a critical section (`deferred_signals`) the signal waits for, so a result is either
  wholly there or not at all. Python's handler also waits for a C call of the main thread (an XLA compilation,
  a device computation, a collective that hangs) to return: if the main thread has not stopped `grace` seconds
  after the signal, a watchdog thread removes the temporaries (outside a critical section) and exits the
  process with the same code, as the default action of the signal would have done at once.
* SIGKILL. Temporary names say who made them: `.NAME.tmp-PID@HOST-XXXXXXXX` while NAME is written,
  `.NAME.old-PID@HOST-XXXXXXXX` for the version of NAME being replaced. Before NAME is written again (the rerun
  of a killed command writes what the kill interrupted), its temporaries whose process is gone (made on this
  host by a pid that no longer runs) are removed; another host's or a live process's are left alone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

from absl import logging

KINDS = ("tmp", "old")


class Terminated(SystemExit):
    """Raised in the main thread when a signal `install_signal_cleanup` handles arrives (code 128 + signal)."""


# ------------------------------------------------------------------------------------------------ permissions
def _umask() -> int:
    """The process umask, read without changing it where /proc says it (setting it to read it is a race with
    other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_ordinary(path: str) -> None:
    """Gives `path` (a file, or a directory and everything below it) the modes new files get from the umask."""
    mask = _umask()
    if not os.path.isdir(path):
        os.chmod(path, 0o666 & ~mask)
        return
    for dirpath, _, filenames in os.walk(path):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~mask)


# ---------------------------------------------------------------------------------------- temporary names
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"


def temp_prefix(path: str | os.PathLike, kind: str = "tmp", pid: int | None = None) -> str:
    """`.NAME.KIND-PID@HOST-`: the start of the temporary names of `path` made by process `pid` (default this
    one) of this host (mkstemp/mkdtemp add the random rest); `remove_stale` recognises them by it."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return f".{os.path.basename(os.fspath(path))}.{kind}-{os.getpid() if pid is None else pid}@{_host()}-"


def _owner(path: str, name: str) -> tuple[int, str] | None:
    """(pid, host) of `name` when it is a temporary of `path` made by this module, else None."""
    pattern = rf"\.{re.escape(os.path.basename(path))}\.(?:{'|'.join(KINDS)})-(\d+)@(.+)-[a-z0-9_]+"
    match = re.fullmatch(pattern, name)
    return (int(match.group(1)), match.group(2)) if match else None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(path: str) -> list[str]:
    """Removes the temporaries of `path` left by a killed process of this host; returns the paths removed.

    A temporary is stale when its name (`temp_prefix`) names this host and a pid that is not running. Another
    host's temporaries (shared storage) and a running process's are kept.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    removed = []
    for name in names:
        owner = _owner(path, name)
        if owner is None or owner[1] != _host() or owner[0] == os.getpid() or _running(owner[0]):
            continue
        stale = os.path.join(parent, name)
        if os.path.isdir(stale) and not os.path.islink(stale):
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(stale)
        removed.append(stale)
    if removed:
        logging.info("removed %d temporary file(s) of killed processes: %s", len(removed), removed)
    return removed


# ------------------------------------------------------------------------------------ SIGTERM and the registry
_LOCK = threading.RLock()  # held by critical sections; the watchdog takes it before it removes and exits
_LIVE: set[str] = set()  # this process's temporaries, removed by the signal handler
# deferring: critical sections the main thread is in; pending: a signal they hold back; handled: our signals;
# seen: how many of them the main thread's handler has run for (the watchdog counts what arrived)
_SIGNALS = {"deferring": 0, "pending": None, "terminating": False, "handled": (), "seen": 0}


def _register(path: str) -> None:
    with _LOCK:
        _LIVE.add(path)


def _unregister(path: str) -> None:
    with _LOCK:
        _LIVE.discard(path)


def remove_live_temporaries() -> None:
    """Removes every temporary this process made and has not yet renamed into place or removed."""
    with _LOCK:
        live = sorted(_LIVE)
        _LIVE.clear()
    for path in live:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _on_signal(signum, frame) -> None:
    del frame
    _SIGNALS["seen"] += 1
    if _SIGNALS["terminating"]:  # a second signal while the first one's cleanup runs
        return
    if _SIGNALS["deferring"]:
        _SIGNALS["pending"] = signum
        return
    _terminate(signum)


def _terminate(signum: int) -> None:
    _SIGNALS["terminating"] = True
    remove_live_temporaries()
    print(f"{signal.Signals(signum).name}: stopped; temporary files removed", file=sys.stderr)
    raise Terminated(128 + signum)


def install_signal_cleanup(signums: tuple[int, ...] = (signal.SIGTERM,), grace: float | None = 10.0) -> dict:
    """Makes `signums` remove this process's temporaries and raise `Terminated` (exit code 128 + signal); a
    main thread that does not get to the handler within `grace` seconds is stopped by a watchdog thread
    (module docstring; None: no watchdog).

    Call from the main thread of a binary, before anything is written. Returns the previous handlers
    (`signal.signal(s, h)` for each restores them).
    """
    _SIGNALS.update(deferring=0, pending=None, terminating=False, handled=tuple(signums))
    previous = {s: signal.signal(s, _on_signal) for s in signums}
    if grace is not None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd)  # the C-level handler writes the signal's number here, in any thread
        watchdog = threading.Thread(
            target=_watchdog, args=(read_fd, grace), name="signal-watchdog", daemon=True
        )
        watchdog.start()
    return previous


def _watchdog(read_fd: int, grace: float) -> None:
    """Waits for one of our signals; when the main thread has not run its handler for it `grace` seconds
    later, removes the temporaries between two critical sections and exits."""
    received = _SIGNALS["seen"]
    while True:
        data = os.read(read_fd, 1)
        if not data:
            return
        if data[0] not in _SIGNALS["handled"]:
            continue
        received += 1
        time.sleep(grace)
        if _SIGNALS["seen"] >= received:  # the main thread has it in hand (stopping, or after a rename)
            continue
        with _LOCK:  # not while a result is being renamed into place; never released: the process ends here
            remove_live_temporaries()
            os.write(2, f"{signal.Signals(data[0]).name}: stopped; temporary files removed\n".encode())
            os._exit(128 + data[0])


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """A critical section (the renames that put a result in place, registering a new temporary): a handled
    signal waits until it ends, and the watchdog does not remove temporaries while it runs."""
    main = threading.current_thread() is threading.main_thread()  # only the main thread runs handlers
    try:
        with _LOCK:
            _SIGNALS["deferring"] += main
            try:
                yield
            finally:
                _SIGNALS["deferring"] -= main
    finally:
        pending = _SIGNALS["pending"]
        if main and not _SIGNALS["deferring"] and pending is not None:
            _SIGNALS["pending"] = None
            _terminate(pending)


# ---------------------------------------------------------------------------------------------- files
@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", encoding: str | None = None) -> Iterator:
    """Yields a file object open on a temporary beside `path`; when the block ends without an error the file is
    flushed to disk, given the umask's mode and renamed to `path`; on an error (or a signal) it is removed.

    Args:
      path: the final file (its directory is created if missing).
      mode: "w" or "wb".
      encoding: of a text file (default utf-8).
    """
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    remove_stale(path)
    with deferred_signals():  # registered before the signal handler can run
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=temp_prefix(path, "tmp"))
        _register(tmp)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else (encoding or "utf-8")) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        make_ordinary(tmp)
        with deferred_signals():
            os.replace(tmp, path)
            _unregister(tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        _unregister(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` through `atomic_file`."""
    with atomic_file(path) as f:
        f.write(text)


# ----------------------------------------------------------------------------------------- directories
def make_temp_dir(path: str | os.PathLike) -> str:
    """A new empty temporary directory beside `path` (same filesystem, so `commit_directory` is a rename),
    after removing `path`'s stale temporaries. Raises OSError when it cannot be made."""
    path = os.path.abspath(os.fspath(path))
    remove_stale(path)
    with deferred_signals():  # registered before the signal handler can run
        tmp = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=temp_prefix(path, "tmp"))
        _register(tmp)
    return tmp


def discard(tmp: str) -> None:
    """Removes a temporary directory of `make_temp_dir` (after an error)."""
    shutil.rmtree(tmp, ignore_errors=True)
    _unregister(tmp)


def commit_directory(tmp: str, path: str | os.PathLike, overwrite: bool = True) -> None:
    """Puts the complete directory `tmp` (from `make_temp_dir(path)`) in place as `path`, with the umask's modes.

    An existing `path` (only with `overwrite`) is renamed aside first and deleted once the new one is in place;
    the renames run with signals deferred. Raises FileExistsError when `path` exists without `overwrite`.
    """
    path = os.path.abspath(os.fspath(path))
    make_ordinary(tmp)
    with deferred_signals():
        old = None
        if os.path.lexists(path):
            if not overwrite:
                raise FileExistsError(f"{path!r} appeared while it was being written (pass overwrite=True)")
            old = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=temp_prefix(path, "old"))
            os.rmdir(old)
            os.replace(path, old)
            _register(old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
                _unregister(old)
            raise
        _unregister(tmp)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        _unregister(old)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = True) -> Iterator[str]:
    """Yields a temporary directory beside `path`; when the block ends without an error it replaces `path`
    (`commit_directory`), on an error (or a signal) it is removed.

    Raises FileExistsError before anything is written when `path` exists and is not a directory, or exists
    without `overwrite`.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path!r} exists and is not a directory")
    if os.path.isdir(path) and not overwrite:
        raise FileExistsError(f"{path!r} already exists (pass overwrite=True to replace it)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = make_temp_dir(path)
    try:
        yield tmp
        commit_directory(tmp, path, overwrite)
    except BaseException:
        discard(tmp)
        raise
