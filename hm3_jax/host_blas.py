"""Host-side numpy linear algebra on one BLAS thread: fast on a busy machine, the same values.

numpy's OpenBLAS starts one thread per core and its threads busy-wait for each other. When the cores are
already taken (XLA's own thread pool runs the program that called back to the host, or another job shares the
machine), a small SVD or solve then waits for descheduled threads: on this project's 2-core machine, with one
other process using both cores, 80 SVDs of a 64 x 256 matrix took 14.7 s with OpenBLAS's default 2 threads and
0.16 s with 1 (`benchmarks/host_blas.py`). The matrices hm3_jax factorises on the host (TSV-M's per-layer SVDs,
RegMean's singularity check, tiny8's probe fit) are small, so one thread costs nothing on an idle machine either.

`single_threaded(fn)` runs `fn` with the BLAS libraries numpy loaded (threadpoolctl) limited to one thread and
restores the previous limit after. Sections are serialised by a lock: OpenBLAS's thread count is process-wide,
so two overlapping sections (XLA runs host callbacks on several threads) would otherwise restore each other's
limits in the wrong order. The values do not change: OpenBLAS's results for these routines do not depend on its
thread count (`tests/test_host_blas.py` checks bit-equality).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import TypeVar

from threadpoolctl import ThreadpoolController

T = TypeVar("T")

# False: `single_threaded` leaves BLAS's thread count alone (`benchmarks/host_blas.py` measures both ways).
ENABLED = True
_LOCK = threading.RLock()  # re-entrant: a single-threaded function may call another
_CONTROLLER: ThreadpoolController | None = None


def controller() -> ThreadpoolController:
    """The process's threadpoolctl controller (created once: it inspects the loaded libraries)."""
    global _CONTROLLER
    if _CONTROLLER is None:
        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER


def single_threaded(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator: `fn` runs with numpy's BLAS on one thread (module docstring); returns what `fn` returns."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not ENABLED:
            return fn(*args, **kwargs)
        with _LOCK, controller().limit(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return wrapper
