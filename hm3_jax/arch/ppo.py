"""PPO for the layer-path MDP with a preference-conditioned Wolpertinger actor-critic (HM3 Sec. 3.2, Alg. 1).

Shape follows purejaxrl's ``ppo.py``: :func:`make_trainer` closes over a static
:class:`~hm3_jax.arch.config.ArchConfig`, the score function and the block descriptors, and returns pure
functions; ``train(key)`` (:func:`make_train`) is one ``lax.scan`` over iterations. One iteration is three
pieces, each a top-level function of its own module:

1. **Rollout** (``rollout.rollout``): ``num_envs`` episodes of the sampled policy, one batch of transitions.
2. **Scoring**: the ``num_envs`` finished paths are scored in one batch, ``score_fn(paths [N, t_max] int32 -1
   padded, preferences [N, K], preference_index [N]) -> normalised scores [N, K]`` (maximised; the index is the
   row of ``preferences`` each episode drew, carried by the batch). Either a jittable function (synthetic /
   planted problems) or a host function (the real path-evaluation engine) wrapped by ``scoring.host_score_fn``,
   which calls it through ``jax.pure_callback`` so the whole iteration stays one jitted function. The split loop
   (jitted rollout -> host score -> jitted update, :func:`split_iteration`) is the alternative; see docs/arch.md
   for which is faster.
3. **Update** (``update.update``): rewards ``R = sum_k lambda_k f_k - beta1 T / t_max`` credited to the
   decisions, GAE and ``update_epochs`` x ``num_minibatches`` clipped PPO steps.

Greedy decoding (:attr:`Trainer.decode`, ``rollout.make_decoder``) runs the policy with the proto-action mean and
``eps = 0`` for any preference, including one never seen in training. :attr:`Trainer.refine` continues PPO for
one preference. The paper's per-preference training is :func:`make_train_per_preference` (one network per
preference, vmapped). The warm start before PPO is ``warm_start.warm_start``; :attr:`Trainer.distill` fits the
trained policy onto the paths the level chose (``warm_start.distill``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hm3_jax.arch import descriptors as descriptors_lib
from hm3_jax.arch import network as network_lib
from hm3_jax.arch import rollout as rollout_lib
from hm3_jax.arch import update as update_lib
from hm3_jax.arch import warm_start as warm_start_lib
from hm3_jax.arch.config import ArchConfig
from hm3_jax.arch.rollout import Batch, RunnerState
from hm3_jax.arch.scoring import HostScoreFn, ScoreFn
from hm3_jax.arch.warm_start import warm_start


class Trainer(NamedTuple):
    """Pure functions bound to one config, score function, preference set and descriptor table."""

    init: Callable[[jax.Array], RunnerState]
    rollout: Callable[[RunnerState], tuple[RunnerState, Batch]]
    score: Callable[[Batch], jax.Array]
    update: Callable[[RunnerState, Batch, jax.Array], tuple[RunnerState, dict]]
    iteration: Callable[[RunnerState], tuple[RunnerState, dict]]
    train_chunk: Callable[[RunnerState, int], tuple[RunnerState, dict]]
    train: Callable[[jax.Array], tuple[RunnerState, dict]]
    decode: Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
    refine: Callable[[jax.Array, Any, jax.Array, jax.Array, int], Any]
    distill: Callable[..., Any]
    network: network_lib.ActorCritic


def _as_table(descriptors: jax.Array, num_prefs: int, config: ArchConfig) -> jax.Array:
    descriptors = jnp.asarray(descriptors, jnp.float32)
    if descriptors.ndim == 2:
        descriptors = descriptors[None]
    if descriptors.ndim != 3 or descriptors.shape[1] != config.pool_size:
        raise ValueError(
            f"descriptors must be [P, d] or [N, P, d] with P = {config.pool_size}, got {descriptors.shape}"
        )
    if descriptors.shape[0] not in (1, num_prefs):
        raise ValueError(f"descriptor table has {descriptors.shape[0]} rows, preferences {num_prefs}")
    if config.preference_sampling == "dirichlet" and descriptors.shape[0] != 1:
        raise ValueError("preference_sampling='dirichlet' needs one shared descriptor table [P, d]")
    return descriptors


def make_network(config: ArchConfig, descriptor_dim: int) -> network_lib.ActorCritic:
    """The actor-critic for ``config`` with descriptors of width ``descriptor_dim``."""
    return network_lib.ActorCritic(
        num_sources=config.num_sources,
        num_layers=config.num_layers,
        t_max=config.t_max,
        action_dim=config.num_sources + 2 + descriptor_dim,
        hidden_size=config.hidden_size,
        embed_size=config.embed_size,
        init_log_std=config.init_log_std,
    )


def init_runner(
    config: ArchConfig,
    network: network_lib.ActorCritic,
    optimiser: optax.GradientTransformation,
    table: jax.Array,
    embeddings: jax.Array,
    preferences: jax.Array,
    key: jax.Array,
) -> RunnerState:
    """The runner at iteration 0: fresh network parameters (warm-started when ``config`` asks for it), the
    optimiser's state and the key of the run."""
    key_net, key_run = jax.random.split(key)
    path = jnp.full((config.t_max,), -1, jnp.int32)
    params = network.init(key_net, path, jnp.int32(0), preferences[0], table[0])
    if config.warm_start_source >= 0 and config.warm_start_steps > 0:
        params = warm_start(network, params, config, table, embeddings, preferences)
    return RunnerState(params, optimiser.init(params), key_run, jnp.zeros((), jnp.int32))


