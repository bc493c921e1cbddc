"""Tests of hm3_jax.moo against hand-computed values, brute force, and moocore (hm3_jax.moo.hypervolume) against
our own exact hypervolume (hypervolume_reference)."""

import itertools
import math

import jax
import numpy as np
import pytest

from hm3_jax import moo
from hm3_jax.moo import plots
from hm3_jax.moo.hypervolume import hypervolume_reference

# ---------------------------------------------------------------- preferences


def test_dirichlet_on_simplex_reproducible_and_uniform():
    # one shape only: jax's Dirichlet sampler is slow to compile
    key = jax.random.key(0)
    a = np.asarray(moo.dirichlet(key, 20000, 3))
    b = np.asarray(moo.dirichlet(key, 20000, 3))
    assert a.shape == (20000, 3)
    np.testing.assert_array_equal(a, b)
    assert np.all(a >= 0)
    np.testing.assert_allclose(a.sum(1), 1.0, atol=1e-5)
    c = np.asarray(moo.dirichlet(jax.random.key(1), 20000, 3))
    assert not np.allclose(a[:15], c[:15])
    moo.validate_preference(a[:15], k=3)
    np.testing.assert_allclose(a.mean(0), 1 / 3, atol=0.01)  # Dirichlet(1, 1, 1) has mean 1/3 per coordinate


