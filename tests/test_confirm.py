"""Confirming a search's best candidates on the whole search split (arch.confirm_top), on the smoke zoo."""

import types

import numpy as np
import pytest


@pytest.fixture(scope="module")
def problem(smoke_zoo_dir):
    from hm3_jax.search.problem import make_problem
    from hm3_jax.tasks import zoo as zoo_lib

    return make_problem(zoo_lib.load(smoke_zoo_dir), search_examples=10, single_path_chunks=False)


def test_capped_search_split_keeps_the_whole_split_as_search_full(problem):
    assert [o.num_examples for o in problem.objectives["search"]] == [10, 10, 10]
    full = [o.num_examples for o in problem.objectives["search_full"]]
    assert full[0] > 10 and set(problem.engines) == {"search", "heldout", "search_full"}
    assert problem.ideal["search_full"].shape == (3,) and problem.source_scores["search_full"].shape == (4, 3)


def test_path_baseline_confirmation_rescores_its_best_candidates(problem):
    from hm3_jax.pipeline import baseline_runs
    from hm3_jax.search import arch_level

    shell, pool = arch_level.no_param_level_model(problem)
    ev = baseline_runs.ExpertPathEvaluator(problem, shell, pool, tag="confirm_test")
    paths = np.array([[0, 1, -1], [2, 3, -1], [4, 5, -1], [0, 3, -1]], np.int32)
    sub = ev(paths)
    pref = np.array([0.2, 0.5, 0.3])
    c = ev.confirm(pref, top=2)
    top2 = np.argsort(-(sub @ pref), kind="stable")[:2]
    assert any(np.array_equal(c["path"], paths[j]) for j in top2)
    full = (
        problem.normalise(
            problem.engines["search_full"]
            .with_model(shell, pool, pool_id="indep")
            .evaluate(paths[top2])
            .scores,
            "search_full",
        )
        @ pref
    )
    np.testing.assert_allclose(c["full_fitness"], full)
    assert np.array_equal(c["path"], paths[top2[int(np.argmax(full))]])
    n_full = sum(o.num_examples for o in problem.objectives["search_full"])
    assert c["charged_evaluations"] == 2 * -(-n_full // 30) == ev.confirm_units(2)


def test_arch_level_confirmation_includes_the_merged_models_identity_path(problem):
    from hm3_jax import models
    from hm3_jax.arch import env
    from hm3_jax.search import path_confirmation, path_scorer
    from hm3_jax.search.problem import pool_for

    L, K = problem.config.num_layers, problem.num_tasks
    pool = pool_for(problem, problem.base)  # source K = the base, standing in for Theta(lambda)
    shell = models.shell_of(problem.base)
    pref = np.full((1, K), 1 / K, np.float32)
    scorer = path_scorer.PathScorer(problem, "search", pref, [shell], [pool], "confirm_arch")
    full = path_scorer.PathScorer(problem, "search_full", pref, [shell], [pool], "confirm_arch")
    theta = path_confirmation.identity_paths(K + 1, L, 3)[K]
    others = np.array([[0, 1, -1], [2, 3, -1], [4, 5, 1]], np.int32)
    scorer(np.concatenate([others, theta[None]]), np.repeat(pref, 4, 0))
    acfg = types.SimpleNamespace(beta1=0.05, t_max=3)
    c = path_confirmation.confirm_candidates(problem, full, 0, pref[0], scorer, K + 1, L, acfg, top=1)
    assert any(np.array_equal(p, theta) for p in np.asarray(c["paths"]))
    assert len(c["paths"]) in (1, 2) and c["chosen"] == int(np.argmax(c["full_rewards"]))
    ps = np.asarray(c["paths"], np.int32)
    expected = env.host_reward(
        problem.normalise(np.asarray(c["full_search"]), "search_full"), pref[0], (ps >= 0).sum(-1), 0.05, 3
    )
    np.testing.assert_allclose(c["full_rewards"], expected, atol=1e-9)


def _base_scorers(problem, tag):
    """(pref [1, 3], capped-split scorer, whole-split scorer) of the base model's pool and shell."""
    from hm3_jax import models
    from hm3_jax.search import path_scorer
    from hm3_jax.search.problem import pool_for

    pool, shell = pool_for(problem, problem.base), models.shell_of(problem.base)
    pref = np.array([[0.6, 0.3, 0.1]], np.float32)
    return (
        pref,
        path_scorer.PathScorer(problem, "search", pref, [shell], [pool], tag),
        path_scorer.PathScorer(problem, "search_full", pref, [shell], [pool], tag),
    )


def test_arch_level_confirmation_can_shortlist_every_sources_own_model(problem):
    """`sources=True`: every source's identity path (the experts' and Theta's) is scored on the capped split if
    the search never scored it, joins the top-M shortlist, and is re-scored on the whole split; the answer is the
    best there, as without it."""
    from hm3_jax.search import path_confirmation

    L, K = problem.config.num_layers, problem.num_tasks
    pref, scorer, full = _base_scorers(problem, "confirm_sources")
    assert L == 2  # the smoke zoo; none of these is a source's own path
    others = np.array([[0, 3, -1], [2, 1, -1], [4, 5, 1]], np.int32)
    scorer(others, np.repeat(pref, 3, 0))
    before = scorer.evaluations
    acfg = types.SimpleNamespace(beta1=0.05, t_max=3)
    c = path_confirmation.confirm_candidates(
        problem, full, 0, pref[0], scorer, K + 1, L, acfg, top=1, sources=True
    )
    own = path_confirmation.identity_paths(K + 1, L, 3)
    listed = np.asarray(c["paths"], np.int32)
    assert all(any(np.array_equal(p, q) for q in listed) for p in own)  # every source's own model
    assert len(listed) in (K + 1, K + 2) and scorer.evaluations - before == K + 1  # scored once each
    assert c["chosen"] == int(np.argmax(c["full_rewards"]))
    assert c["charged_evaluations"] == len(listed) * -(
        -sum(o.num_examples for o in problem.objectives["search_full"]) // 30
    )


def test_paired_difference_samples_against_hand_values():
    from hm3_jax.moo import bootstrap

    a = [np.array([1, 0, 1, 1]), np.array([0, 0, 1])]
    b = [np.array([0, 0, 1, 0]), np.array([1, 0, 1])]
    idx = [np.array([[0, 1, 2, 3], [0, 0, 0, 0], [1, 1, 2, 2]]), np.array([[0, 1, 2], [0, 0, 1], [2, 2, 2]])]
    got = bootstrap.paired_difference_samples(a, b, ["exact_match"] * 2, [0.5, 0.25], idx)
    # resample 0: task 0 75 - 25 = 50, task 1 33.3 - 66.7 = -33.3; resample 1: 100 - 0, 0 - 66.7;
    # resample 2: 50 - 50, 100 - 100
    np.testing.assert_allclose(got, [0.5 * 50 - 0.25 * 100 / 3, 0.5 * 100 - 0.25 * 200 / 3, 0.0])


def test_significant_gain_is_paired_and_checks_the_engine_scores(problem):
    from hm3_jax.search import heldout_bootstrap, path_confirmation

    L, K = problem.config.num_layers, problem.num_tasks
    acfg = types.SimpleNamespace(beta1=0.0, t_max=L)
    base = heldout_bootstrap.params_spec(problem, problem.base)
    full = problem.normalise(problem.source_scores["search_full"], "search_full")
    # a model against itself: the paired difference is 0 on every resample
    assert (
        path_confirmation.significant_gain(problem, "search_full", base, base, np.ones(K) / K, acfg, 50, 0)
        == 0.0
    )
    # each expert against the base, for a preference on its own task (scores checked against the engine's)
    for k in range(K):
        expert = heldout_bootstrap.params_spec(problem, problem.experts[k])
        p = path_confirmation.significant_gain(
            problem, "search_full", expert, base, np.eye(K)[k], acfg, 200, 1, expected=(full[1 + k], full[0])
        )
        if full[1 + k, k] > full[0, k] + 0.2:  # clearly better on the whole split: (almost) every resample
            assert p > 0.95
        if full[1 + k, k] == full[0, k]:
            assert p == 0.0
    with pytest.raises(RuntimeError, match="engine gave"):
        path_confirmation.significant_gain(
            problem, "search_full", base, base, np.ones(K) / K, acfg, 10, 0, expected=(full[0] + 0.5, full[0])
        )


def test_confirmation_keeps_theta_unless_the_gain_is_significant(problem):
    from hm3_jax import models
    from hm3_jax.search import path_confirmation, path_scorer
    from hm3_jax.search.problem import pool_for

    L, K = problem.config.num_layers, problem.num_tasks
    full = problem.normalise(problem.source_scores["search_full"], "search_full")
    k = int(np.argmax(full[1:].diagonal() - full[0]))  # the expert that gains most over the base on its task
    # Theta := the base's blocks with expert k's shell, so source k's identity path is expert k itself
    pool, shell = pool_for(problem, problem.base), models.shell_of(problem.experts[k])
    pref = np.eye(K, dtype=np.float32)[k][None]
    scorer = path_scorer.PathScorer(problem, "search", pref, [shell], [pool], "confirm_sig")
    fscorer = path_scorer.PathScorer(problem, "search_full", pref, [shell], [pool], "confirm_sig")
    ids = path_confirmation.identity_paths(K + 1, L, L)
    scorer(ids[[k, K]], np.repeat(pref, 2, 0))
    acfg = types.SimpleNamespace(beta1=0.0, t_max=L)
    spec_fn = lambda p: (shell, pool, np.asarray(p, np.int32), None)  # noqa: E731
    plain = path_confirmation.confirm_candidates(problem, fscorer, 0, pref[0], scorer, K + 1, L, acfg, top=1)
    assert np.array_equal(plain["paths"][plain["chosen"]], ids[k])  # the expert wins on the whole split
    strict = path_confirmation.confirm_candidates(
        problem,
        fscorer,
        0,
        pref[0],
        scorer,
        K + 1,
        L,
        acfg,
        top=1,
        significance=1.01,
        spec_fn=spec_fn,
        num_samples=50,
    )
    assert np.array_equal(strict["paths"][strict["chosen"]], ids[K])  # an unreachable level: Theta stands
    assert (
        strict["significance"]["accepted"] is False
        and strict["significance"]["best_on_full"] == plain["chosen"]
    )
    usual = path_confirmation.confirm_candidates(
        problem,
        fscorer,
        0,
        pref[0],
        scorer,
        K + 1,
        L,
        acfg,
        top=1,
        significance=0.95,
        spec_fn=spec_fn,
        num_samples=200,
    )
    assert usual["significance"]["p_gain_over_theta"] > 0.95 and usual["chosen"] == plain["chosen"]


def test_preference_models_rebuild_bit_for_bit_and_hold_at_most_resident(problem):
    """`PreferenceModels(resident=1)` (issue 16: memory flat in the preferences) holds one preference's shell,
    pool and engines at a time, rebuilds a dropped one bit for bit from its recipe, and scores like plain lists
    of eagerly built models (an independent scorer under another cache namespace)."""
    import jax

    from hm3_jax import models
    from hm3_jax.pipeline.preference_models import PreferenceModels
    from hm3_jax.search import param_level, path_confirmation, path_scorer
    from hm3_jax.search.problem import pool_for

    K = problem.num_tasks
    prefs = np.array([[1 / 3, 1 / 3, 1 / 3], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]], np.float32)
    entries = [
        {
            "preference": p.tolist(),
            "merge_key": np.asarray(jax.random.PRNGKey(i)).tolist(),
            "paper": {"hparams": {"density": 0.7, "drop_rate": 0.3}},
        }
        for i, p in enumerate(prefs)
    ]
    eager = [param_level.merged_for(problem, e, "paper") for e in entries]
    shells, pools = [models.shell_of(m) for m in eager], [pool_for(problem, m) for m in eager]
    bank = PreferenceModels(problem, entries, "paper", resident=1)
    for i in (0, 1, 2, 0):
        for a, b in zip(
            jax.tree.leaves((bank.shells[i], bank.pools[i])),
            jax.tree.leaves((shells[i], pools[i])),
            strict=True,
        ):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert list(bank._held) == [i]
    assert bank.builds == 4  # 0, 1, 2, then 0 again after it was dropped
    L = problem.config.num_layers
    paths = np.array(
        [[0, K * L + 1, (K + 1) * L - 1], [K * L, 2, -1], [1, K * L + 1, 0]], np.int32
    )  # P = (K + 1) L
    paths = np.concatenate([paths, path_confirmation.identity_paths(K + 1, L, 3)])
    rows = np.repeat(prefs, len(paths), 0)
    lazy = path_scorer.PathScorer(problem, "search", prefs, bank.shells, bank.pools, "bank_lazy")
    plain = path_scorer.PathScorer(problem, "search", prefs, shells, pools, "bank_plain")
    np.testing.assert_array_equal(lazy(np.tile(paths, (3, 1)), rows), plain(np.tile(paths, (3, 1)), rows))
    assert len(bank._held) == 1 and sum(len(h["engines"]) for h in bank._held.values()) == 1
    with pytest.raises(ValueError, match="resident_preferences"):
        PreferenceModels(problem, entries, "paper", resident=-1)