def make_trainer(
    config: ArchConfig, score_fn: ScoreFn, descriptors: jax.Array, preferences: jax.Array | None = None
) -> Trainer:
    """Builds the pure training functions (module docstring).

    Args:
      config: static :class:`ArchConfig`.
      score_fn: jittable ``(paths [N, t_max], preferences [N, K], preference_index [N]) -> normalised scores
        [N, K]`` (``scoring.ScoreFn``); use ``scoring.host_score_fn`` for a host function.
      descriptors: phi, ``[P, d]`` (one pool for every preference) or ``[N, P, d]`` (row i for preference i,
        since the merged source depends on lambda).
      preferences: ``[N, K]`` preference vectors episodes draw from (``preference_sampling="given"``); may be
        None with ``"dirichlet"``.
    """
    if preferences is None:
        if config.preference_sampling != "dirichlet":
            raise ValueError("preferences are required unless preference_sampling='dirichlet'")
        preferences = jnp.full((1, config.num_tasks), 1.0 / config.num_tasks)
    preferences = jnp.asarray(preferences, jnp.float32)
    if preferences.ndim != 2 or preferences.shape[1] != config.num_tasks:
        raise ValueError(f"preferences must be [N, {config.num_tasks}], got {preferences.shape}")
    table = _as_table(descriptors, preferences.shape[0], config)
    return _make_trainer(config, score_fn, table, preferences)


