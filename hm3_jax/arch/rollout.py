"""Collecting a batch of episodes with the policy (HM3 Sec. 3.2, Alg. 1, the rollout), and greedy decoding.

One rollout: ``num_envs`` episodes vmapped, each a ``lax.scan`` over ``t_max`` decisions. Each episode draws
its preference lambda (uniformly from the N given preference vectors, or from Dirichlet(1)); at each step the
actor gives a Gaussian proto-action, Wolpertinger picks a valid discrete action, the env appends it. One episode
per environment per iteration, no auto-reset: an episode has at most ``t_max`` decisions, so the scan length is
``t_max`` and steps after the end are masked out (``Batch.decision``).

Every function takes the static :class:`~hm3_jax.arch.config.ArchConfig`, the actor-critic ``network``, the
descriptor ``table`` phi ``[Nt, P, d]`` (one row per preference, or one shared row) and its action
``embeddings`` ``[Nt, P + 1, E]`` first; ``ppo.make_trainer`` binds them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from hm3_jax.arch import descriptors as descriptors_lib
from hm3_jax.arch import env as env_lib
from hm3_jax.arch import network as network_lib
from hm3_jax.arch import wolpertinger
from hm3_jax.arch.config import ArchConfig


@struct.dataclass
class RunnerState:
    """Everything that evolves during training (checkpointed as one pytree)."""

    params: Any
    opt_state: Any
    key: jax.Array
    iteration: jax.Array


@struct.dataclass
class Batch:
    """One iteration's rollout, time-major ``[t_max, num_envs, ...]`` unless said otherwise."""

    path: jax.Array  # [T, N, t_max] path before each decision
    length: jax.Array  # [T, N]
    proto: jax.Array  # [T, N, E] sampled proto-actions
    log_prob: jax.Array  # [T, N]
    value: jax.Array  # [T, N]
    decision: jax.Array  # [T, N] bool, step was a decision of the episode
    done: jax.Array  # [T, N] bool, episode over after this step
    action: jax.Array  # [T, N] int32
    explored: jax.Array  # [T, N] bool
    preference: jax.Array  # [N, K]
    preference_index: jax.Array  # [N] int32 row of the trainer's preferences drawn (-1: a Dirichlet draw)
    descriptor_row: jax.Array  # [N] row of the descriptor table used
    final_path: jax.Array  # [N, t_max]
    final_length: jax.Array  # [N]


def env_params(config: ArchConfig, preference: jax.Array) -> env_lib.EnvParams:
    """The path MDP of ``config`` for ``preference [..., K]``."""
    return env_lib.EnvParams(
        preference=preference,
        beta1=jnp.float32(config.beta1),
        num_sources=config.num_sources,
        num_layers=config.num_layers,
        t_min=config.t_min,
        t_max=config.t_max,
    )


def episode(
    config: ArchConfig,
    network: network_lib.ActorCritic,
    table: jax.Array,
    embeddings: jax.Array,
    params,
    key: jax.Array,
    preference: jax.Array,
    descriptor_row: jax.Array,
    greedy: bool,
):
    """One episode for ``preference [K]`` with descriptor row ``descriptor_row``.

    Returns ``(final EnvState, records)``, records a tuple of ``[t_max, ...]`` arrays: path and length before
    each step, proto-action, its log-prob, value, decision, done, action, explored.
    """
    ep = env_params(config, preference)
    phi = table[descriptor_row]
    emb = embeddings[descriptor_row]
    _, state = env_lib.reset(key, ep)

    def body(state, step_key):
        key_noise, key_select, key_env = jax.random.split(step_key, 3)
        carry = network.apply(params, state.path, state.length, preference, phi, method="encode")
        mean, log_std, value = network.apply(params, carry, preference, method="heads")
        if greedy:
            proto = mean
        else:
            proto = mean + jnp.exp(log_std) * jax.random.normal(key_noise, mean.shape)
        log_prob = network_lib.gaussian_log_prob(proto, mean, log_std)
        valid = env_lib.action_mask(state, ep)

        def q_fn(candidates):
            def q_one(a):
                extended = network.apply(params, carry, a, state.length, phi, method="extend")
                return config.gamma * network.apply(params, extended, preference, method="value")

            return jax.vmap(q_one)(candidates)

        eps = 0.0 if greedy else config.explore_eps
        action, info = wolpertinger.select_action(key_select, proto, emb, valid, q_fn, config.k_nearest, eps)
        decision = ~state.done
        _, new_state, _, done, _ = env_lib.step(key_env, state, action, ep)
        record = (
            state.path,
            state.length,
            proto,
            log_prob,
            value,
            decision,
            done,
            action,
            info["explored"],
        )
        return new_state, record

    final, records = jax.lax.scan(body, state, jax.random.split(key, config.t_max))
    return final, records