def test_archive_restores_scores_and_cost_after_a_resume(problem, tmp_path):
    """A scorer that loads another's archive (a resumed run: its engine's cache is empty) answers the archived
    paths (padding anywhere) without the engine and continues the cost accounting: same scores, same FLOPs."""
    from hm3_jax.search import arch_level, path_scorer

    shell, pool = arch_level.no_param_level_model(problem)
    pref = np.full((1, problem.num_tasks), 1 / problem.num_tasks, np.float32)
    first = np.array([[0, 1, -1], [2, 3, -1]], np.int32)
    second = np.array([[0, -1, 1], [4, 5, -1], [2, 3, -1], [0, 5, -1]], np.int32)  # [0, -1, 1] is [0, 1, -1]
    before = path_scorer.PathScorer(problem, "search", pref, [shell], [pool], "archive_before")
    before(first, np.repeat(pref, 2, 0))
    before.save_archive(str(tmp_path / "archive.npz"), wall_seconds=5.0)
    resumed = path_scorer.PathScorer(problem, "search", pref, [shell], [pool], "archive_resumed")
    assert resumed.load_archive(str(tmp_path / "archive.npz")) == 5.0
    assert resumed.flops == before.flops > 0 and resumed.seconds == before.seconds
    want = before(second, np.repeat(pref, 4, 0))
    np.testing.assert_array_equal(resumed(second, np.repeat(pref, 4, 0)), want)
    assert resumed.flops == before.flops and resumed.evaluations == 2  # [4, 5] and [0, 5] only
    assert list(resumed.archive) == list(before.archive)


