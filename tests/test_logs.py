"""The binaries' log filter: the own packages' lines and every warning pass, libraries' INFO lines do not."""

import logging
import os

from absl import logging as absl_logging

import hm3_jax
from hm3_jax import logs

OWN_DIR = os.path.dirname(hm3_jax.__file__)


def _record(pathname: str, level: int = logging.INFO, name: str = "absl") -> logging.LogRecord:
    return logging.LogRecord(name, level, pathname, 1, "msg", None, None)


def test_filter_keeps_own_lines_and_warnings_and_drops_library_info():
    f = logs.OwnRecordsFilter(logs.package_dirs(["hm3_jax"]), ["hm3_jax"])
    orbax = "/venv/lib/python3.11/site-packages/orbax/checkpoint/checkpoint_manager.py"
    assert f.filter(_record(os.path.join(OWN_DIR, "hm3", "run.py")))  # absl.logging from hm3_jax
    assert f.filter(_record("/elsewhere/zoo.py", name="hm3_jax.tasks.zoo"))  # getLogger(__name__)
    assert not f.filter(_record(orbax))
    assert not f.filter(_record(orbax, logging.DEBUG))
    assert f.filter(_record(orbax, logging.WARNING))
    # A sibling directory whose name starts like the package's is not the package.
    assert not f.filter(_record(OWN_DIR + "_other/x.py"))


def test_quiet_libraries_installs_once_and_not_at_verbosity_1(monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")  # the call's setdefault leaves it; nothing leaks
    handler = absl_logging.get_absl_handler()
    before = list(handler.filters)
    try:
        assert not logs.quiet_libraries(verbosity=1)
        assert handler.filters == before
        assert logs.quiet_libraries(verbosity=0)
        assert logs.quiet_libraries(verbosity=0)  # a second call adds no second filter
        added = [f for f in handler.filters if isinstance(f, logs.OwnRecordsFilter)]
        assert len(added) == 1
    finally:
        for f in list(handler.filters):
            if f not in before:
                handler.removeFilter(f)
