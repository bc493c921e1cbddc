"""Terminal logging of the binaries: the run's own lines, not its libraries' chatter.

Orbax logs a dozen INFO lines per checkpoint save (D2H transfers, write ratios, deleted steps: hundreds per
run), JAX one per backend it fails to find. All of them go through absl's handler like hm3_jax's own stage logs
(orbax and hm3_jax both call `absl.logging`), so levels per logger cannot tell them apart; a filter on the
handlers can, by the file a record comes from. `quiet_libraries` keeps every record of the own packages and
every WARNING or worse, and drops the rest, unless the user asked for more (absl's `--verbosity=1` or higher).
"""

from __future__ import annotations

import importlib.util
import logging as py_logging
import os
from collections.abc import Sequence

from absl import flags, logging


class OwnRecordsFilter(py_logging.Filter):
    """Passes records at `min_level` or above, and records logged from a file under one of `own_dirs`."""

    def __init__(
        self, own_dirs: Sequence[str], own_names: Sequence[str], min_level: int = py_logging.WARNING
    ):
        super().__init__()
        self.own_dirs = tuple(os.path.join(os.path.abspath(d), "") for d in own_dirs)
        self.own_names = tuple(own_names)
        self.min_level = min_level

    def filter(self, record: py_logging.LogRecord) -> bool:
        if record.levelno >= self.min_level:
            return True
        if record.name.split(".")[0] in self.own_names:  # std loggers named by module (`getLogger(__name__)`)
            return True
        return os.path.abspath(record.pathname).startswith(self.own_dirs)  # absl records: by file


def package_dirs(names: Sequence[str]) -> list[str]:
    """The directories of the importable packages among `names` (found without importing them)."""
    dirs = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            dirs.extend(spec.submodule_search_locations)
    return dirs


def quiet_libraries(own_packages: Sequence[str] = ("hm3_jax",), verbosity: int | None = None) -> bool:
    """Drops other libraries' records below WARNING from the terminal; keeps `own_packages`' records.

    Call it at the top of a binary's `main` (after absl parsed the flags, before the first JAX call, so JAX's
    backend lines are caught too). Also lowers C++ TensorFlow/XLA logging to warnings when it is not set.

    Args:
      own_packages: top-level packages whose INFO lines stay visible (e.g. ("hm3_jax", "experiments")).
      verbosity: absl's verbosity; None reads `--verbosity` (0 = INFO by default). At 1 or more nothing is
        filtered.
    Returns: whether the filter was installed.
    """
    if verbosity is None:
        verbosity = flags.FLAGS.verbosity if flags.FLAGS.is_parsed() else 0
    if verbosity >= 1:
        return False
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    # absl's handler is the root logger's in an absl binary: absl.logging calls and std loggers both end there.
    handler = logging.get_absl_handler()
    if not any(isinstance(f, OwnRecordsFilter) for f in handler.filters):
        handler.addFilter(OwnRecordsFilter(package_dirs(own_packages), own_packages))
    return True