def test_shared_model_answers_a_path_once_for_every_preference(problem, tmp_path):
    """The no-parameter-level ablation's scorer (`shared_pool_id`: one model under every preference): a path
    scored under one preference answers the others without the engine, is archived (charged) under each, and
    gives the scores of per-preference scorers; a resumed scorer answers from the archive without the engine."""
    from hm3_jax.search import arch_level, path_scorer

    shell, pool = arch_level.no_param_level_model(problem)
    prefs = np.array([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1], [1 / 3, 1 / 3, 1 / 3]], np.float32)
    a = np.array([[0, 1, -1], [2, 3, -1]], np.int32)
    b = np.array([[0, -1, 1], [4, 5, -1]], np.int32)  # [0, -1, 1] is [0, 1, -1]
    shared = path_scorer.PathScorer(
        problem, "search", prefs, [shell] * 3, [pool] * 3, "shared_a", shared_pool_id="shared_model_a"
    )
    own = path_scorer.PathScorer(problem, "search", prefs, [shell] * 3, [pool] * 3, "own_a")
    for paths, idx in ((a, [0, 0]), (b, [1, 1]), (np.concatenate([a, b]), [2, 2, 2, 2])):
        rows = prefs[idx]
        np.testing.assert_array_equal(shared(paths, rows, idx), own(paths, rows, idx))
    assert shared.evaluations == 3 and own.evaluations == 2 + 2 + 3  # distinct paths vs (preference, path)
    assert set(shared.archive) == set(own.archive) and len(shared.archive) == 8  # charged per preference
    assert shared.pool_id(2) == "shared_model_a" and shared.engine(2) is shared.engine(0)
    shared.save_archive(str(tmp_path / "shared.npz"))
    resumed = path_scorer.PathScorer(
        problem, "search", prefs, [shell] * 3, [pool] * 3, "shared_b", shared_pool_id="shared_model_b"
    )
    resumed.load_archive(str(tmp_path / "shared.npz"))
    np.testing.assert_array_equal(resumed(b, prefs[[0, 0]], [0, 0]), own(b, prefs[[0, 0]], [0, 0]))
    assert resumed.evaluations == 0 and resumed.flops == shared.flops
    with pytest.raises(ValueError, match="aligners"):
        path_scorer.PathScorer(problem, "search", prefs, [shell] * 3, [pool] * 3, "x", [None] * 3, "y")


