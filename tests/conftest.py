"""Shared test setup: CPU only, float32 matmuls at full precision, fast compilation, one compilation cache.

The suite is compile-bound (thousands of small programs; the HM3 smoke run alone compiles ~470), so:
* XLA's backend optimisations are off (`FAST_COMPILE_XLA_FLAGS`, as tests/_subprocess_util.py does for the
  subprocess runs): about a third less compile time, same results (docs/testing.md);
* a persistent compilation cache shared by both xdist workers and their children (the resumed run, the
  notebook's kernel): a program compiled once is loaded, not compiled, by every later process. Programs with
  host callbacks are never cached by jax; everything else is.
Both are set through the environment before jax starts, so subprocesses and the notebook kernel inherit them.
"""

import os

_FAST = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST).strip()
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