def _make_trainer(config: ArchConfig, score_fn: ScoreFn, table: jax.Array, preferences: jax.Array) -> Trainer:
    network = make_network(config, table.shape[-1])
    embeddings = descriptors_lib.action_embeddings(table, config.num_sources)  # [Nt, A, E]
    optimiser = update_lib.make_optimiser(config)
    init = functools.partial(init_runner, config, network, optimiser, table, embeddings, preferences)
    rollout = functools.partial(rollout_lib.rollout, config, network, table, embeddings, preferences)
    update = functools.partial(update_lib.update, config, network, optimiser, table)

    def score(batch: Batch) -> jax.Array:
        return score_fn(batch.final_path, batch.preference, batch.preference_index)

    def iteration(runner: RunnerState) -> tuple[RunnerState, dict]:
        runner, batch = rollout(runner)
        return update(runner, batch, score(batch))

    def train_chunk(runner: RunnerState, num_iters: int) -> tuple[RunnerState, dict]:
        """``num_iters`` (static) iterations under one ``lax.scan``; metrics stacked ``[num_iters]``."""
        return jax.lax.scan(lambda r, _: iteration(r), runner, None, length=num_iters)

    def train(key: jax.Array) -> tuple[RunnerState, dict]:
        """The whole run: ``config.num_iterations`` iterations from ``init(key)``."""
        return train_chunk(init(key), config.num_iterations)

    def decode(
        params, preference: jax.Array, descriptors: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Greedy path for ``preference [K]`` (proto-action mean, eps = 0; deterministic).

        ``descriptors [P, d]``: phi of the pool built for this preference; None uses table row 0 (right when
        every preference shares one pool). Returns ``(path [t_max] int32, length [])``.
        """
        preference = jnp.asarray(preference, jnp.float32)
        phi = table[0] if descriptors is None else jnp.asarray(descriptors, jnp.float32)
        return rollout_lib.make_decoder(config, network, phi)(params, preference)

    def refine(key, params, preference, descriptors=None, num_iters: int = 10):
        """Online refinement: ``num_iters`` PPO iterations on ``preference [K]`` only, from ``params`` with a
        fresh optimiser state. Returns the refined params."""
        preference = jnp.asarray(preference, jnp.float32)[None]
        phi = table[:1] if descriptors is None else jnp.asarray(descriptors, jnp.float32)[None]
        sub_config = dataclasses.replace(config, preference_sampling="given")
        sub = _make_trainer(sub_config, score_fn, phi, preference)
        runner = RunnerState(params, sub.init(key).opt_state, key, jnp.zeros((), jnp.int32))
        runner, _ = sub.train_chunk(runner, num_iters)
        return runner.params

    def distill(params, paths, steps: int, learning_rate: float = 0.0):
        """``params`` fitted onto one chosen path per training preference (``paths [N, t_max]``, row i for
        preference i and its descriptor row): ``warm_start.distill`` at ``learning_rate`` (0: the warm start's
        cloning rate, else the PPO rate). Returns the distilled params."""
        lr = float(learning_rate) or config.warm_start_learning_rate or config.learning_rate
        return warm_start_lib.distill(
            network, params, config, table, embeddings, preferences, paths, int(steps), lr
        )

    return Trainer(
        init, rollout, score, update, iteration, train_chunk, train, decode, refine, distill, network
    )


def make_train(
    config: ArchConfig, score_fn: ScoreFn, descriptors: jax.Array, preferences: jax.Array | None = None
) -> Callable[[jax.Array], tuple[RunnerState, dict]]:
    """purejaxrl-style ``make_train(config, ...) -> train(key) -> (runner_state, metrics)``; jit it yourself."""
    return make_trainer(config, score_fn, descriptors, preferences).train


def make_train_per_preference(
    config: ArchConfig, score_fn: ScoreFn, descriptors: jax.Array, preferences: jax.Array
) -> Callable[[jax.Array], tuple[RunnerState, dict]]:
    """The paper's Algorithm 1: one network per preference, trained only on that preference.

    Returns ``train(key) -> (runner_states, metrics)`` with a leading axis ``[N]`` (vmapped over preferences;
    ``descriptors`` ``[P, d]`` shared or ``[N, P, d]``).
    """
    preferences = jnp.asarray(preferences, jnp.float32)
    table = _as_table(
        descriptors, preferences.shape[0], dataclasses.replace(config, preference_sampling="given")
    )
    table = jnp.broadcast_to(table, (preferences.shape[0],) + table.shape[1:])
    sub_config = dataclasses.replace(config, preference_sampling="given")

    def train_one(key, preference, phi):
        return _make_trainer(sub_config, score_fn, phi[None], preference[None]).train(key)

    def train(key):
        keys = jax.random.split(key, preferences.shape[0])
        return jax.vmap(train_one)(keys, preferences, table)

    return train


def split_iteration(
    trainer: Trainer, host_fn: HostScoreFn
) -> Callable[[RunnerState], tuple[RunnerState, dict]]:
    """The split loop: jitted rollout -> host ``host_fn(paths, preferences, preference_index)`` -> jitted update (an alternative
    to calling the host score function from inside jit through :func:`host_score_fn`)."""
    rollout = jax.jit(trainer.rollout)
    update = jax.jit(trainer.update)

    def step(runner):
        runner, batch = rollout(runner)
        paths, prefs, index = (
            np.asarray(x) for x in (batch.final_path, batch.preference, batch.preference_index)
        )
        scores = jnp.asarray(host_fn(paths, prefs, index), jnp.float32)
        return update(runner, batch, scores)

    return step