def test_tsv_parameter_baseline_tunes_its_scale_on_the_search_split(problem):
    """TSV-M as a parameter baseline (`--config.baselines.param_methods=...,tsv`): per preference the grid's
    best scale on the search split, its held-out point the held-out score of that merge."""
    import jax

    from hm3_jax.pipeline import baseline_runs
    from hm3_jax.search.problem import score_params

    prefs = np.array([[1 / 3, 1 / 3, 1 / 3], [0.6, 0.3, 0.1]], np.float32)
    key = jax.random.PRNGKey(0)
    out = baseline_runs.run_param_baseline(problem, "tsv", prefs, key)
    grid = baseline_runs.PARAM_GRIDS["tsv"]
    assert out["evaluations"] == len(prefs) * len(grid) and all(hp in grid for hp in out["hparams"])
    for i, (pref, hp) in enumerate(zip(prefs, out["hparams"], strict=True)):
        fits = [
            float(
                problem.normalise(
                    score_params(
                        problem.engines["search"],
                        problem.experts,
                        baseline_runs.param_merge(problem, "tsv", pref, jax.random.fold_in(key, i), g),
                    ),
                    "search",
                )
                @ pref
            )
            for g in grid
        ]
        assert hp == grid[int(np.argmax(fits))]
        merged = baseline_runs.param_merge(problem, "tsv", pref, jax.random.fold_in(key, i), hp)
        np.testing.assert_allclose(
            out["points"][i], score_params(problem.engines["heldout"], problem.experts, merged)
        )


