"""baseline_runs.baseline_key: a baseline's PRNG key does not depend on which other baselines a run lists
(issue 19: run_c's list put `tsv` before `adamerging` and moved AdaMerging's key, so its run_b stage stopped
reproducing), and equals the key every stored run with the default lists was made with (the old
`fold_in(k_base, position in the list)`, path methods `fold_in(k_base, 100 + position)`)."""

import jax
import numpy as np
import pytest

from experiments.configs import tiny8
from hm3_jax.pipeline import baseline_runs, run_config

K_BASE = jax.random.split(jax.random.PRNGKey(0), 5)[4]  # run_hm3's k_base at seed 0
# The lists stored runs were made with: hm3_common's default (every tiny3 run) and tiny8's run_b.
DEFAULT_PARAM = ("task_arithmetic", "ties", "dare_ties", "consensus", "pcb")
RUN_B_PARAM = DEFAULT_PARAM + ("regmean", "fisher", "adamerging")
DEFAULT_PATH = ("ea", "moea", "grid_search", "differential_evolution")


def _data(key) -> list[int]:
    return np.asarray(jax.random.key_data(key)).tolist()


def _old_key(methods, m, offset=0):
    """The key as run.py made it before issue 19's fix: the method's position in the run's list."""
    return jax.random.fold_in(K_BASE, offset + list(methods).index(m))


def test_keys_equal_the_stored_runs_keys():
    for methods in (DEFAULT_PARAM, RUN_B_PARAM):
        for m in methods:
            assert _data(baseline_runs.baseline_key(K_BASE, m)) == _data(_old_key(methods, m)), m
    for m in DEFAULT_PATH:
        assert _data(baseline_runs.baseline_key(K_BASE, m)) == _data(_old_key(DEFAULT_PATH, m, 100)), m
    # run_b's AdaMerging stage (runs/tiny8_frozen/run_b) was made with index 7; the key data pinned by hand
    assert _data(jax.random.fold_in(K_BASE, 7)) == _data(baseline_runs.baseline_key(K_BASE, "adamerging"))


def test_keys_do_not_depend_on_the_list():
    """The committed tiny8 list (tsv fifth, as run_c's), a reversed list and one-method lists give every method
    the key it has in run_b's list; different methods get different keys."""
    reference = {
        m: _data(k)
        for m, k in baseline_runs.baseline_keys(K_BASE, RUN_B_PARAM + ("tsv", "regmean_plusplus")).items()
    }
    committed = tuple(tiny8.get_config().baselines.param_methods)
    assert committed.index("tsv") < committed.index(
        "adamerging"
    )  # the list that moved the key before the fix
    for methods in (committed, RUN_B_PARAM[::-1], ("adamerging",), ("tsv", "dare_ties")):
        keys = baseline_runs.baseline_keys(K_BASE, methods)
        assert list(keys) == list(methods)
        assert {m: _data(k) for m, k in keys.items()} == {m: reference[m] for m in methods}, methods
    assert reference["adamerging"] != _data(_old_key(committed, "adamerging"))  # run_c's key, not run_b's
    every = baseline_runs.PARAM_KEY_ORDER + baseline_runs.PATH_KEY_ORDER
    assert len({tuple(_data(baseline_runs.baseline_key(K_BASE, m))) for m in every}) == len(every)


def test_every_known_baseline_has_a_key_and_an_unknown_one_is_named():
    assert sorted(baseline_runs.PARAM_KEY_ORDER) == sorted(run_config.REQUIRED_PARAM)
    assert sorted(baseline_runs.PARAM_KEY_ORDER) == sorted(baseline_runs.PARAM_DEFAULTS)
    assert baseline_runs.PATH_KEY_ORDER == tuple(run_config.REQUIRED_PATH) == DEFAULT_PATH
    assert tuple(tiny8.get_config().baselines.path_methods) == DEFAULT_PATH
    with pytest.raises(ValueError, match="baseline 'dare_linear' has no key index"):
        baseline_runs.baseline_key(K_BASE, "dare_linear")
