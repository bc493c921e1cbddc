"""Confirming a search's best candidates on the whole search split (arch.confirm_top), on the smoke zoo."""

import types

import numpy as np
import pytest


@pytest.fixture(scope="module")
def problem(smoke_zoo_dir):
    from hm3_jax.hm3.problem import make_problem
    from hm3_jax.tasks import zoo as zoo_lib

    return make_problem(zoo_lib.load(smoke_zoo_dir), search_examples=10)


def test_capped_search_split_keeps_the_whole_split_as_search_full(problem):
    assert [o.num_examples for o in problem.objectives["search"]] == [10, 10, 10]
    full = [o.num_examples for o in problem.objectives["search_full"]]
    assert full[0] > 10 and set(problem.engines) == {"search", "heldout", "search_full"}
    assert problem.ideal["search_full"].shape == (3,) and problem.source_scores["search_full"].shape == (4, 3)


def test_path_baseline_confirmation_rescores_its_best_candidates(problem):
    from hm3_jax.hm3 import arch_level, baselines_runner

    shell, pool = arch_level.no_param_level_model(problem)
    ev = baselines_runner.ExpertPathEvaluator(problem, shell, pool, tag="confirm_test")
    paths = np.array([[0, 1, -1], [2, 3, -1], [4, 5, -1], [0, 3, -1]], np.int32)
    sub = ev(paths)
    pref = np.array([0.2, 0.5, 0.3])
    c = ev.confirm(pref, top=2)
    top2 = np.argsort(-(sub @ pref), kind="stable")[:2]
    assert any(np.array_equal(c["path"], paths[j]) for j in top2)
    full = problem.normalise(problem.engines["search_full"].with_model(shell, pool, pool_id="indep").evaluate(
        paths[top2]).scores, "search_full") @ pref  # fmt: skip
    np.testing.assert_allclose(c["full_fitness"], full)
    assert np.array_equal(c["path"], paths[top2[int(np.argmax(full))]])
    n_full = sum(o.num_examples for o in problem.objectives["search_full"])
    assert c["charged_evaluations"] == 2 * -(-n_full // 30) == ev.confirm_units(2)


def test_arch_level_confirmation_includes_the_merged_models_identity_path(problem):
    from hm3_jax import models
    from hm3_jax.hm3 import arch_level
    from hm3_jax.hm3.problem import pool_for

    L, K = problem.config.num_layers, problem.num_tasks
    pool = pool_for(problem, problem.base)  # source K = the base, standing in for Theta(lambda)
    shell = models.shell_of(problem.base)
    pref = np.full((1, K), 1 / K, np.float32)
    scorer = arch_level.PathScorer(problem, "search", pref, [shell], [pool], "confirm_arch")
    full = arch_level.PathScorer(problem, "search_full", pref, [shell], [pool], "confirm_arch")
    theta = arch_level.identity_paths(K + 1, L, 3)[K]
    others = np.array([[0, 1, -1], [2, 3, -1], [4, 5, 1]], np.int32)
    scorer(np.concatenate([others, theta[None]]), np.repeat(pref, 4, 0))
    acfg = types.SimpleNamespace(beta1=0.05, t_max=3)
    c = arch_level._confirm(problem, full, 0, pref[0], scorer, K + 1, L, acfg, top=1)
    assert any(np.array_equal(p, theta) for p in np.asarray(c["paths"]))
    assert len(c["paths"]) in (1, 2) and c["chosen"] == int(np.argmax(c["full_rewards"]))
    ps = np.asarray(c["paths"], np.int32)
    expected = arch_level.reward(problem.normalise(np.asarray(c["full_search"]), "search_full"), pref[0],
                                 (ps >= 0).sum(-1), 0.05, 3)  # fmt: skip
    np.testing.assert_allclose(c["full_rewards"], expected, atol=1e-9)
