"""PPO for the layer-path MDP with a preference-conditioned Wolpertinger actor-critic (HM3 Sec. 3.2, Alg. 1).

Shape follows purejaxrl's ``ppo.py``: :func:`make_trainer` closes over a static :class:`ArchConfig`, the score
function and the block descriptors, and returns pure functions; ``train(key)`` is one ``lax.scan`` over iterations.
One iteration:

1. **Rollout** (jitted, vmapped over ``num_envs`` episodes, ``lax.scan`` over ``t_max`` decisions): each episode
   draws its preference lambda (uniformly from the N given preference vectors, or from Dirichlet(1)); at each step
   the actor gives a Gaussian proto-action, Wolpertinger picks a valid discrete action, the env appends it. One
   episode per environment per iteration, no auto-reset: an episode has at most ``t_max`` decisions, so the scan
   length is ``t_max`` and steps after the end are masked out.
2. **Scoring**: the ``num_envs`` finished paths are scored in one batch, ``score_fn(paths [N, t_max] int32 -1
   padded, preferences [N, K]) -> normalised scores [N, K]`` (maximised). Either a jittable function (synthetic /
   planted problems) or a host function (the real path-evaluation engine) wrapped by :func:`host_score_fn`, which
   calls it through ``jax.pure_callback`` so the whole iteration stays one jitted function. The split loop
   (jitted rollout -> host score -> jitted update, :func:`split_iteration`) is the alternative; see docs/arch.md
   for which is faster.
3. **Rewards**: ``R = sum_k lambda_k f_k - beta1 T / t_max`` credited ``R / D`` to each of the episode's ``D``
   decisions (``env.credit_rewards``).
4. **GAE** (reverse ``lax.scan``, gamma = 0.99 as in the paper) and ``update_epochs`` x ``num_minibatches`` PPO
   steps (clipped surrogate on the proto-action log-prob, clipped value loss, entropy bonus; optax adam with
   global-norm clipping). Steps that are not decisions carry zero weight in every loss.

Greedy decoding (:attr:`Trainer.decode`) runs the same rollout with the proto-action mean and ``eps = 0`` for any
preference, including one never seen in training. :attr:`Trainer.refine` continues PPO for one preference.
The paper's per-preference training is :func:`make_train_per_preference` (one network per preference, vmapped).

Scores cache: :class:`CachedScoreFn` (host side) never re-scores a (path, preference) pair it has seen and scores
identical rows of a batch once. A jittable ``score_fn`` is not cached (inside jit there is no mutable state; a
synthetic score is cheaper than a lookup anyway).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from hm3_jax.arch import descriptors as descriptors_lib
from hm3_jax.arch import env as env_lib
from hm3_jax.arch import network as network_lib
from hm3_jax.arch import wolpertinger

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    """Static settings of the architecture-level search (hashable). See docs/arch.md for the chosen defaults.

    Problem: ``num_sources`` (K + 1), ``num_layers`` (L), ``num_tasks`` (K), ``t_min``, ``t_max``, ``beta1``.
    Rollout: ``num_envs`` episodes per iteration, ``k_nearest`` (M'), ``explore_eps``,
    ``preference_sampling`` ("given": uniform over the N preference vectors; "dirichlet": Dirichlet(1)).
    PPO: ``num_iterations``, ``update_epochs``, ``num_minibatches``, ``learning_rate``, ``max_grad_norm``,
    ``clip_eps``, ``vf_coef``, ``ent_coef``, ``gamma``, ``gae_lambda``.
    Network: ``hidden_size``, ``embed_size``, ``init_log_std``.
    Warm start: ``warm_start_source`` (-1: none), ``warm_start_steps`` and ``warm_start_learning_rate`` (0: the
    PPO ``learning_rate``) (see :func:`warm_start`).
    """

    num_sources: int
    num_layers: int
    num_tasks: int
    t_min: int = 1
    t_max: int = 8
    beta1: float = 0.1
    num_envs: int = 64
    k_nearest: int = 4
    explore_eps: float = 0.05
    preference_sampling: str = "given"
    num_iterations: int = 100
    update_epochs: int = 4
    num_minibatches: int = 4
    learning_rate: float = 1e-3
    max_grad_norm: float = 0.5
    clip_eps: float = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    gamma: float = 0.99
    gae_lambda: float = 0.95
    hidden_size: int = 64
    embed_size: int = 16
    init_log_std: float = -0.5
    warm_start_source: int = -1
    warm_start_steps: int = 0
    warm_start_learning_rate: float = 0.0

    def __post_init__(self):
        checks = {
            "num_sources >= 1": self.num_sources >= 1,
            "num_layers >= 1": self.num_layers >= 1,
            "num_tasks >= 1": self.num_tasks >= 1,
            "1 <= t_min <= t_max": 1 <= self.t_min <= self.t_max,
            "num_envs >= 1": self.num_envs >= 1,
            "k_nearest >= 1": self.k_nearest >= 1,
            "0 <= explore_eps <= 1": 0.0 <= self.explore_eps <= 1.0,
            "preference_sampling in ('given', 'dirichlet')": self.preference_sampling
            in ("given", "dirichlet"),
            "num_iterations >= 0": self.num_iterations >= 0,
            "update_epochs >= 1": self.update_epochs >= 1,
            "num_minibatches >= 1 dividing num_envs * t_max": self.num_minibatches >= 1
            and (self.num_envs * self.t_max) % self.num_minibatches == 0,
            "learning_rate > 0": self.learning_rate > 0,
            "0 < gamma <= 1": 0.0 < self.gamma <= 1.0,
            "0 <= gae_lambda <= 1": 0.0 <= self.gae_lambda <= 1.0,
            "-1 <= warm_start_source < num_sources": -1 <= self.warm_start_source < self.num_sources,
            "warm_start_steps >= 0": self.warm_start_steps >= 0,
            "warm_start_learning_rate >= 0": self.warm_start_learning_rate >= 0,
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid ArchConfig ({', '.join(failed)}): {self}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | Any) -> ArchConfig:
        """From a dict or ``ml_collections.ConfigDict``; unknown keys raise ``ValueError`` naming them."""
        items = dict(mapping.items()) if hasattr(mapping, "items") else dict(mapping)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(items) - names)
        if unknown:
            raise ValueError(f"unknown ArchConfig keys {unknown}; known: {sorted(names)}")
        return cls(**items)

    @property
    def pool_size(self) -> int:
        return self.num_sources * self.num_layers

    @property
    def num_actions(self) -> int:
        return self.pool_size + 1


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
    pref_index: jax.Array  # [N] row of the descriptor table used
    final_path: jax.Array  # [N, t_max]
    final_length: jax.Array  # [N]


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
    network: network_lib.ActorCritic


def gae(
    rewards: jax.Array, values: jax.Array, dones: jax.Array, last_value: jax.Array, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. 2016), reverse ``lax.scan`` over time.

    ``delta_t = r_t + gamma V_{t+1} (1 - d_t) - V_t``; ``A_t = delta_t + gamma lam (1 - d_t) A_{t+1}``.

    Args:
      rewards, values, dones: ``[T, N]`` (``dones[t]``: episode over after step t).
      last_value: ``[N]`` bootstrap value of the state after step ``T - 1``.

    Returns:
      ``(advantages [T, N], returns [T, N] = advantages + values)``.
    """
    dones = dones.astype(jnp.float32)

    def body(carry, x):
        next_adv, next_value = carry
        reward, value, done = x
        delta = reward + gamma * next_value * (1.0 - done) - value
        adv = delta + gamma * lam * (1.0 - done) * next_adv
        return (adv, value), adv

    init = (jnp.zeros_like(last_value), last_value)
    _, advantages = jax.lax.scan(body, init, (rewards, values, dones), reverse=True)
    return advantages, advantages + values


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def host_score_fn(fn: Callable[[np.ndarray, np.ndarray], np.ndarray], num_tasks: int) -> ScoreFn:
    """Wraps a host (numpy) score function so it can be called inside jit via ``jax.pure_callback``.

    ``fn(paths [N, t_max] int32, preferences [N, K] float32) -> [N, K]``. Extra leading axes (from vmap) are
    flattened before the call. Wrap ``fn`` in :class:`CachedScoreFn` to avoid re-scoring paths.
    """

    def host(paths, preferences):
        paths = np.asarray(paths)
        prefs = np.asarray(preferences)
        lead = paths.shape[:-1]
        out = np.asarray(
            fn(paths.reshape(-1, paths.shape[-1]), prefs.reshape(-1, prefs.shape[-1])), np.float32
        )
        if out.shape != (int(np.prod(lead)), num_tasks):
            raise ValueError(
                f"score function returned shape {out.shape}, expected {(int(np.prod(lead)), num_tasks)}"
            )
        return out.reshape(lead + (num_tasks,))

    def score(paths: jax.Array, preferences: jax.Array) -> jax.Array:
        shape = jax.ShapeDtypeStruct(paths.shape[:-1] + (num_tasks,), jnp.float32)
        return jax.pure_callback(host, shape, paths, preferences, vmap_method="broadcast_all")

    return score


class CachedScoreFn:
    """Host-side cache in front of an expensive score function: a (path, preference) pair is scored once.

    ``fn(paths [M, t_max], preferences [M, K]) -> [M, K]`` is called only on the rows never seen before, each
    distinct row once per call. ``hits`` / ``misses`` count rows served from the cache / scored.
    The key includes the preference because the merged source Theta(lambda) depends on it. ``preference_free=True``
    drops it from the key when the caller's scores do not depend on lambda (e.g. an expert-only pool).
    """

    def __init__(self, fn: Callable[[np.ndarray, np.ndarray], np.ndarray], preference_free: bool = False):
        self.fn = fn
        self.preference_free = preference_free
        self.cache: dict[bytes, np.ndarray] = {}
        self.hits = 0
        self.misses = 0

    def _key(self, path: np.ndarray, pref: np.ndarray) -> bytes:
        head = np.asarray(path, np.int32).tobytes()
        return head if self.preference_free else head + b"|" + np.asarray(pref, np.float32).tobytes()

    def __call__(self, paths: np.ndarray, preferences: np.ndarray) -> np.ndarray:
        paths = np.asarray(paths, np.int32)
        preferences = np.asarray(preferences, np.float32)
        keys = [self._key(p, w) for p, w in zip(paths, preferences, strict=True)]
        todo: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            if k not in self.cache and k not in todo:
                todo[k] = i
        if todo:
            rows = np.array(list(todo.values()))
            scores = np.asarray(self.fn(paths[rows], preferences[rows]), np.float32)
            for k, s in zip(todo, scores, strict=True):
                self.cache[k] = s
        self.misses += len(todo)
        self.hits += len(keys) - len(todo)
        return np.stack([self.cache[k] for k in keys]).astype(np.float32)


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


def make_trainer(
    config: ArchConfig, score_fn: ScoreFn, descriptors: jax.Array, preferences: jax.Array | None = None
) -> Trainer:
    """Builds the pure training functions (module docstring).

    Args:
      config: static :class:`ArchConfig`.
      score_fn: jittable ``(paths [N, t_max], preferences [N, K]) -> normalised scores [N, K]``; use
        :func:`host_score_fn` for a host function.
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
    stop = config.pool_size
    optimiser = optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm), optax.adam(config.learning_rate, eps=1e-5)
    )

    def env_params(preference):
        return env_lib.EnvParams(
            preference=preference,
            beta1=jnp.float32(config.beta1),
            num_sources=config.num_sources,
            num_layers=config.num_layers,
            t_min=config.t_min,
            t_max=config.t_max,
        )

    def init(key: jax.Array) -> RunnerState:
        key_net, key_run = jax.random.split(key)
        path = jnp.full((config.t_max,), -1, jnp.int32)
        params = network.init(key_net, path, jnp.int32(0), preferences[0], table[0])
        if config.warm_start_source >= 0 and config.warm_start_steps > 0:
            params = warm_start(network, params, config, table, embeddings, preferences)
        return RunnerState(params, optimiser.init(params), key_run, jnp.zeros((), jnp.int32))

    def episode(params, key, preference, pref_index, greedy: bool):
        """One episode; returns the per-step records and the final state."""
        ep = env_params(preference)
        phi = table[pref_index]
        emb = embeddings[pref_index]
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
            action, info = wolpertinger.select_action(
                key_select, proto, emb, valid, q_fn, config.k_nearest, eps
            )
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

    def draw_preferences(key):
        if config.preference_sampling == "dirichlet":
            prefs = jax.random.dirichlet(key, jnp.ones((config.num_tasks,)), (config.num_envs,))
            return prefs.astype(jnp.float32), jnp.zeros((config.num_envs,), jnp.int32)
        index = jax.random.randint(key, (config.num_envs,), 0, preferences.shape[0])
        table_index = index if table.shape[0] > 1 else jnp.zeros_like(index)
        return preferences[index], table_index

    def rollout(runner: RunnerState) -> tuple[RunnerState, Batch]:
        key, key_pref, key_episodes = jax.random.split(runner.key, 3)
        prefs, table_index = draw_preferences(key_pref)
        keys = jax.random.split(key_episodes, config.num_envs)
        final, records = jax.vmap(lambda k, w, i: episode(runner.params, k, w, i, False))(
            keys, prefs, table_index
        )
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
            pref_index=table_index,
            final_path=final.path,
            final_length=final.length,
        )
        return runner.replace(key=key), batch

    def score(batch: Batch) -> jax.Array:
        return score_fn(batch.final_path, batch.preference)

    def update(runner: RunnerState, batch: Batch, scores: jax.Array) -> tuple[RunnerState, dict]:
        ep = env_params(batch.preference)
        returns_r = env_lib.episode_return(scores, batch.final_length, ep)  # [N]
        mask = batch.decision.astype(jnp.float32)
        rewards = env_lib.credit_rewards(returns_r, batch.decision)
        values = batch.value * mask
        advantages, targets = gae(
            rewards,
            values,
            batch.done | ~batch.decision,
            jnp.zeros(config.num_envs),
            config.gamma,
            config.gae_lambda,
        )
        adv_mean = _masked_mean(advantages, mask)
        adv_std = jnp.sqrt(_masked_mean((advantages - adv_mean) ** 2, mask))
        advantages = (advantages - adv_mean) / (adv_std + 1e-8)

        num_samples = config.t_max * config.num_envs
        flat = {
            "path": batch.path.reshape(num_samples, config.t_max),
            "length": batch.length.reshape(num_samples),
            "preference": jnp.broadcast_to(
                batch.preference, (config.t_max,) + batch.preference.shape
            ).reshape(num_samples, -1),
            "pref_index": jnp.broadcast_to(batch.pref_index, (config.t_max, config.num_envs)).reshape(
                num_samples
            ),
            "proto": batch.proto.reshape(num_samples, -1),
            "log_prob": batch.log_prob.reshape(num_samples),
            "value": values.reshape(num_samples),
            "advantage": advantages.reshape(num_samples),
            "target": targets.reshape(num_samples),
            "mask": mask.reshape(num_samples),
        }

        def loss_fn(params, mb):
            def one(path, length, preference, pref_index):
                carry = network.apply(params, path, length, preference, table[pref_index], method="encode")
                return network.apply(params, carry, preference, method="heads")

            mean, log_std, value = jax.vmap(one)(mb["path"], mb["length"], mb["preference"], mb["pref_index"])
            log_prob = network_lib.gaussian_log_prob(mb["proto"], mean, log_std)
            ratio = jnp.exp(log_prob - mb["log_prob"])
            adv = mb["advantage"]
            surrogate = jnp.minimum(
                ratio * adv, jnp.clip(ratio, 1.0 - config.clip_eps, 1.0 + config.clip_eps) * adv
            )
            policy_loss = -_masked_mean(surrogate, mb["mask"])
            value_clipped = mb["value"] + jnp.clip(value - mb["value"], -config.clip_eps, config.clip_eps)
            value_loss = 0.5 * _masked_mean(
                jnp.maximum((value - mb["target"]) ** 2, (value_clipped - mb["target"]) ** 2), mb["mask"]
            )
            entropy = _masked_mean(network_lib.gaussian_entropy(log_std), mb["mask"])
            total = policy_loss + config.vf_coef * value_loss - config.ent_coef * entropy
            approx_kl = _masked_mean(mb["log_prob"] - log_prob, mb["mask"])
            return total, {
                "policy_loss": policy_loss,
                "value_loss": value_loss,
                "entropy": entropy,
                "approx_kl": approx_kl,
            }

        def epoch(carry, key):
            params, opt_state = carry
            perm = jax.random.permutation(key, num_samples)
            minibatches = jax.tree.map(
                lambda x: x[perm].reshape((config.num_minibatches, -1) + x.shape[1:]), flat
            )

            def minibatch(carry, mb):
                params, opt_state = carry
                (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
                updates, opt_state = optimiser.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), aux

            return jax.lax.scan(minibatch, (params, opt_state), minibatches)

        key, key_epochs = jax.random.split(runner.key)
        (params, opt_state), aux = jax.lax.scan(
            epoch, (runner.params, runner.opt_state), jax.random.split(key_epochs, config.update_epochs)
        )
        metrics = {k: v.mean() for k, v in aux.items()}
        weighted = jnp.sum(batch.preference * scores, axis=-1)
        metrics.update(
            {
                "episode_return": returns_r.mean(),
                "weighted_score": weighted.mean(),
                "path_length": batch.final_length.astype(jnp.float32).mean(),
                "explored_fraction": _masked_mean(batch.explored.astype(jnp.float32), mask),
                "stop_fraction": jnp.mean(batch.final_length < config.t_max),
                "iteration": runner.iteration + 1,
            }
        )
        new_runner = RunnerState(params, opt_state, key, runner.iteration + 1)
        return new_runner, metrics

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
        sub = _make_decoder(phi)
        return sub(params, preference)

    def _make_decoder(phi):
        emb = descriptors_lib.action_embeddings(phi, config.num_sources)

        def run(params, preference):
            ep = env_params(preference)
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

    del stop
    return Trainer(init, rollout, score, update, iteration, train_chunk, train, decode, refine, network)


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
    trainer: Trainer, host_fn: Callable[[np.ndarray, np.ndarray], np.ndarray]
) -> Callable[[RunnerState], tuple[RunnerState, dict]]:
    """The split loop: jitted rollout -> host ``host_fn(paths, preferences)`` -> jitted update (an alternative
    to calling the host score function from inside jit through :func:`host_score_fn`)."""
    rollout = jax.jit(trainer.rollout)
    update = jax.jit(trainer.update)

    def step(runner):
        runner, batch = rollout(runner)
        scores = jnp.asarray(host_fn(np.asarray(batch.final_path), np.asarray(batch.preference)), jnp.float32)
        return update(runner, batch, scores)

    return step
