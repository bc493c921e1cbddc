"""Host-side agreement between the processes of a multi-controller run: who does I/O (process 0), barriers of
the coordination service, broadcasting process 0's host values, and bringing global arrays back to every
process (``to_host``)."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils

ALIGN_TIMEOUT_SECONDS = 900
# The coordination service needs a fresh barrier id per barrier: `align_processes` numbers its barriers in call
# order, which is the same on every process (each must call it equally often, in the same order).
_align_sequence = itertools.count(1)


def is_main_process() -> bool:
    """True on process 0 (the one that does host-side I/O, logging and progress bars)."""
    return jax.process_index() == 0


def main_process_only(fn: Callable) -> Callable:
    """Decorator: runs ``fn`` on process 0 only; other processes get ``None`` back.

    For host-side I/O that must happen once (JSON reports, plots, ``print``); not for orbax saves or anything
    containing a collective (every process must take part in those). Progress bars:
    ``tqdm(..., disable=not is_main_process())``.
    """

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        return fn(*args, **kwargs) if is_main_process() else None

    return wrapped


def align_processes(name: str) -> None:
    """Waits until every process gets here (no-op with one process): a barrier of the coordination service,
    not a device collective, with a long timeout (``ALIGN_TIMEOUT_SECONDS``).

    Call it before a program with cross-process collectives whenever the processes may have drifted apart:
    gloo gives a new communication context only 30 s for every process to join (a hard-coded key-value
    timeout), and the processes drift by whole compilations (jax writes the persistent compilation cache from
    process 0 only, so process 1 compiles what process 0 loads). Every process must call it equally often.
    """
    if jax.process_count() == 1:
        return
    client = jax_distributed.global_state.client
    client.wait_at_barrier(f"hm3_align:{name}:{next(_align_sequence)}", ALIGN_TIMEOUT_SECONDS * 1000)


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (no-op with one process).

    ``align_processes`` then ``multihost_utils.sync_global_devices`` (a tiny collective), so every process must
    call it, in the same order. Use it after process 0 writes a file that the others read next.
    """
    if jax.process_count() > 1:
        align_processes(name)
        multihost_utils.sync_global_devices(name)


def broadcast_from_main(value: Any) -> Any:
    """Process 0's value of a pytree of numpy-compatible leaves on every process (identity with one process).

    For host-side decisions that must agree, e.g. whether a stage file already exists (a collective)."""
    if jax.process_count() == 1:
        return value
    align_processes("broadcast_from_main")
    return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(value))


def quiet_non_main_processes() -> None:
    """absl logging at WARNING on processes other than 0 (their INFO lines only repeat process 0's)."""
    if not is_main_process():
        logging.set_verbosity(logging.WARNING)


def to_host(tree: Any) -> Any:
    """Every leaf as a numpy array holding the *global* value, on every process.

    Uses ``multihost_utils.process_allgather(tiled=True)`` for arrays spread over several processes (a
    collective: every process must call it). Fully addressable arrays are copied directly.
    """

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(get, tree)
