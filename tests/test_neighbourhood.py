"""HM3's neighbourhood refinement (issue 20): its moves by hand, the order a budgeted search scores them in, and
the search finding a planted depth edit that the order before issue 20 never reached. Pure numpy, no engine."""

import jax
import numpy as np
import pytest

from hm3_jax.search import neighbourhood, path_confirmation

KINDS = neighbourhood.MOVE_KINDS  # swap, delete, repeat, insert, layer


def _steps(row) -> list[int]:
    return [int(a) for a in row if a >= 0]


# K = 2 experts + Theta(lambda) (3 sources), L = 3, Theta's identity path [6, 7, 8] (pool index m * 3 + l),
# t_min 2, t_max 4: every move by hand, kind by kind, step by step.
THETA_L3 = np.array([6, 7, 8, -1], np.int32)
BY_HAND_L3 = {
    "swap": [[0, 7, 8], [3, 7, 8], [6, 1, 8], [6, 4, 8], [6, 7, 2], [6, 7, 5]],
    "delete": [[7, 8], [6, 8], [6, 7]],
    "repeat": [[6, 6, 7, 8], [6, 7, 7, 8], [6, 7, 8, 8]],
    "insert": [[6, 0, 7, 8], [6, 3, 7, 8], [6, 7, 1, 8], [6, 7, 4, 8], [6, 7, 8, 2], [6, 7, 8, 5]],
    "layer": [[7, 7, 8], [6, 6, 8], [6, 8, 8], [6, 7, 7]],  # (m, l +- 1): l = 0 has no l - 1, l = 2 no l + 1
}


def test_moves_by_hand_l3_k2():
    moves = neighbourhood.neighbour_moves(THETA_L3, 3, 3, t_min=2, t_max=4)
    assert moves.paths.shape == (22, 4) and moves.num_steps == 3
    for k, name in enumerate(KINDS):
        rows = moves.paths[moves.kind == k]
        assert [_steps(r) for r in rows] == BY_HAND_L3[name], name
    assert moves.step.tolist() == [0, 0, 1, 1, 2, 2] + [0, 1, 2] * 2 + [0, 0, 1, 1, 2, 2] + [0, 1, 1, 2]
    # -1 padding at the end only, lengths within t_min..t_max, no duplicates, not the path itself
    lengths = (moves.paths >= 0).sum(1)
    steps = np.arange(4)[None] < lengths[:, None]  # [22, 4]
    assert np.all(moves.paths[~steps] == -1) and np.all(moves.paths[steps] >= 0)
    assert lengths.min() >= 2 and lengths.max() <= 4
    keys = {tuple(r) for r in moves.paths.tolist()}
    assert len(keys) == 22 and tuple(THETA_L3.tolist()) not in keys
    # the order before issue 20 is the listing without insertions
    old = neighbourhood.neighbours(
        THETA_L3, 3, 3, 2, 4, kinds=neighbourhood.KINDS_WITHOUT_INSERTION, order="by_kind"
    )
    assert [_steps(r) for r in old] == [
        r for k in neighbourhood.KINDS_WITHOUT_INSERTION for r in BY_HAND_L3[k]
    ]


def test_moves_at_the_length_limits_and_across_kinds():
    at_max = neighbourhood.neighbour_moves(np.array([6, 7, 8], np.int32), 3, 3, t_min=2, t_max=3)
    at_min = neighbourhood.neighbour_moves(THETA_L3, 3, 3, t_min=3, t_max=4)
    names = lambda m: {KINDS[k] for k in m.kind}
    assert names(at_max) == {"swap", "delete", "layer"}  # T = t_max: no repeat, no insertion
    assert names(at_min) == {"swap", "repeat", "insert", "layer"}  # T = t_min: no deletion
    # Inserting (0, 0) after the step before a (0, 0) runs that block twice: listed once, under the first kind.
    path = np.array([6, 0, -1, -1], np.int32)  # (2, 0) (0, 0)
    both = [6, 0, 0, -1]
    for kinds, owner in ((KINDS, "repeat"), (("insert", "repeat"), "insert")):
        moves = neighbourhood.neighbour_moves(path, 3, 3, t_min=1, t_max=4, kinds=kinds)
        rows = [r.tolist() for r in moves.paths]
        assert rows.count(both) == 1 and kinds[moves.kind[rows.index(both)]] == owner
    with pytest.raises(ValueError, match="neighbourhood_kinds"):
        neighbourhood.neighbour_moves(path, 3, 3, 1, 4, kinds=("swap", "grow"))
    with pytest.raises(ValueError, match="neighbourhood_kinds"):
        neighbourhood.check_neighbourhood(("swap", "swap"), "round_robin")
    with pytest.raises(ValueError, match="neighbourhood_order"):
        neighbourhood.neighbours(path, 3, 3, 1, 4, order="random")


