"""Shared test setup: CPU only, float32 matmuls at full precision, one persistent compilation cache, the
shared smoke zoo and smoke HM3 run, and the order in which xdist hands out the test files.

The suite is compile-bound (thousands of small programs; the HM3 smoke run alone compiles ~470), so a persistent
compilation cache is shared by both xdist workers and their children (the resumed run, the notebook's kernel):
a program compiled once is loaded, not compiled, by every later process (programs with host callbacks are never
cached by jax). It is set through the environment before jax starts, so subprocesses inherit it, and it is kept
per machine (`_compile_cache_root`), so later suite runs load what earlier ones compiled. XLA's
fast-compile flags (used by the mesh subprocess runs, tests/_subprocess_util.py) are NOT used in-process: they
change floating-point results in the last bits, and the planted-problem PPO test then decodes another path
(measured); in-process tests check the numerics users get.

Schedule (`make test` = `pytest -n 2 --dist loadfile`): the suite is dominated by two long files, the smoke HM3
run (tests/test_hm3_run.py) and the mesh runs (tests/test_hm3_distributed.py). `pytest_collection_modifyitems`
puts them first, then the file that uses the finished smoke run (tests/test_hm3_run_resume.py), then the rest
longest first; `pytest_configure` turns off xdist's reordering of files by test count (`--loadscope-reorder`)
so that this order is the order in which files are handed out. docs/testing.md has the measurements.
"""

import os

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compile_cache_root() -> str:
    """Where the tests' persistent compilation caches live (exported as HM3_TEST_COMPILE_CACHE for the children).

    Per machine, not per clone: `${XDG_CACHE_HOME:-~/.cache}/hm3_jax/tests`, so a fresh clone on a machine that
    has run the suite before loads the programs its code did not change instead of compiling them again (as pip
    reuses its wheel cache for the install). jax keys every entry by the program, its compile options, the
    jax/jaxlib versions and the devices, so an entry never serves another program; results do not depend on
    whether a program was loaded or compiled. `HM3_TEST_COMPILE_CACHE` chooses another directory; with
    `HM3_TEST_CACHE` set (a cold measurement: `HM3_TEST_CACHE=$(mktemp -d)`) the caches live under it.
    """
    if os.environ.get("HM3_TEST_COMPILE_CACHE"):
        return os.environ["HM3_TEST_COMPILE_CACHE"]
    if os.environ.get("HM3_TEST_CACHE"):
        return os.environ["HM3_TEST_CACHE"]
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(home, "hm3_jax", "tests")


os.environ["HM3_TEST_COMPILE_CACHE"] = _compile_cache_root()
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ["HM3_TEST_COMPILE_CACHE"], "jax_cache_tests")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_MAX_SIZE", str(2 << 30)
)  # > 0: locked for concurrent writers, LRU
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


# The files handed out first (see the module docstring): the two long ones, then the one that needs the smoke
# run. The rest follow longest first (seconds per file in a cold `make test` on an idle machine, run s6-r2 of
# docs/testing.md), so that the last files handed out are short and both workers finish together; a file not
# listed goes last (add new files here: unlisted long files at the end leave one worker idle).
FIRST_FILES = ("test_hm3_run.py", "test_hm3_distributed.py", "test_hm3_run_resume.py")
FILE_SECONDS = {
    "test_spec_run.py": 77, "test_hf_objectives.py": 45, "test_merging.py": 41, "test_arch_train.py": 40,
    "test_tiny8.py": 38, "test_paths.py": 37, "test_merge_cli.py": 31, "test_export_mergekit.py": 28, "test_benchmarks_smoke.py": 31,
    "test_lm_eval.py": 32, "test_memory_plan.py": 34, "test_tasks_objectives.py": 23, "test_io_parity_gpt2_vit.py": 22, "test_models_decode.py": 21,
    "test_hm3_units.py": 21, "test_models_gpt2_vit.py": 20, "test_distributed.py": 19, "test_spec_checkpoints.py": 18,
    "test_models_llama.py": 18, "test_confirm.py": 18, "test_distributed_loop.py": 16, "test_io_parity.py": 15,
    "test_bad_inputs.py": 15, "test_leftovers.py": 7, "test_models_path.py": 12, "test_baselines.py": 11, "test_arch_env.py": 7,
    "test_io_vocab.py": 5, "test_zoo.py": 5, "test_lm_train.py": 4, "test_bootstrap.py": 3,
    "test_io_config_forms.py": 3, "test_moo.py": 3, "test_models_flops.py": 2, "test_io_files.py": 2,
    "test_report_html.py": 1, "test_param_level_data_aware.py": 60, "test_deep_zoo.py": 20,
    "test_lm_eval_mesh.py": 20, "test_neighbourhood.py": 1, "test_plan_host.py": 10, "test_distill.py": 10,
    "test_continuation.py": 15, "test_regmean_plusplus.py": 5,
    "test_param_level_memory.py": 8, "test_plan_rows.py": 6, "test_plan_statistics.py": 6,
}  # fmt: skip


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: hand out files in our order, not by count
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        name = _os.path.basename(str(item.path))
        if name in FIRST_FILES:
            return (FIRST_FILES.index(name), 0)
        return (len(FIRST_FILES), -FILE_SECONDS.get(name, 0))

    items[:] = sorted(items, key=rank)  # stable: the order inside a file (and among unlisted files) is kept


def _session_dir(tmp_path_factory):
    """A directory of this test session shared by all its xdist workers (fresh for every session).

    pytest-xdist gives each worker the base temp dir `<session base temp>/popen-gwN`, where the session's base
    temp dir (`pytest-of-USER/pytest-N`, or `--basetemp`) is made fresh by the controller for every session; its
    parent is therefore shared by the workers of one session and by no other session. Without xdist the
    session's own base temp dir is that directory.
    """
    base = tmp_path_factory.getbasetemp()
    return base.parent if _os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def smoke_run(smoke_zoo_dir, tmp_path_factory):
    """(config, workdir, report) of the tiny3 smoke HM3 run (`run_hm3` on the smoke zoo), made ONCE per session.

    Both xdist workers use it (tests/test_hm3_run.py and tests/test_hm3_run_resume.py may run in parallel):
    the first to ask makes it under a file lock in the session's shared directory, the other waits and then
    reads the report `run_hm3` returned (pickled, so both see the same object). Made per session, never reused
    from an older suite run (the code may have changed). The run directory is shared: tests that change it work
    on a copy. If the run fails, the other worker fails at once with the same error instead of redoing it.
    """
    import pickle
    import traceback

    from filelock import FileLock

    from experiments.configs import tiny3
    from hm3_jax.pipeline import run as run_lib

    root = _session_dir(tmp_path_factory) / "hm3_smoke_run"
    workdir, done, failed = root / "run", root / "report.pickle", root / "failed.txt"
    config = tiny3.get_config("smoke")
    root.mkdir(exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if failed.exists():
            raise RuntimeError(f"the smoke HM3 run failed in another xdist worker:\n{failed.read_text()}")
        if not done.exists():
            try:
                report = run_lib.run_hm3(config, str(workdir), zoo_dir=smoke_zoo_dir)
            except BaseException:
                failed.write_text(traceback.format_exc())
                raise
            tmp = root / ".report.pickle.tmp"
            tmp.write_bytes(pickle.dumps(report))
            _os.replace(tmp, done)
            return config, str(workdir), report
        report = pickle.loads(done.read_bytes())
    return config, str(workdir), report
