"""The warm start of the architecture-level policy: behaviour cloning onto one source's identity path.

HM3's hierarchy: the lower level starts from the upper level's answer (:func:`warm_start`), before PPO.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hm3_jax.arch.config import ArchConfig


def demonstration(config: ArchConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The warm start's demonstration: source ``warm_start_source``'s own blocks in order, then STOP.

    Returns ``(paths [D, t_max], lengths [D], actions [D])``: the state before each of the D decisions
    (``D = min(L, t_max) + 1``, or ``t_max`` decisions when the path fills it) and the action taken there.
    """
    L, m = config.num_layers, config.warm_start_source
    steps = min(L, config.t_max)
    actions = [m * L + l for l in range(steps)] + ([config.pool_size] if steps < config.t_max else [])
    paths = np.full((len(actions), config.t_max), -1, np.int32)
    for d in range(len(actions)):
        paths[d, :d] = actions[:d]
    return jnp.asarray(paths), jnp.arange(len(actions), dtype=jnp.int32), jnp.asarray(actions, jnp.int32)


def warm_start(network, params, config: ArchConfig, table, embeddings, preferences):
    """Behaviour cloning of the actor's proto-action mean onto a demonstration path, before PPO.

    HM3's hierarchy: the lower level starts from the upper level's answer. With ``warm_start_source = K`` (the
    parameter-merged Theta(lambda)) the demonstration is Theta(lambda)'s identity path, so the first
    rollouts explore the neighbourhood of the parameter level's model (the Gaussian proto-action noise moves a
    step to a nearby action: another source's block at the same depth, a neighbouring block) instead of random
    paths. Loss: ``mean_{lambda, d} ||mu(S_d, lambda) - e(a_d)||^2`` over the N preferences (each with its
    own descriptor table row) and the demonstration's D decisions, ``warm_start_steps`` Adam steps at
    ``warm_start_learning_rate`` (0: the PPO learning rate). Only the mean head is fitted (log-std and critic
    keep their initial values), so the exploration noise is the configured ``init_log_std``. Deterministic.
    """
    paths, lengths, actions = demonstration(config)
    num_prefs = preferences.shape[0]
    rows = jnp.arange(num_prefs) if table.shape[0] > 1 else jnp.zeros((num_prefs,), jnp.int32)
    opt = optax.adam(config.warm_start_learning_rate or config.learning_rate)

    def loss_fn(p):
        def one(pref, row):
            def step(path, length, action):
                carry = network.apply(p, path, length, pref, table[row], method="encode")
                mean, _, _ = network.apply(p, carry, pref, method="heads")
                return jnp.sum((mean - embeddings[row, action]) ** 2)

            return jax.vmap(step)(paths, lengths, actions).mean()

        return jax.vmap(one)(preferences, rows).mean()

    def body(carry, _):
        p, state = carry
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, state = opt.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), loss

    (params, _), _ = jax.lax.scan(body, (params, opt.init(params)), None, length=config.warm_start_steps)
    return params
