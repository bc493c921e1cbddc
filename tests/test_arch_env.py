"""Path MDP semantics, descriptors, Wolpertinger selection, GAE (hm3_jax.arch)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hm3_jax.arch import descriptors, env, wolpertinger
from hm3_jax.arch.config import ArchConfig
from hm3_jax.arch.scoring import CachedScoreFn
from hm3_jax.arch.update import gae


def _params(t_min=2, t_max=4, beta1=0.2):
    # K = 2 tasks, 3 sources, L = 3 -> P = 9, STOP = 9
    return env.make_env_params(
        jnp.array([0.25, 0.75]), beta1, num_sources=3, num_layers=3, t_min=t_min, t_max=t_max
    )


def test_stop_masked_before_t_min_and_forced_end_at_t_max():
    p = _params(t_min=2, t_max=3)
    _, s = env.reset(jax.random.key(0), p)
    assert not env.action_mask(s, p)[p.stop_action]
    assert env.action_mask(s, p)[: p.pool_size].all()
    # STOP before t_min is invalid: state unchanged, not done
    _, s1, r, done, info = env.step(jax.random.key(1), s, p.stop_action, p)
    assert not bool(info["valid"]) and not bool(done) and int(s1.length) == 0 and float(r) == 0.0
    _, s, _, done, _ = env.step(jax.random.key(1), s, 4, p)
    assert not bool(done) and not env.action_mask(s, p)[p.stop_action]
    _, s, _, done, _ = env.step(jax.random.key(1), s, 7, p)
    assert not bool(done) and env.action_mask(s, p)[p.stop_action]
    _, s, _, done, _ = env.step(jax.random.key(1), s, 0, p)
    assert bool(done), "the episode must end by force at t_max"
    np.testing.assert_array_equal(s.path, [4, 7, 0])
    assert int(s.num_decisions) == 3
    assert not env.action_mask(s, p).any()
    # after done the state is frozen
    _, s2, _, _, info = env.step(jax.random.key(1), s, 2, p)
    assert not bool(info["valid"])
    chex.assert_trees_all_equal(s, s2)


def test_stop_ends_episode_after_t_min():
    p = _params(t_min=1, t_max=4)
    _, s = env.reset(jax.random.key(0), p)
    _, s, _, _, _ = env.step(jax.random.key(0), s, 8, p)
    _, s, _, done, info = env.step(jax.random.key(0), s, p.stop_action, p)
    assert bool(done) and bool(info["valid"]) and not bool(info["appended"])
    np.testing.assert_array_equal(s.path, [8, -1, -1, -1])
    assert int(s.length) == 1 and int(s.num_decisions) == 2


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="t_min"):
        env.make_env_params(jnp.ones(2) / 2, 0.1, 3, 3, t_min=0, t_max=3)
    with pytest.raises(ValueError, match="preference"):
        env.make_env_params(jnp.ones((2, 2)), 0.1, 3, 3, t_min=1, t_max=3)
    with pytest.raises(ValueError, match="num_minibatches"):
        ArchConfig(num_sources=3, num_layers=3, num_tasks=2, t_max=4, num_envs=3, num_minibatches=5)
    with pytest.raises(ValueError, match="unknown ArchConfig keys"):
        ArchConfig.from_mapping({"num_sources": 3, "num_layers": 3, "num_tasks": 2, "gama": 0.9})


def test_episode_return_and_reward_crediting():
    p = _params(t_max=4, beta1=0.2)
    scores = jnp.array([0.8, 0.4])
    r = env.episode_return(scores, jnp.int32(3), p)
    np.testing.assert_allclose(r, 0.25 * 0.8 + 0.75 * 0.4 - 0.2 * 3 / 4, rtol=1e-6)
    # two episodes: 3 blocks + STOP (4 decisions), and 2 blocks + STOP (3 decisions) over 4 time steps
    mask = jnp.array([[1, 1], [1, 1], [1, 1], [1, 0]], bool)
    rewards = env.credit_rewards(jnp.array([2.0, -0.6]), mask)
    np.testing.assert_allclose(rewards, [[0.5, -0.2], [0.5, -0.2], [0.5, -0.2], [0.5, 0.0]], rtol=1e-6)


def test_scan_equals_python_loop_and_step_traced_once():
    p = _params(t_min=1, t_max=4)
    actions = jnp.array([3, 3, 9, 5], jnp.int32)  # STOP at the third step; the last action is ignored

    @jax.jit
    @chex.assert_max_traces(n=1)
    def jit_step(state, action):
        return env.step(jax.random.key(0), state, action, p)

    _, s = env.reset(jax.random.key(0), p)
    loop_dones = []
    for a in actions:
        _, s, _, d, _ = jit_step(s, a)
        loop_dones.append(bool(d))

    def body(state, a):
        _, state, _, d, _ = env.step(jax.random.key(0), state, a, p)
        return state, d

    _, s0 = env.reset(jax.random.key(0), p)
    s_scan, scan_dones = jax.lax.scan(body, s0, actions)
    chex.assert_trees_all_equal(s, s_scan)
    assert loop_dones == [bool(x) for x in scan_dones] == [False, False, True, True]
    np.testing.assert_array_equal(s.path, [3, 3, -1, -1])


def test_descriptors_against_numpy():
    rng = np.random.default_rng(0)
    num_sources, num_layers = 3, 2
    base = {"a": rng.normal(size=(num_layers, 3, 2)), "bias": rng.normal(size=(num_layers, 3))}
    pool = {
        "a": rng.normal(size=(num_sources * num_layers, 3, 2)),
        "bias": rng.normal(size=(num_sources * num_layers, 3)),
    }
    pool["a"][2] = base["a"][0]  # source 1, block 0 equals the base: zero task vector -> cosines 0
    phi = np.asarray(descriptors.block_descriptors(pool, base, num_sources))
    raw = []
    for m in range(num_sources):
        for l in range(num_layers):
            tau = (pool["a"][m * num_layers + l] - base["a"][l]).ravel()
            row = [np.linalg.norm(tau)]
            for n in range(num_sources):
                if n != m:
                    other = (pool["a"][n * num_layers + l] - base["a"][l]).ravel()
                    den = np.linalg.norm(tau) * np.linalg.norm(other)
                    row.append(0.0 if den == 0 else tau @ other / den)
            row.append(l / (num_layers - 1))
            raw.append(row)
    raw = np.array(raw)
    expected = (raw - raw.mean(0)) / raw.std(0)
    np.testing.assert_allclose(phi, expected, rtol=1e-4, atol=1e-5)
    emb = np.asarray(descriptors.action_embeddings(jnp.asarray(phi), num_sources))
    assert emb.shape == (num_sources * num_layers + 1, num_sources + 2 + phi.shape[1])
    np.testing.assert_array_equal(emb[3, :5], [0, 1, 0, 0, 0.5])  # source 1, block 1 of L = 2
    np.testing.assert_array_equal(emb[-1], [0, 0, 0, 1] + [0] * (1 + phi.shape[1]))  # STOP


def test_wolpertinger_picks_critics_best_among_k_nearest():
    emb = jnp.array([[0.0], [1.0], [2.0], [3.0], [10.0], [1.1]])
    valid = jnp.array([True, True, True, True, True, False])
    q_table = jnp.array([5.0, 1.0, 2.0, 3.0, 100.0, 50.0])
    q_fn = lambda c: q_table[c]
    proto = jnp.array([1.2])
    cand, cand_valid = wolpertinger.nearest_actions(proto, emb, valid, 3)
    np.testing.assert_array_equal(cand, [1, 2, 0])  # action 5 (distance 0.1) is invalid
    assert cand_valid.all()
    action, info = wolpertinger.select_action(jax.random.key(0), proto, emb, valid, q_fn, 3, eps=0.0)
    assert int(action) == 0  # best Q among {1, 2, 0}; 4 (Q = 100) is not among the nearest
    # with eps = 1 the pick is uniform among the k nearest
    picks = jax.vmap(lambda k: wolpertinger.select_action(k, proto, emb, valid, q_fn, 3, eps=1.0)[0])(
        jax.random.split(jax.random.key(1), 300)
    )
    assert set(np.unique(np.asarray(picks)).tolist()) == {0, 1, 2}
    # fewer valid actions than k: invalid candidates are never picked
    valid2 = jnp.array([False, True, False, False, False, False])
    for eps in (0.0, 1.0):
        a, _ = wolpertinger.select_action(jax.random.key(2), proto, emb, valid2, q_fn, 3, eps=eps)
        assert int(a) == 1


def test_gae_against_hand_computed_values():
    gamma, lam = 0.9, 0.5
    rewards = jnp.array([[1.0], [2.0], [3.0]])
    values = jnp.array([[0.5], [1.0], [1.5]])
    dones = jnp.array([[0.0], [0.0], [1.0]])
    adv, ret = gae(rewards, values, dones, jnp.array([7.0]), gamma, lam)
    d2 = 3.0 - 1.5  # terminal: no bootstrap
    d1 = 2.0 + 0.9 * 1.5 - 1.0
    d0 = 1.0 + 0.9 * 1.0 - 0.5
    a2 = d2
    a1 = d1 + 0.45 * a2
    a0 = d0 + 0.45 * a1
    np.testing.assert_allclose(adv[:, 0], [a0, a1, a2], rtol=1e-6)
    np.testing.assert_allclose(ret[:, 0], [a0 + 0.5, a1 + 1.0, a2 + 1.5], rtol=1e-6)
    # a non-terminal last step bootstraps from last_value
    adv2, _ = gae(rewards, values, jnp.zeros_like(dones), jnp.array([7.0]), gamma, lam)
    np.testing.assert_allclose(adv2[2, 0], 3.0 + 0.9 * 7.0 - 1.5, rtol=1e-6)


def test_cached_score_fn_scores_each_path_once():
    calls = []

    def fn(paths, prefs):
        calls.append(len(paths))
        return np.stack([paths.max(1), prefs[:, 0]], 1).astype(np.float32)

    cached = CachedScoreFn(fn)
    paths = np.array([[1, 2, -1], [1, 2, -1], [3, -1, -1]], np.int32)
    prefs = np.array([[0.5, 0.5]] * 3, np.float32)
    out = cached(paths, prefs)
    np.testing.assert_allclose(out, [[2, 0.5], [2, 0.5], [3, 0.5]])
    out2 = cached(paths[::-1], prefs)
    np.testing.assert_allclose(out2, out[::-1])
    assert calls == [2] and cached.misses == 2 and cached.hits == 4