def test_das_dennis_hand_values():
    w = moo.das_dennis(2, 2)
    np.testing.assert_allclose(w, [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    w3 = moo.das_dennis(3, 4)
    assert w3.shape == (15, 3)  # C(6, 2)
    np.testing.assert_allclose(w3.sum(1), 1.0)
    # every lattice point appears exactly once
    expected = {c for c in itertools.product(range(5), repeat=3) if sum(c) == 4}
    assert {tuple(np.rint(r * 4).astype(int)) for r in w3} == expected
    assert moo.das_dennis(5, 3).shape == (math.comb(7, 4), 5)


def test_validate_preference_errors():
    with pytest.raises(ValueError, match="negative"):
        moo.validate_preference([0.5, -0.1, 0.6])
    with pytest.raises(ValueError, match="sum to 1"):
        moo.validate_preference([0.5, 0.6])
    np.testing.assert_allclose(moo.validate_preference([1.0, 3.0], normalize=True), [0.25, 0.75])
    with pytest.raises(ValueError, match="k=3"):
        moo.validate_preference([0.5, 0.5], k=3)
    with pytest.raises(ValueError, match="NaN"):
        moo.validate_preference([np.nan, 1.0])
    with pytest.raises(ValueError, match="all zeros"):
        moo.validate_preference([0.0, 0.0], normalize=True)
    with pytest.raises(ValueError):
        moo.das_dennis(0, 3)


# ---------------------------------------------------------------- scalarisations


def test_scalarizations_hand_values_and_batching():
    pts = np.array([[0.2, 0.8], [1.0, 0.0]])
    pref = np.array([0.25, 0.75])
    np.testing.assert_allclose(moo.weighted_sum(pts, pref), [0.05 + 0.6, 0.25], rtol=1e-6)
    ideal = np.array([1.0, 1.0])
    # maximised: -max(0.25*0.8, 0.75*0.2) = -0.2 ; -max(0.25*0, 0.75*1) = -0.75
    np.testing.assert_allclose(moo.tchebycheff(pts, pref, ideal), [-0.2, -0.75], rtol=1e-6)
    # numpy in, numpy float64 out (the path baselines' host fitness); jax in, jax out
    host = moo.tchebycheff(
        np.asarray(pts, np.float64), np.asarray(pref, np.float64), np.asarray(ideal, np.float64)
    )
    assert isinstance(host, np.ndarray) and host.dtype == np.float64
    np.testing.assert_allclose(host, [-0.2, -0.75], rtol=1e-12)
    assert isinstance(moo.tchebycheff(jax.numpy.asarray(pts), pref, ideal), jax.Array)
    prefs = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    table = moo.weighted_sum(pts[None], prefs[:, None])
    assert table.shape == (3, 2)
    np.testing.assert_allclose(table, [[0.2, 1.0], [0.8, 0.0], [0.5, 0.5]], rtol=1e-6)
    assert float(jax.jit(moo.weighted_sum)(pts[0], pref)) == pytest.approx(0.65)
    with pytest.raises(ValueError, match="disagree"):
        moo.weighted_sum(pts, np.ones(3) / 3)
    with pytest.raises(ValueError, match="disagree"):
        moo.tchebycheff(pts, pref, np.ones(3))


# ---------------------------------------------------------------- Pareto


def test_pareto_mask_and_duplicates():
    pts = np.array([[1, 0], [0, 1], [0.5, 0.5], [0.4, 0.4], [1, 0], [0.5, 0.2]], dtype=float)
    np.testing.assert_array_equal(moo.pareto_mask(pts), [1, 1, 1, 0, 1, 0])
    np.testing.assert_array_equal(moo.pareto_mask(pts, keep_duplicates=False), [1, 1, 1, 0, 0, 0])


def test_pareto_mask_matches_brute_force():
    rng = np.random.default_rng(0)
    pts = rng.integers(0, 4, size=(40, 3)).astype(float)  # many ties and duplicates
    expected = [not any(np.all(q >= p) and np.any(q > p) for q in pts) for p in pts]
    np.testing.assert_array_equal(moo.pareto_mask(pts), expected)


def test_dominance_matrix_and_summary():
    a = np.array([[1.0, 1.0], [0.0, 2.0]])
    b = np.array([[0.5, 0.5], [1.0, 1.0], [2.0, 0.0]])
    m = moo.dominance_matrix(a, b)
    np.testing.assert_array_equal(m, [[True, False, False], [False, False, False]])
    s = moo.dominance_summary(a, b)
    assert s["b_dominated_by_a"] == pytest.approx(1 / 3)
    assert s["a_dominated_by_b"] == 0.0
    assert s["num_dominating_pairs"] == 1
    with pytest.raises(ValueError, match="set_b"):
        moo.dominance_matrix(a, np.ones((2, 3)))
    with pytest.raises(ValueError, match="empty"):
        moo.dominance_matrix(np.zeros((0, 2)), b)


def test_non_dominated_ranks_and_crowding():
    pts = np.array([[3, 1], [1, 3], [2, 2], [1, 1], [0, 0], [2, 0.5]], dtype=float)
    np.testing.assert_array_equal(moo.non_dominated_ranks(pts), [0, 0, 0, 1, 2, 1])
    front = np.array([[0.0, 3.0], [1.0, 2.0], [3.0, 0.0]])
    d = moo.crowding_distance(front)
    assert np.isinf(d[0]) and np.isinf(d[2])
    assert d[1] == pytest.approx((3 - 0) / 3 + (3 - 0) / 3)


# ---------------------------------------------------------------- hypervolume

# moocore (what every caller uses) and our own exact implementation, checked on the same hand values
HV_FNS = [moo.hypervolume, hypervolume_reference]


@pytest.mark.parametrize("hv", HV_FNS, ids=["moocore", "reference"])
def test_hypervolume_hand_values(hv):
    assert hv([[1.0, 2.0], [2.0, 1.0]], [0.0, 0.0]) == pytest.approx(3.0)
    assert hv([[3.0]], [1.0]) == pytest.approx(2.0)
    # union of three boxes in 3-D: 1*1*3 + 1*3*1 + 3*1*1 - 3*1 (pairwise overlaps 1 each) + 1 = 7
    assert hv(np.array([[1, 1, 3], [1, 3, 1], [3, 1, 1]], float), np.zeros(3)) == pytest.approx(7.0)
    # 4-D: two unit-overlap boxes 2*1*1*1 + 1*2*1*1 - 1 = 3
    pts4 = np.array([[2, 1, 1, 1], [1, 2, 1, 1]], float)
    assert hv(pts4, np.zeros(4)) == pytest.approx(3.0)
    # 8-D: a 2x1x...x1 box and a 1x...x1x3 box overlap in the unit cube: 2 + 3 - 1 = 4, shifted reference
    pts8 = np.array([[2, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 3]], float) + 0.5
    assert hv(pts8, np.full(8, 0.5)) == pytest.approx(4.0)
    # a dominated point and duplicates change nothing
    more = np.array([[1, 1, 3], [1, 3, 1], [3, 1, 1], [0.5, 0.5, 0.5], [1, 3, 1]], float)
    assert hv(more, np.zeros(3)) == pytest.approx(7.0)
    assert isinstance(hv(more, np.zeros(3)), float)


@pytest.mark.parametrize("hv", HV_FNS, ids=["moocore", "reference"])
def test_hypervolume_points_not_dominating_reference_contribute_nothing(hv):
    assert hv([[1.0, 2.0], [2.0, 0.0]], [0.0, 0.0]) == pytest.approx(2.0)  # (2,0) on the border
    assert hv([[-1.0, 5.0]], [0.0, 0.0]) == 0.0
    # 8-D: a point worse than the reference on one axis adds nothing to a unit cube
    pts = np.array([np.ones(8), [9, 9, 9, 9, 9, 9, 9, -0.5]])
    assert hv(pts, np.zeros(8)) == pytest.approx(1.0)


@pytest.mark.parametrize("hv", HV_FNS, ids=["moocore", "reference"])
def test_hypervolume_bad_input(hv):
    with pytest.raises(ValueError, match="reference"):
        hv([[1.0, 2.0]], [np.nan, 0.0])
    with pytest.raises(ValueError, match="non-finite"):
        hv([[np.nan, 2.0]], [0.0, 0.0])
    with pytest.raises(ValueError, match="non-finite"):
        hv([[np.inf, 2.0]], [0.0, 0.0])
    with pytest.raises(ValueError, match="k=2"):
        hv([[1.0, 2.0]], [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="empty"):
        hv(np.zeros((0, 2)), [0.0, 0.0])
    with pytest.raises(ValueError, match="2-D"):
        hv([1.0, 2.0], [0.0, 0.0])


def _inclusion_exclusion_hv(points, reference):
    """Exact HV by inclusion-exclusion over all subsets (only for tiny sets): independent of the sweep/WFG."""
    u = np.asarray(points) - reference
    u = u[np.all(u > 0, axis=1)]
    total = 0.0
    for size in range(1, len(u) + 1):
        for subset in itertools.combinations(range(len(u)), size):
            total += (-1) ** (size + 1) * np.prod(u[list(subset)].min(axis=0))
    return total


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6])
def test_hypervolume_matches_inclusion_exclusion(k):
    rng = np.random.default_rng(k)
    pts = rng.random((9, k))
    ref = np.full(k, 0.1)
    expected = _inclusion_exclusion_hv(pts, ref)
    assert moo.hypervolume(pts, ref) == pytest.approx(expected, rel=1e-10)
    assert hypervolume_reference(pts, ref) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("k,n", [(1, 50), (2, 200), (3, 200), (4, 80), (5, 60), (6, 40), (7, 30), (8, 30)])
def test_hypervolume_moocore_equals_reference(k, n):
    """moocore (C) and our WFG/sweeps agree to 1e-9 relative on random fronts, with dominated points, points
    outside the reference box and exact duplicates mixed in."""
    rng = np.random.default_rng(100 + k)
    pts = rng.random((n, k))
    pts /= np.linalg.norm(pts, axis=1, keepdims=True)  # points on a concave front: all non-dominated
    pts = np.concatenate([pts, 0.5 * rng.random((n // 4, k)), pts[:3], -rng.random((2, k))])
    ref = np.full(k, -0.05)
    expected = hypervolume_reference(pts, ref)
    assert expected > 0
    assert moo.hypervolume(pts, ref) == pytest.approx(expected, rel=1e-9, abs=0)


# ---------------------------------------------------------------- normalisation


def test_ideal_and_normalisation():
    source_scores = np.array([[80.0, 10.0, 5.0], [20.0, 50.0, 8.0], [30.0, 12.0, 40.0]])
    z = moo.ideal_point(source_scores)
    np.testing.assert_array_equal(z, [80.0, 50.0, 40.0])
    normed = moo.normalize_by_ideal(source_scores, z)
    np.testing.assert_allclose(np.diag(normed), 1.0)
    np.testing.assert_allclose(normed[0], [1.0, 0.2, 0.125])
    with pytest.raises(ValueError, match="ideal"):
        moo.normalize_by_ideal(source_scores, [80.0, 0.0, 40.0])
    with pytest.raises(ValueError, match="k=3"):
        moo.normalize_by_ideal(source_scores, [1.0, 1.0])


def test_reference_point_rule():
    a = np.array([[1.0, 0.2], [0.5, 0.9]])
    b = np.array([[0.8, 0.6]])
    ref = moo.reference_point({"a": a, "b": b})
    # worst = (0.5, 0.2); ideal 1; reference = worst - 0.1 * (1 - worst)
    np.testing.assert_allclose(ref, [0.45, 0.12])
    assert np.all(a > ref) and np.all(b > ref)  # every point counts
    # degenerate axis: everything at (or past) the ideal -> absolute margin 0.1
    np.testing.assert_allclose(moo.reference_point(np.array([[1.0, 1.2]])), [0.9, 1.1])
    np.testing.assert_allclose(moo.reference_point(a, fixed=[0.0, 0.0]), [0.0, 0.0])
    with pytest.raises(ValueError, match="disagree"):
        moo.reference_point([a, np.ones((1, 3))])
    with pytest.raises(ValueError, match="non-finite"):
        moo.reference_point(np.array([[np.nan, 1.0]]))


# ---------------------------------------------------------------- plots


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("k", [2, 3, 5])
def test_plot_front_writes_png(tmp_path, k):
    rng = np.random.default_rng(k)
    methods = {"hm3": rng.random((6, k)), "ties": rng.random((1, k)), "ea": rng.random((4, k))}
    out = plots.plot_front(methods, tmp_path / "sub" / f"front{k}.png", reference=np.zeros(k), title="t")
    assert _is_png(out)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == [f"front{k}.png"]  # no temp file left


def test_plot_curves_and_bad_input(tmp_path):
    out = plots.plot_curves({"hm3": [0.1, 0.3, 0.5], "ea": [0.2, 0.2]}, tmp_path / "curves.png")
    assert _is_png(out)
    with pytest.raises(ValueError, match="non-empty"):
        plots.plot_curves({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="NaN"):
        plots.plot_curves({"a": [1.0, float("nan")]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="objectives"):
        plots.plot_front({"a": np.ones((2, 2)), "b": np.ones((2, 3))}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="empty"):
        plots.plot_front({"a": np.zeros((0, 2))}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
