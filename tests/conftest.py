"""Shared test setup: CPU only, float32 matmuls at full precision."""

import os

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