def draw_preferences(
    config: ArchConfig, preferences: jax.Array, table: jax.Array, key: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The ``num_envs`` episodes' preferences ``[N, K]`` and descriptor rows ``[N]``: uniform over the rows of
    ``preferences`` ("given"; row i uses table row i when the table has one row per preference, else row 0), or
    Dirichlet(1) draws with table row 0 ("dirichlet").

    Returns ``(preferences [N, K], preference_index [N] (the rows drawn; -1 for Dirichlet draws), descriptor
    rows [N])``.
    """
    if config.preference_sampling == "dirichlet":
        prefs = jax.random.dirichlet(key, jnp.ones((config.num_tasks,)), (config.num_envs,))
        return (
            prefs.astype(jnp.float32),
            jnp.full((config.num_envs,), -1, jnp.int32),
            jnp.zeros((config.num_envs,), jnp.int32),
        )
    index = jax.random.randint(key, (config.num_envs,), 0, preferences.shape[0])
    table_index = index if table.shape[0] > 1 else jnp.zeros_like(index)
    return preferences[index], index, table_index


def rollout(
    config: ArchConfig,
    network: network_lib.ActorCritic,
    table: jax.Array,
    embeddings: jax.Array,
    preferences: jax.Array,
    runner: RunnerState,
) -> tuple[RunnerState, Batch]:
    """``num_envs`` episodes with the sampled policy (module docstring); returns the runner with its key moved
    on and the time-major :class:`Batch`."""
    key, key_pref, key_episodes = jax.random.split(runner.key, 3)
    prefs, pref_index, table_index = draw_preferences(config, preferences, table, key_pref)
    keys = jax.random.split(key_episodes, config.num_envs)
    final, records = jax.vmap(
        lambda k, w, i: episode(config, network, table, embeddings, runner.params, k, w, i, False)
    )(keys, prefs, table_index)
    records = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), records)  # [N, T, ...] -> [T, N, ...]
    path, length, proto, log_prob, value, decision, done, action, explored = records
    batch = Batch(
        path=path,
        length=length,
        proto=proto,
        log_prob=log_prob,
        value=value,
        decision=decision,
        done=done,
        action=action,
        explored=explored,
        preference=prefs,
        preference_index=pref_index,
        descriptor_row=table_index,
        final_path=final.path,
        final_length=final.length,
    )
    return runner.replace(key=key), batch


def make_decoder(config: ArchConfig, network: network_lib.ActorCritic, phi: jax.Array):
    """Greedy decoding over descriptors ``phi [P, d]``: ``run(params, preference [K]) -> (path [t_max] int32,
    length [])`` with the proto-action mean and ``eps = 0`` (deterministic; any preference, also one never
    trained on)."""
    emb = descriptors_lib.action_embeddings(phi, config.num_sources)

    def run(params, preference):
        ep = env_params(config, preference)
        _, state = env_lib.reset(jax.random.key(0), ep)

        def body(state, _):
            carry = network.apply(params, state.path, state.length, preference, phi, method="encode")
            mean, _, _ = network.apply(params, carry, preference, method="heads")
            valid = env_lib.action_mask(state, ep)

            def q_fn(candidates):
                def q_one(a):
                    extended = network.apply(params, carry, a, state.length, phi, method="extend")
                    return network.apply(params, extended, preference, method="value")

                return config.gamma * jax.vmap(q_one)(candidates)

            action, _ = wolpertinger.select_action(
                jax.random.key(0), mean, emb, valid, q_fn, config.k_nearest, 0.0
            )
            _, state, _, _, _ = env_lib.step(jax.random.key(0), state, action, ep)
            return state, None

        final, _ = jax.lax.scan(body, state, None, length=config.t_max)
        return final.path, final.length

    return run