def test_round_robin_order_by_hand():
    """Without a key: kinds in turn; within a kind steps in spread order 0, 2, 1, a step's moves one per pass."""
    nb = neighbourhood.neighbours(THETA_L3, 3, 3, t_min=2, t_max=4)
    expected = [
        [0, 7, 8],
        [7, 8],
        [6, 6, 7, 8],
        [6, 0, 7, 8],
        [7, 7, 8],  # each kind's first move: step 0
        [6, 7, 2],
        [6, 7],
        [6, 7, 8, 8],
        [6, 7, 8, 2],
        [6, 7, 7],  # second: step 2
        [6, 1, 8],
        [6, 8],
        [6, 7, 7, 8],
        [6, 7, 1, 8],
        [6, 6, 8],  # third: step 1
        [3, 7, 8],
        [6, 3, 7, 8],
        [6, 8, 8],  # fourth (deletions and repeats have run out): step 0's second ...
        [6, 7, 5],
        [6, 7, 8, 5],  # fifth: step 2's second swap and insertion
        [6, 4, 8],
        [6, 7, 4, 8],  # sixth: step 1's
    ]
    assert [_steps(r) for r in nb] == expected
    assert neighbourhood.spread_order(8) == [0, 4, 2, 6, 1, 5, 3, 7] and neighbourhood.spread_order(5) == [
        0,
        4,
        2,
        1,
        3,
    ]
    assert neighbourhood.spread_order(1) == [0]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_a_budget_covers_every_kind_and_spreads_over_the_depth(seed):
    """At the deep tiny3's shape (4 sources, L = 16, Theta's identity path; 158 moves) the first B moves hold at
    least min(floor(B / 5), M_kind) of each kind; each kind's first 4 are at steps >= 4 apart (circularly)."""
    L, S, t_max = 16, 4, 32
    theta = path_confirmation.identity_paths(S, L, t_max)[S - 1]
    moves = neighbourhood.neighbour_moves(theta, S, L, t_min=12, t_max=t_max)
    counts = np.bincount(moves.kind, minlength=5)
    assert counts.tolist() == [48, 16, 16, 48, 30]
    key = jax.random.PRNGKey(seed)
    order = neighbourhood.order_moves(moves, "round_robin", key)
    assert sorted(order.tolist()) == list(range(len(moves.kind)))
    assert np.array_equal(
        order, neighbourhood.order_moves(moves, "round_robin", key)
    )  # a function of the key
    assert not np.array_equal(
        order, neighbourhood.order_moves(moves, "round_robin", jax.random.PRNGKey(seed + 100))
    )
    for budget in (5, 16, 23, 64, 158):
        got = np.bincount(moves.kind[order[:budget]], minlength=5)
        assert np.all(got >= np.minimum(budget // 5, counts)), (budget, got)
    # the order before issue 20 spends 16 evaluations on swaps only
    assert set(moves.kind[neighbourhood.order_moves(moves, "by_kind")[:16]].tolist()) == {0}
    for k in range(5):
        first = moves.step[order[moves.kind[order] == k][:4]]
        gaps = np.abs(first[:, None] - first[None]) % L
        assert np.minimum(gaps, L - gaps)[~np.eye(4, dtype=bool)].min() >= 4, (k, first)


def test_search_finds_a_planted_insertion_the_old_order_never_reaches():
    """One expert + Theta (2 sources), L = 3: 16 moves, 3 of them insertions. The planted best path is the
    expert's block 1 inserted after Theta's (a path of L + 1 blocks); every other move scores below Theta. A
    budget of 15 = 5 kinds x 3 scores every insertion whatever the key; the neighbourhood before issue 20 (swaps,
    deletions, repeats, neighbouring layers, kind by kind) has no insertion, so it stays at Theta."""
    theta, planted = np.array([3, 4, 5, -1], np.int32), [3, 4, 1, 5]

    def score_fn(paths):  # [M, 4] -> [M, 2]
        s = [0.9 if p.tolist() == planted else 0.8 if p.tolist() == theta.tolist() else 0.7 for p in paths]
        return np.repeat(np.asarray(s)[:, None], 2, 1)

    common = dict(num_sources=2, num_layers=3, t_min=2, t_max=4, beta1=0.0, budget=15)
    known = {theta.tobytes(): score_fn(theta[None])[0]}  # as in run_arch_level: the start is scored already
    for key in (None, jax.random.PRNGKey(0), jax.random.PRNGKey(1)):
        out = neighbourhood.neighbourhood_search(
            score_fn, theta, np.array([0.5, 0.5]), key=key, known=known, **common
        )
        assert out["path"].tolist() == planted and out["moves"] == ["insert"], key
        assert out["evaluations"] == 15 and out["evaluated"]["insert"] == 3
    old = neighbourhood.neighbourhood_search(
        score_fn,
        theta,
        np.array([0.5, 0.5]),
        known=known,
        **common,
        kinds=neighbourhood.KINDS_WITHOUT_INSERTION,
        order="by_kind",
    )
    assert old["path"].tolist() == theta.tolist() and old["steps"] == 0 and "insert" not in old["evaluated"]


def test_search_budget_at_the_deep_shape():
    """16 evaluations from Theta at L = 16 (the full config's budget): every kind is scored at least 3 times with
    the round robin, only swaps kind by kind; known paths are free and not scored again."""
    L, S, t_max = 16, 4, 32
    theta = path_confirmation.identity_paths(S, L, t_max)[S - 1]
    calls = []

    def flat(paths):  # every path as good as Theta: the search scores one round and stops
        calls.append(len(paths))
        return np.full((len(paths), 3), 0.5)

    common = dict(num_sources=S, num_layers=L, t_min=12, t_max=t_max, beta1=0.0, budget=16)
    known = {theta.tobytes(): np.full(3, 0.5)}
    out = neighbourhood.neighbourhood_search(
        flat, theta, np.ones(3) / 3, key=jax.random.PRNGKey(3), known=known, **common
    )
    assert out["evaluations"] == sum(calls) == 16 and out["steps"] == 0
    assert out["evaluated"] == {"swap": 4, "delete": 3, "repeat": 3, "insert": 3, "layer": 3}
    old = neighbourhood.neighbourhood_search(
        flat, theta, np.ones(3) / 3, known=known, order="by_kind", **common
    )
    assert old["evaluated"] == {"swap": 16, "delete": 0, "repeat": 0, "insert": 0, "layer": 0}


def test_neighbourhood_start_is_thetas_identity_path_only_when_asked_and_theta_is_in_the_pool():
    import ml_collections

    from hm3_jax.search.path_confirmation import identity_paths

    own = identity_paths(4, 2, 3)  # 3 experts + Theta (source 3) over L = 2
    best = np.array([0, 5, 1], np.int32)
    cfg = ml_collections.ConfigDict()
    assert np.array_equal(neighbourhood.neighbourhood_start(cfg, best, own, 4, 3), best)  # default: the best
    cfg.neighbourhood_start = "theta"
    assert np.array_equal(neighbourhood.neighbourhood_start(cfg, best, own, 4, 3), [6, 7, -1])
    assert np.array_equal(
        neighbourhood.neighbourhood_start(cfg, best, own[:3], 3, 3), best
    )  # no Theta: the best
    cfg.neighbourhood_start = "greedy"
    with pytest.raises(ValueError, match="neighbourhood_start"):
        neighbourhood.neighbourhood_start(cfg, best, own, 4, 3)


def test_best_scored_lists_the_answer_then_the_best_other_climbed_paths_by_reward():
    import types

    acfg = types.SimpleNamespace(beta1=0.1, t_max=4)
    pref = np.array([0.5, 0.5])
    p = lambda *xs: np.array([*xs, *[-1] * (4 - len(xs))], np.int32)
    # rewards by hand: mean score - 0.1 T / 4
    scored = [(p(0, 1), np.array([0.6, 0.6])),  # 0.60 - 0.05 = 0.55
              (p(0, 1, 1), np.array([0.7, 0.7])),  # 0.70 - 0.075 = 0.625
              (p(2, 1), np.array([0.4, 0.9])),  # 0.65 - 0.05 = 0.60
              (p(2, 3), np.array([0.2, 0.2]))]  # 0.15  # fmt: skip
    answer = p(0, 1, 1)
    out = neighbourhood.best_scored(scored, pref, acfg, 2, answer)
    assert out.tolist() == [answer.tolist(), p(2, 1).tolist(), p(0, 1).tolist()]
    assert neighbourhood.best_scored(scored, pref, acfg, 0, answer).tolist() == [answer.tolist()]
    assert neighbourhood.best_scored([], pref, acfg, 5, answer).tolist() == [answer.tolist()]
