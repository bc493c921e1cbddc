"""The held-out bootstrap (hm3_jax.moo.bootstrap, hm3_jax.search.heldout_bootstrap) against independent values."""

import jax.numpy as jnp
import numpy as np
import pytest

from hm3_jax import models, moo
from hm3_jax.moo import bootstrap
from hm3_jax.tasks import metrics, scoring

HYPS = ["the cat sat on the mat", "a dog", "hello world", "", "bonjour le monde"]
REFS = ["the cat sat on a mat", "the dog", "hello, world", "nothing", "bonjour tout le monde"]


def test_exact_match_resamples_by_hand():
    idx = np.array([[0, 0, 0, 0], [1, 1, 2, 3], [1, 1, 1, 1]])
    got = bootstrap.resampled_scores(np.array([True, False, True, True]), "exact_match", idx)
    np.testing.assert_allclose(got, [100.0, 50.0, 0.0])
    assert bootstrap.full_score(np.array([1, 0, 1, 1]), "exact_match") == 75.0


@pytest.mark.parametrize("metric", bootstrap.MEAN_METRICS)
def test_mean_metrics_paired_se_matches_the_closed_form(metric):
    """Every 0/1-mean metric: the paired bootstrap SE of a score difference is ~ 100 sd(x_a - x_b) / sqrt(N)
    (the check benchmarks/arch_headroom.py runs on real paths)."""
    rng = np.random.default_rng(0)
    a, b = rng.random(400) < 0.6, rng.random(400) < 0.4
    idx = bootstrap.resample_indices(1, [400], 4000)[0]
    boot = np.std(
        bootstrap.resampled_scores(a, metric, idx) - bootstrap.resampled_scores(b, metric, idx), ddof=1
    )
    d = a.astype(np.float64) - b.astype(np.float64)
    assert boot == pytest.approx(100 * d.std(ddof=1) / np.sqrt(len(d)), rel=0.05)
    assert bootstrap.full_score(a, metric) == pytest.approx(100 * a.mean())


def test_chrf_statistics_reproduce_sacrebleu_corpus_chrf_on_every_resample():
    stats = bootstrap.chrf_sentence_stats(HYPS, REFS)
    assert bootstrap.full_score(stats, "chrf") == pytest.approx(metrics.chrf(HYPS, REFS), abs=1e-9)
    idx = bootstrap.resample_indices(0, [len(HYPS)], 6)[0]
    got = bootstrap.resampled_scores(stats, "chrf", idx)
    expected = [metrics.chrf([HYPS[i] for i in row], [REFS[i] for i in row]) for row in idx]
    np.testing.assert_allclose(got, expected, atol=1e-9)


def test_resample_indices_are_reproducible_and_in_range():
    a = bootstrap.resample_indices(7, [3, 5], 4)
    b = bootstrap.resample_indices(7, [3, 5], 4)
    assert [x.shape for x in a] == [(4, 3), (4, 5)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert a[0].max() < 3 and a[1].max() < 5 and a[0].min() >= 0
    with pytest.raises(ValueError, match="task 1 has no held-out"):
        bootstrap.resample_indices(0, [3, 0], 2)
    with pytest.raises(ValueError, match="num_samples"):
        bootstrap.resample_indices(0, [3], 0)


def test_hypervolume_samples_and_summary_by_hand():
    ideal = np.array([[50.0, 10.0], [100.0, 20.0]])  # two resamples
    pts = {"hm3": np.array([[[25.0, 5.0]], [[50.0, 10.0]]]), "ta": np.array([[[50.0, 2.0]], [[50.0, 20.0]]])}
    hv = bootstrap.hypervolume_samples(pts, ideal, np.array([0.0, 0.0]))
    np.testing.assert_allclose(hv["hm3"], [0.25, 0.25])  # (0.5 * 0.5) both times
    np.testing.assert_allclose(hv["ta"], [0.2, 0.5])
    assert hv["hm3"][0] == pytest.approx(moo.hypervolume(np.array([[0.5, 0.5]]), np.zeros(2)))
    s = bootstrap.summarise(hv, {"hm3": 0.25, "ta": 0.3}, level=0.5)
    assert s["ta"]["p_hm3_greater"] == 0.5 and "p_hm3_greater" not in s["hm3"]
    assert s["ta"]["interval"] == pytest.approx(
        [np.percentile([0.2, 0.5], 25), np.percentile([0.2, 0.5], 75)]
    )


def test_run_bootstrap_reproduces_the_reported_points_on_the_smoke_zoo(smoke_zoo_dir):
    """Re-running the sources gives the zoo's own held-out scores; a wrong reported point is an error."""
    from hm3_jax.search import heldout_bootstrap
    from hm3_jax.search.problem import make_problem
    from hm3_jax.tasks import zoo as zoo_lib

    zoo = zoo_lib.load(smoke_zoo_dir)
    problem = make_problem(zoo, single_path_chunks=False)
    sources = [heldout_bootstrap.params_spec(problem, p) for p in [problem.base, *problem.experts]]
    # The held-out engine kept the sources' per-example statistics when make_problem scored them: read back
    # without a new evaluation, and equal to an independent re-run (one model's kernels, `path_device_scores`).
    engine = problem.engines["heldout"]
    evaluated = engine.total_cost.num_evaluations
    for p, spec in zip([problem.base, *problem.experts], sources, strict=True):
        stats, _ = heldout_bootstrap.example_stats(problem, spec)
        for st, obj in zip(stats, problem.objectives["heldout"], strict=True):
            raw = scoring.path_device_scores(problem.config, models.shell_of(p), p["blocks"],
                                                jnp.arange(problem.config.num_layers), None, obj)  # fmt: skip
            np.testing.assert_allclose(st, obj.example_fn(np.asarray(raw)), rtol=1e-6, atol=1e-6)
    assert engine.total_cost.num_evaluations == evaluated
    held = problem.source_scores["heldout"]
    specs = {"hm3": lambda: sources[1:], "base": lambda: sources[:1]}
    points = {"hm3": held[1:], "base": held[:1]}
    ref = np.full(problem.num_tasks, -0.1)
    out = heldout_bootstrap.run_bootstrap(problem, specs, points, ref, 30, 0, sources)
    hm3 = out["methods"]["hm3"]
    assert out["num_samples"] == 30 and out["examples_per_task"] == [
        o.num_examples for o in problem.objectives["heldout"]
    ]
    assert hm3["hypervolume"] == pytest.approx(
        moo.hypervolume(moo.normalize_by_ideal(held[1:], problem.ideal["heldout"]), ref)
    )
    assert hm3["interval"][0] <= hm3["interval"][1]
    assert 0.0 <= out["methods"]["base"]["p_hm3_greater"] <= 1.0
    wrong = {"hm3": held[1:] + 5.0, "base": held[:1]}
    with pytest.raises(RuntimeError, match="re-running hm3 point 0"):
        heldout_bootstrap.run_bootstrap(problem, specs, wrong, ref, 5, 0, sources)
