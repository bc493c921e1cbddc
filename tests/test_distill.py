"""Distilling the architecture level's answers into the preference-conditioned policy (`arch/warm_start.py`).

After the search, `Trainer.distill` fits the policy's proto-action mean onto the chosen path of each training
preference (behaviour cloning, as the warm start does onto one identity path). Checked: the demonstrations by
hand, the greedy decode reproducing a different path per preference after distillation, the warm start bit for
bit what its earlier closed-over implementation gave, and a bad path refused with its row.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hm3_jax.arch import planted, ppo
from hm3_jax.arch.config import ArchConfig
from hm3_jax.arch.warm_start import demonstration, path_demonstrations

BASE = dict(
    num_sources=3,
    num_layers=3,
    num_tasks=2,
    t_min=1,
    t_max=5,
    num_envs=8,
    num_iterations=0,
    k_nearest=1,
    learning_rate=3e-3,
)


def test_path_demonstrations_by_hand():
    config = ArchConfig(**BASE)
    states, lengths, actions, mask = path_demonstrations([[0, 4, 8, -1, -1], [6, 7, 7, 8, 2]], config)
    np.testing.assert_array_equal(actions[0], [0, 4, 8, 9, 0])  # three blocks, STOP (P = 9), padding
    np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 0])
    np.testing.assert_array_equal(actions[1], [6, 7, 7, 8, 2])  # a full path: no STOP
    np.testing.assert_array_equal(mask[1], [1, 1, 1, 1, 1])
    np.testing.assert_array_equal(states[1, 3], [6, 7, 7, -1, -1])  # the state before decision 3
    np.testing.assert_array_equal(lengths[1], [0, 1, 2, 3, 4])
    # the identity path's demonstrations are the warm start's
    shared = demonstration(ArchConfig(**BASE, warm_start_source=2, warm_start_steps=1))
    per = path_demonstrations([[6, 7, 8, -1, -1]], config)
    for a, b in zip(shared, per, strict=False):
        np.testing.assert_array_equal(a, np.asarray(b)[0, : len(shared[2])])


@pytest.mark.parametrize(
    "path, why", [([0, 4, -1, 8, -1], "gap"), ([9, -1, -1, -1, -1], "STOP as a block"), ([-1] * 5, "empty")]
)
def test_a_bad_path_is_refused_with_its_row(path, why):
    with pytest.raises(ValueError, match="path 1 is not a valid path"):
        path_demonstrations([[0, 1, 2, -1, -1], path], ArchConfig(**BASE))


def test_distilled_policy_decodes_each_preference_s_own_path():
    """From a policy warm-started onto source 2's identity path, distillation onto two other paths (one per
    training preference) makes the greedy decode give each preference its own path."""
    problem = planted.make_planted_problem(0, num_tasks=2, num_layers=3, t_max=5, merged_value=0.7)
    prefs = jnp.array(((0.9, 0.1), (0.1, 0.9)))
    config = ArchConfig(**BASE, warm_start_source=2, warm_start_steps=300)
    trainer = ppo.make_trainer(config, planted.make_score_fn(problem), problem.descriptors, prefs)
    params = trainer.init(jax.random.key(1)).params
    decode = jax.jit(trainer.decode)

    def decoded(p):
        out = []
        for w in prefs:
            path, length = decode(p, w)
            out.append(tuple(int(a) for a in np.asarray(path)[: int(length)]))
        return out

    assert decoded(params) == [(6, 7, 8)] * 2  # the warm start
    chosen = [(0, 4, 8), (6, 7, 7, 8)]
    paths = np.full((2, 5), -1, np.int32)
    for i, c in enumerate(chosen):
        paths[i, : len(c)] = c
    distilled = trainer.distill(params, paths, 400, 3e-3)
    assert decoded(distilled) == chosen
    again = trainer.distill(params, paths, 400, 3e-3)  # deterministic
    jax.tree.map(np.testing.assert_array_equal, distilled, again)
    with pytest.raises(ValueError, match="one path per preference"):
        trainer.distill(params, paths[:1], 10, 3e-3)


def test_warm_start_is_its_earlier_implementation_bit_for_bit():
    """`warm_start` now calls `behaviour_clone` with shared demonstrations; the loss it had before (the
    demonstration closed over, `.mean()` over decisions) gives the same parameters to the bit."""
    problem = planted.make_planted_problem(0, num_tasks=2, num_layers=3, t_max=5, merged_value=0.7)
    prefs = jnp.array(((0.9, 0.1), (0.1, 0.9), (0.4, 0.6)))
    config = ArchConfig(**BASE, warm_start_source=2, warm_start_steps=25)
    trainer = ppo.make_trainer(config, planted.make_score_fn(problem), problem.descriptors, prefs)
    params = trainer.init(jax.random.key(3)).params
    cold = ppo.make_trainer(
        ArchConfig(**BASE), planted.make_score_fn(problem), problem.descriptors, prefs
    ).init(jax.random.key(3))
    from hm3_jax.arch import descriptors as descriptors_lib

    table = jnp.asarray(problem.descriptors, jnp.float32)
    table = table[None] if table.ndim == 2 else table
    embeddings = descriptors_lib.action_embeddings(table, config.num_sources)
    network = trainer.network
    paths, lengths, actions = demonstration(config)
    rows = jnp.zeros((3,), jnp.int32) if table.shape[0] == 1 else jnp.arange(3)
    opt = optax.adam(config.learning_rate)

    def loss_fn(p):  # the earlier implementation
        def one(pref, row):
            def step(path, length, action):
                carry = network.apply(p, path, length, pref, table[row], method="encode")
                mean, _, _ = network.apply(p, carry, pref, method="heads")
                return jnp.sum((mean - embeddings[row, action]) ** 2)

            return jax.vmap(step)(paths, lengths, actions).mean()

        return jax.vmap(one)(prefs, rows).mean()

    def body(carry, _):
        p, state = carry
        _, grads = jax.value_and_grad(loss_fn)(p)
        updates, state = opt.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), None

    (expected, _), _ = jax.lax.scan(body, (cold.params, opt.init(cold.params)), None, length=25)
    jax.tree.map(np.testing.assert_array_equal, params, expected)