def test_extra_paths_join_the_shortlist_whatever_their_capped_reward(problem):
    """`extra` (the refinement's answer): re-scored on the whole split even when the top-M by capped-split reward
    leaves it out; the shortlist is otherwise the one without it, in the same order."""
    from hm3_jax.search import path_confirmation

    L, K = problem.config.num_layers, problem.num_tasks
    pref, scorer, full = _base_scorers(problem, "confirm_extra")
    others = np.array([[0, 3, -1], [2, 1, -1], [4, 5, 1], [2, 5, -1]], np.int32)  # no source's own path
    scores = scorer(others, np.repeat(pref, 4, 0))
    acfg = types.SimpleNamespace(beta1=0.05, t_max=3)
    rewards = [
        float(np.dot(pref[0], s) - 0.05 * (p >= 0).sum() / 3) for s, p in zip(scores, others, strict=True)
    ]
    worst = others[int(np.argmin(rewards))]
    plain = path_confirmation.confirm_candidates(problem, full, 0, pref[0], scorer, K + 1, L, acfg, top=1)
    with_extra = path_confirmation.confirm_candidates(
        problem, full, 0, pref[0], scorer, K + 1, L, acfg, top=1, extra=worst[None]
    )
    assert not any(np.array_equal(worst, p) for p in np.asarray(plain["paths"]))
    listed = {tuple(p): r for p, r in zip(with_extra["paths"], with_extra["full_rewards"], strict=True)}
    assert listed == {
        **{tuple(p): r for p, r in zip(plain["paths"], plain["full_rewards"], strict=True)},
        tuple(worst.tolist()): listed[tuple(worst.tolist())],
    }  # the plain shortlist, the same whole-split rewards, and the extra path
    assert len(with_extra["paths"]) == len(plain["paths"]) + 1
    top_is_extra = path_confirmation.confirm_candidates(
        problem,
        full,
        0,
        pref[0],
        scorer,
        K + 1,
        L,
        acfg,
        top=1,
        extra=np.asarray(plain["paths"][:1], np.int32),
    )
    assert top_is_extra["paths"] == plain["paths"]  # already listed: not twice
