"""The PPO trainer's pieces, each on its own (hm3_jax.arch.rollout / update / ppo), against independent code:
GAE against a plain numpy loop, the clipped loss against a hand computation, a rollout's batch against the env
stepped in Python with the batch's own actions, and `train_chunk`'s `lax.scan` against a Python loop of the
jitted rollout and update. Tiny planted problem: a few seconds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hm3_jax.arch import env, planted, ppo
from hm3_jax.arch.config import ArchConfig
from hm3_jax.arch.rollout import env_params
from hm3_jax.arch.update import clipped_loss, gae


@pytest.fixture(scope="module")
def trainer():
    problem = planted.make_planted_problem(0, num_tasks=2, num_layers=3, t_max=4)
    config = ArchConfig(
        num_sources=3,
        num_layers=3,
        num_tasks=2,
        t_min=2,
        t_max=4,
        beta1=0.3,
        num_envs=6,
        k_nearest=2,
        explore_eps=0.3,
        num_minibatches=2,
        update_epochs=2,
        num_iterations=2,
    )
    prefs = jnp.array([[0.9, 0.1], [0.1, 0.9], [0.5, 0.5]])
    return config, prefs, ppo.make_trainer(config, planted.make_score_fn(problem), problem.descriptors, prefs)


def test_gae_against_a_numpy_loop():
    rng = np.random.default_rng(0)
    T, N, gamma, lam = 7, 5, 0.97, 0.9
    rewards, values = rng.normal(size=(T, N)), rng.normal(size=(T, N))
    dones, last = rng.random((T, N)) < 0.3, rng.normal(size=N)
    adv = np.zeros((T, N))
    for n in range(N):
        next_adv, next_value = 0.0, last[n]
        for t in reversed(range(T)):
            keep = 0.0 if dones[t, n] else 1.0
            delta = rewards[t, n] + gamma * next_value * keep - values[t, n]
            next_adv = delta + gamma * lam * keep * next_adv
            next_value = values[t, n]
            adv[t, n] = next_adv
    got_adv, got_ret = gae(
        jnp.asarray(rewards, jnp.float32),
        jnp.asarray(values, jnp.float32),
        jnp.asarray(dones),
        jnp.asarray(last, jnp.float32),
        gamma,
        lam,
    )
    np.testing.assert_allclose(got_adv, adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_ret, adv + values, rtol=1e-5, atol=1e-5)


def test_clipped_loss_against_a_hand_computation():
    config = ArchConfig(num_sources=2, num_layers=1, num_tasks=1, clip_eps=0.2, vf_coef=0.5, ent_coef=0.1)
    old_lp = np.array([0.0, 0.0, -1.0, 0.0])
    new_lp = np.array([np.log(1.5), np.log(0.5), -1.0 + np.log(1.1), 5.0])  # ratios 1.5, 0.5, 1.1, masked
    adv = np.array([1.0, -2.0, 3.0, 100.0])
    old_v, new_v, target = np.array([0.0, 1.0, 2.0, 0.0]), np.array([1.0, 0.9, 2.5, 9.0]), np.array([0.5] * 4)
    mask = np.array([1.0, 1.0, 1.0, 0.0])
    log_std = np.full((4, 2), -0.5)
    mb = {"log_prob": old_lp, "advantage": adv, "value": old_v, "target": target, "mask": mask}
    total, aux = clipped_loss(config, jnp.asarray(new_lp), jnp.asarray(log_std), jnp.asarray(new_v), mb)
    # surrogate min(r A, clip(r, 0.8, 1.2) A): r = 1.5, A = 1 -> 1.2; r = 0.5, A = -2 -> min(-1.0, -1.6) = -1.6;
    # r = 1.1 inside the clip -> 3.3; the masked sample does not count
    policy = -(1.2 * 1.0 - 1.6 + 1.1 * 3.0) / 3
    # value: v_clipped = old + clip(new - old, +-0.2): 0.2, 0.9, 2.2; max of the squared errors to 0.5
    value = 0.5 * (max(0.25, 0.09) + max(0.16, 0.16) + max(4.0, 2.89)) / 3
    entropy = 2 * (
        0.5 * np.log(2 * np.pi * np.e) - 0.5
    )  # per sample: sum over E of 0.5 log(2 pi e) + log_std
    np.testing.assert_allclose(aux["policy_loss"], policy, rtol=1e-5)
    np.testing.assert_allclose(aux["value_loss"], value, rtol=1e-5)
    np.testing.assert_allclose(aux["entropy"], entropy, rtol=1e-5)
    np.testing.assert_allclose(aux["approx_kl"], -(np.log(1.5) + np.log(0.5) + np.log(1.1)) / 3, rtol=1e-5)
    np.testing.assert_allclose(total, policy + 0.5 * value - 0.1 * entropy, rtol=1e-5)


def test_rollout_batch_replays_through_the_env(trainer):
    config, prefs, tr = trainer
    runner = tr.init(jax.random.key(1))
    new_runner, batch = jax.jit(tr.rollout)(runner)
    assert not np.array_equal(jax.random.key_data(new_runner.key), jax.random.key_data(runner.key))
    b = jax.tree.map(np.asarray, batch)
    for n in range(config.num_envs):
        # the episode's preference is the given row the batch names; one shared descriptor table: row 0
        np.testing.assert_array_equal(b.preference[n], np.asarray(prefs)[b.preference_index[n]])
        assert b.descriptor_row[n] == 0
        params = env_params(config, jnp.asarray(b.preference[n]))
        _, state = env.reset(jax.random.key(0), params)
        for t in range(config.t_max):
            np.testing.assert_array_equal(b.path[t, n], state.path)
            assert b.length[t, n] == int(state.length) and b.decision[t, n] == (not bool(state.done))
            if b.decision[t, n]:
                assert bool(env.action_mask(state, params)[b.action[t, n]])
            _, state, _, done, _ = env.step(jax.random.key(0), state, b.action[t, n], params)
            assert b.done[t, n] == bool(done)
        np.testing.assert_array_equal(b.final_path[n], state.path)
        assert b.final_length[n] == int(state.length) and bool(state.done)


def test_train_chunk_equals_a_python_loop_of_rollout_and_update(trainer):
    config, _, tr = trainer
    runner = tr.init(jax.random.key(2))
    scanned, metrics = jax.jit(tr.train_chunk, static_argnums=1)(runner, 2)
    rollout, update = jax.jit(tr.rollout), jax.jit(tr.update)
    looped, rows = runner, []
    for _ in range(2):
        looped, batch = rollout(looped)
        looped, row = update(looped, batch, tr.score(batch))
        rows.append(row)
    for a, b in zip(jax.tree.leaves(scanned.params), jax.tree.leaves(looped.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(jax.random.key_data(scanned.key), jax.random.key_data(looped.key))
    assert int(scanned.iteration) == int(looped.iteration) == 2
    np.testing.assert_allclose(metrics["episode_return"], [r["episode_return"] for r in rows], rtol=1e-5)
