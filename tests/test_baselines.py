"""Path-space baselines on a synthetic evaluate_fn with a planted optimum (one hidden target path per task)."""

import jax
import numpy as np
import pytest

from hm3_jax import baselines as B
from hm3_jax.moo import pareto_mask

GEOMETRY = B.PathGeometry(num_sources=2, num_layers=3, t_max=4)
# task 0 is solved by source 0's own layers, task 1 by source 1's (pool index m * L + l)
TARGETS = np.array([[0, 1, 2, -1], [3, 4, 5, -1]], np.int32)


class SyntheticTasks:
    """score_k = fraction of the T_max positions equal to target_k, minus 0.01 * mean |log scale|."""

    def __init__(self):
        self.calls = 0
        self.rows = 0

    def __call__(self, paths, scales):
        assert paths.dtype == np.int32 and paths.shape[1] == GEOMETRY.t_max
        self.calls += 1
        self.rows += len(paths)
        scores = (paths[:, None, :] == TARGETS[None]).mean(-1)
        if scales is not None:
            assert scales.shape == paths.shape
            scores = scores - 0.01 * np.abs(np.log(scales)).mean(-1, keepdims=True)
        return scores


PREF = np.array([0.7, 0.3])

# A larger pool for the searches, so that a random first generation is far from the planted optimum.
SEARCH_GEOMETRY = B.PathGeometry(num_sources=3, num_layers=4, t_max=5)
SEARCH_TARGETS = np.array([[0, 1, 2, 3, -1], [4, 5, 6, 7, -1], [8, 9, 10, 11, -1]], np.int32)
SEARCH_PREF = np.array([0.6, 0.3, 0.1])


class SearchTasks(SyntheticTasks):
    def __call__(self, paths, scales):
        assert paths.dtype == np.int32 and paths.shape[1] == SEARCH_GEOMETRY.t_max
        self.calls += 1
        self.rows += len(paths)
        scores = (paths[:, None, :] == SEARCH_TARGETS[None]).mean(-1)
        if scales is not None:
            scores = scores - 0.01 * np.abs(np.log(scales)).mean(-1, keepdims=True)
        return scores


# ---------------------------------------------------------------- representation and budget


def test_decode_hand_computed():
    rep = B.make_representation(B.PathGeometry(2, 2, 3), repeats=2, use_scales=True, max_log_scale=1.0)
    assert rep.num_slots == 8 and rep.num_genes == 16
    np.testing.assert_array_equal(rep.slot_pool_index(), [0, 1, 2, 3, 0, 1, 2, 3])
    include = [1, -1, 1, -1, -1, 1, 1, 1]  # kept slots 0, 2, 5, 6, 7 -> first 3: pool 0, 2, 1
    scale = [0.5, 0, 5.0, 0, 0, -0.2, 0, 0]
    empty = [-3, -1, -2, -4, -5, -6, -7, -8]  # nothing kept -> the largest gene (slot 1) alone
    short = [-1, -1, -1, 2, -1, -1, -1, -1]  # one kept step, padded
    paths, scales = B.decode(rep, np.array([include + scale, empty + [0] * 8, short + [0] * 8]))
    np.testing.assert_array_equal(paths, [[0, 2, 1], [1, -1, -1], [3, -1, -1]])
    np.testing.assert_allclose(scales[0], [np.exp(0.5), np.e, np.exp(-0.2)], rtol=1e-6)  # 5.0 clipped to 1
    np.testing.assert_allclose(scales[1:], 1.0)
    rep_plain = B.make_representation(B.PathGeometry(2, 2, 3), repeats=2, use_scales=False)
    paths2, none = B.decode(rep_plain, np.array([include]))
    assert none is None
    np.testing.assert_array_equal(paths2, [[0, 2, 1]])
    with pytest.raises(ValueError, match="genomes"):
        B.decode(rep, np.zeros((1, 5)))


def test_initial_mean_keeps_about_t_max_slots():
    rep = B.make_representation(B.PathGeometry(3, 4, 6), repeats=2)
    genomes = rep.initial_mean(1.0) + np.random.default_rng(0).normal(size=(4000, rep.num_genes))
    kept = (genomes[:, : rep.num_slots] > 0).sum(1)
    assert abs(kept.mean() - 6) < 0.2


