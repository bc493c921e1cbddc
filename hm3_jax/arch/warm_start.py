"""Behaviour cloning of the architecture-level policy: the warm start onto one source's identity path, and the
distillation of the level's answers.

HM3's hierarchy: the lower level starts from the upper level's answer (:func:`warm_start`), before PPO. After
the search, :func:`distill` fits the policy onto the path the level chose for each preference (`arch_level`:
after the refinement and the confirmation), so the preference-conditioned policy's greedy decode starts from
what the search found, for the run's preferences and, by interpolation, for new ones (`pipeline.suggest`).
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


def path_demonstrations(paths, config: ArchConfig) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per path (``paths [N, t_max]`` int32, -1 padded) the decisions that build it: each of its T blocks in
    order, then STOP when T < t_max (as :func:`demonstration`).

    Returns ``(states [N, t_max, t_max], lengths [N, t_max], actions [N, t_max], mask [N, t_max])``: decision d
    of path i is action ``actions[i, d]`` taken in the state ``states[i, d]`` (its first d blocks) of length d;
    ``mask`` is 1 on the real decisions (T + 1, or t_max for a full path).
    """
    paths = np.asarray(paths, np.int32)
    n, t_max = paths.shape
    if t_max != config.t_max:
        raise ValueError(f"paths must be [N, t_max = {config.t_max}], got {paths.shape}")
    states = np.full((n, t_max, t_max), -1, np.int32)
    actions = np.zeros((n, t_max), np.int32)
    mask = np.zeros((n, t_max), np.float32)
    for i, path in enumerate(paths):
        blocks = path[path >= 0]
        if (
            len(blocks) < config.t_min
            or np.any(path[len(blocks) :] >= 0)
            or np.any(blocks >= config.pool_size)
        ):
            raise ValueError(
                f"path {i} is not a valid path of {config.t_min}..{t_max} pool blocks < {config.pool_size} "
                f"followed by -1: {path.tolist()}"
            )
        acts = list(blocks) + ([config.pool_size] if len(blocks) < t_max else [])
        for d, a in enumerate(acts):
            states[i, d, :d] = blocks[:d]
            actions[i, d], mask[i, d] = a, 1.0
    lengths = np.broadcast_to(np.arange(t_max, dtype=np.int32), (n, t_max))
    return jnp.asarray(states), jnp.asarray(lengths), jnp.asarray(actions), jnp.asarray(mask)


def behaviour_clone(
    network, params, table, embeddings, preferences, demonstrations, steps: int, learning_rate: float
):
    """``steps`` Adam steps at ``learning_rate`` on ``mean_{lambda} mean_d ||mu(S_d, lambda) - e(a_d)||^2``:
    the actor's proto-action mean at each demonstrated state onto the demonstrated action's embedding, for every
    preference with its own descriptor table row (row 0 for all when the table has one row).

    ``demonstrations``: ``(states [D, t_max], lengths [D], actions [D])`` shared by every preference
    (:func:`demonstration`), or ``(states [N, D, t_max], lengths [N, D], actions [N, D], mask [N, D])`` one per
    preference (:func:`path_demonstrations`; the mean over d runs over the mask's real decisions). Only the
    mean head is fitted in effect (the loss does not read log-std or the critic). Deterministic.
    """
    num_prefs = preferences.shape[0]
    rows = jnp.arange(num_prefs) if table.shape[0] > 1 else jnp.zeros((num_prefs,), jnp.int32)
    shared = len(demonstrations) == 3
    opt = optax.adam(learning_rate)

    def loss_fn(p):
        def one(pref, row, states, lengths, actions, mask=None):
            def step(path, length, action):
                carry = network.apply(p, path, length, pref, table[row], method="encode")
                mean, _, _ = network.apply(p, carry, pref, method="heads")
                return jnp.sum((mean - embeddings[row, action]) ** 2)

            err = jax.vmap(step)(states, lengths, actions)
            return err.mean() if mask is None else (err * mask).sum() / mask.sum()

        if shared:
            return jax.vmap(one, in_axes=(0, 0, None, None, None))(preferences, rows, *demonstrations).mean()
        return jax.vmap(one)(preferences, rows, *demonstrations).mean()

    def body(carry, _):
        p, state = carry
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, state = opt.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), loss

    (params, _), _ = jax.lax.scan(body, (params, opt.init(params)), None, length=steps)
    return params


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
    return behaviour_clone(
        network,
        params,
        table,
        embeddings,
        preferences,
        demonstration(config),
        config.warm_start_steps,
        config.warm_start_learning_rate or config.learning_rate,
    )


def distill(
    network, params, config: ArchConfig, table, embeddings, preferences, paths, steps: int, lr: float
):
    """The policy ``params`` fitted by behaviour cloning onto one chosen path per preference (``paths [N,
    t_max]``, row i for ``preferences[i]`` and descriptor table row i): :func:`behaviour_clone` with
    :func:`path_demonstrations`, ``steps`` Adam steps at ``lr`` from ``params`` (the trained policy)."""
    demos = path_demonstrations(paths, config)
    if demos[0].shape[0] != preferences.shape[0]:
        raise ValueError(
            f"one path per preference: {demos[0].shape[0]} paths, {preferences.shape[0]} preferences"
        )
    return behaviour_clone(network, params, table, embeddings, preferences, demos, steps, lr)
