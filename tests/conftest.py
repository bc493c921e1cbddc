"""Shared test setup: CPU only, float32 matmuls at full precision, one persistent compilation cache.

The suite is compile-bound (thousands of small programs; the HM3 smoke run alone compiles ~470), so a persistent
compilation cache is shared by both xdist workers and their children (the resumed run, the notebook's kernel):
a program compiled once is loaded, not compiled, by every later process (programs with host callbacks are never
cached by jax). It is set through the environment before jax starts, so subprocesses inherit it. XLA's
fast-compile flags (used by the mesh subprocess runs, tests/_subprocess_util.py) are NOT used in-process: they
change floating-point results in the last bits, and the planted-problem PPO test then decodes another path
(measured); in-process tests check the numerics users get.
"""

import os

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TEST_CACHE = os.environ.get("HM3_TEST_CACHE", os.path.join(_REPO, ".pytest_cache", "hm3"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_TEST_CACHE, "jax_cache_tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))  # > 0: locked for concurrent writers
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import os as _os  # noqa: E402

import pytest  # noqa: E402

_CACHE = _os.environ.get(
    "HM3_TEST_CACHE",
    _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), ".pytest_cache", "hm3"),
)


@pytest.fixture(scope="session")
def smoke_zoo_dir():
    """The tiny3 smoke zoo, built once per machine (file-locked across xdist workers) and reused.

    `build_or_load` rebuilds it when the smoke config's fingerprint changes, so a stale cache never leaks in.
    """
    from filelock import FileLock

    from experiments.configs import tiny3
    from hm3_jax.tasks import zoo as zoo_lib

    _os.makedirs(_CACHE, exist_ok=True)
    path = _os.path.join(_CACHE, "zoo_smoke")
    with FileLock(path + ".lock"):
        zoo_lib.build_or_load(tiny3.get_config("smoke").zoo, path, progress=False)
    return path