def test_budgeted_evaluator_cache_and_exact_budget():
    tasks = SyntheticTasks()
    ev = B.BudgetedEvaluator(tasks, GEOMETRY, budget=3, progress=False)
    p = np.array([[0, 1, 2, -1], [0, 1, 2, -1], [3, 4, 5, -1]], np.int32)
    out = ev(p, None)
    assert out.shape == (3, 2) and ev.evaluations == 2 and tasks.rows == 2  # duplicate row is free
    np.testing.assert_allclose(out[0], [1.0, 0.25])
    more = np.array([[1, 1, 1, 1], [0, 1, 2, -1], [2, 2, 2, 2]], np.int32)
    out = ev(more, None)  # one new evaluation fits, then the cached one, then the budget is exhausted
    assert out.shape == (2, 2) and ev.evaluations == 3 and tasks.rows == 3
    assert ev.remaining == 0 and len(ev.archive()["paths"]) == 3


def test_budgeted_evaluator_rejects_bad_scores():
    ev = B.BudgetedEvaluator(lambda p, s: np.zeros((len(p) + 1, 2)), GEOMETRY, 5, progress=False)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        ev(TARGETS, None)
    ev = B.BudgetedEvaluator(lambda p, s: np.full((len(p), 2), np.nan), GEOMETRY, 5, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        ev(TARGETS, None)
    with pytest.raises(ValueError, match="pool indices"):
        ev(np.array([[0, 1, 6, -1]]), None)  # pool size is 2 * 3 = 6
    with pytest.raises(ValueError, match="t_max=4"):
        ev(np.zeros((1, 3), np.int32), None)
    with pytest.raises(ValueError, match="junction scales"):
        ev(TARGETS, np.ones((2, 3)))


# ---------------------------------------------------------------- single-preference searches


@pytest.mark.parametrize("run", [B.run_ea, B.run_de], ids=["ea", "de"])
def test_single_objective_search_budget_improvement_determinism(run):
    budget = 95  # not a multiple of the population size: the last generation is cut
    results = []
    for seed in (0, 1, 0):
        tasks = SearchTasks()
        result = run(
            jax.random.key(seed),
            tasks,
            SEARCH_GEOMETRY,
            SEARCH_PREF,
            budget,
            population_size=10,
            progress=False,
        )
        assert result["evaluations"] == budget == tasks.rows
        assert result["best_fitness"] > result["history"][0]["generation_best_fitness"]
        # the reported scores are those of the reported path, and the fitness is their weighted sum
        expected = tasks(result["best_path"][None], result["best_junction_scales"][None])[0]
        np.testing.assert_allclose(result["best_scores"], expected)
        assert result["best_fitness"] == pytest.approx(float(expected @ SEARCH_PREF))
        results.append(result)
    first, other, again = results
    np.testing.assert_array_equal(again["best_path"], first["best_path"])
    np.testing.assert_array_equal(again["archive"]["paths"], first["archive"]["paths"])
    assert [h["best_fitness"] for h in again["history"]] == [h["best_fitness"] for h in first["history"]]
    assert not np.array_equal(other["archive"]["paths"], first["archive"]["paths"])


def test_converged_search_stops_when_cached_and_tchebycheff_fitness():
    # without junction scales the tiny pool has few distinct paths: CMA-ES converges onto cached ones
    tasks = SyntheticTasks()
    result = B.run_ea(
        jax.random.key(1),
        tasks,
        GEOMETRY,
        PREF,
        500,
        population_size=8,
        use_scales=False,
        max_stale_generations=5,
        progress=False,
    )
    assert result["evaluations"] == tasks.rows < 500
    assert result["generations"] < 200
    assert result["best_junction_scales"] is None
    # same genome shape (shares the compiled CMA-ES): the Tchebycheff fitness is -max_k pref_k |f_k - 1|
    result = B.run_ea(
        jax.random.key(2),
        SyntheticTasks(),
        GEOMETRY,
        PREF,
        24,
        population_size=8,
        scalarization="tchebycheff",
        use_scales=False,
        progress=False,
    )
    s = result["best_scores"]
    assert result["best_fitness"] == pytest.approx(-max(0.7 * abs(s[0] - 1), 0.3 * abs(s[1] - 1)))


def test_search_bad_input():
    with pytest.raises(ValueError, match="K=2"):
        B.run_de(  # fails at the first evaluation, before evosax compiles anything
            jax.random.key(0),
            SyntheticTasks(),
            GEOMETRY,
            [0.2, 0.3, 0.5],
            8,
            population_size=4,
            progress=False,
        )
    with pytest.raises(ValueError, match="scalarization"):
        B.run_ea(jax.random.key(0), SyntheticTasks(), GEOMETRY, PREF, 8, scalarization="max", progress=False)
    with pytest.raises(ValueError, match="budget"):
        B.run_ea(jax.random.key(0), SyntheticTasks(), GEOMETRY, PREF, 0, progress=False)
    with pytest.raises(ValueError, match="geometry"):
        B.run_de(jax.random.key(0), SyntheticTasks(), (2, 0, 4), PREF, 8, progress=False)
    with pytest.raises(ValueError, match="sum to 1"):
        B.run_de(jax.random.key(0), SyntheticTasks(), GEOMETRY, [0.5, 0.6], 8, progress=False)


# ---------------------------------------------------------------- multi-objective and grid


def test_moea_budget_front_improvement_determinism():
    tasks = SearchTasks()
    result = B.run_moea(jax.random.key(0), tasks, SEARCH_GEOMETRY, 95, population_size=10, progress=False)
    assert result["evaluations"] == 95 == tasks.rows
    hv = [h["hypervolume"] for h in result["history"]]
    assert hv[-1] > hv[0] and all(b >= a for a, b in zip(hv, hv[1:], strict=False))
    front = result["front"]["scores"]
    assert pareto_mask(front).all()
    np.testing.assert_allclose(tasks(result["front"]["paths"], result["front"]["junction_scales"]), front)
    assert result["population"]["scores"].shape == (10, 3)
    again = B.run_moea(
        jax.random.key(0), SearchTasks(), SEARCH_GEOMETRY, 95, population_size=10, progress=False
    )
    np.testing.assert_array_equal(again["front"]["paths"], result["front"]["paths"])


def test_grid_search_exhaustive_finds_planted_optimum():
    tasks = SyntheticTasks()
    prefs = np.array([[1.0, 0.0], [0.0, 1.0]])
    result = B.run_grid_search(
        jax.random.key(0), tasks, GEOMETRY, 100, preferences=prefs, batch_size=3, progress=False
    )
    assert result["exhaustive"] and result["family_size"] == 8 and result["evaluations"] == 8 == tasks.rows
    assert len(np.unique(result["archive"]["paths"], axis=0)) == 8
    np.testing.assert_array_equal(result["best_per_preference"][0]["path"], TARGETS[0])
    np.testing.assert_array_equal(result["best_per_preference"][1]["path"], TARGETS[1])
    assert result["best_per_preference"][0]["fitness"] == 1.0
    assert result["archive"]["junction_scales"] is None


def test_grid_search_subsample_is_distinct_deterministic_and_in_family():
    geometry = B.PathGeometry(3, 4, 5)
    result = B.run_grid_search(
        jax.random.key(3), lambda p, s: np.zeros((len(p), 2)), geometry, 30, progress=False
    )
    paths = result["archive"]["paths"]
    assert not result["exhaustive"] and result["evaluations"] == 30
    assert len(np.unique(paths, axis=0)) == 30
    np.testing.assert_array_equal(paths[:, 4], -1)
    np.testing.assert_array_equal(paths[:, :4] % 4, np.tile(np.arange(4), (30, 1)))  # layer l at step l
    again = B.run_grid_search(
        jax.random.key(3), lambda p, s: np.zeros((len(p), 2)), geometry, 30, progress=False
    )
    np.testing.assert_array_equal(again["archive"]["paths"], paths)
    # huge family (3 ** 40 members): sampled digit-wise, still distinct members
    big = B.PathGeometry(3, 40, 40)
    huge = B.run_grid_search(jax.random.key(0), lambda p, s: np.zeros((len(p), 1)), big, 5, progress=False)
    assert len(np.unique(huge["archive"]["paths"], axis=0)) == 5
    np.testing.assert_array_equal(B.family_paths(GEOMETRY, [0, 7]), [[0, 1, 2, -1], [3, 4, 5, -1]])
    with pytest.raises(ValueError, match="t_max"):
        B.run_grid_search(jax.random.key(0), SyntheticTasks(), B.PathGeometry(2, 5, 3), 4, progress=False)
