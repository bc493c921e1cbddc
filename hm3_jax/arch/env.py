"""The layer-path MDP of HM3 (HM3_SPEC "The path MDP"), gymnax-style and pure.

An episode builds an inference path ``alpha = ((m_1, l_1), ..., (m_T, l_T))`` one block at a time. Actions:

* ``a in [0, P)`` with ``P = num_sources * num_layers``: append pool block ``a`` (source ``m = a // L``, block
  ``l = a % L``; sources ``0..K-1`` are the experts and ``K`` the parameter-merged model Theta(lambda));
* ``a = P`` (STOP): end the episode. STOP is invalid before ``t_min`` blocks (see :func:`action_mask`); the
  episode ends by force once the path holds ``t_max`` blocks.

The state is the whole path so far (Markov by construction) plus, in :class:`EnvParams`, the preference lambda.

Reward (paper, Sec. 3.2): when the episode ends the path is scored once, ``R = sum_k lambda_k f_k(path) -
beta1 * T / T_max``, and ``R`` is credited evenly to the episode's decisions. Scores are only known after the
episode (they come from an external, possibly host-side, evaluation engine on a whole batch of finished
paths), so :func:`step` returns a reward of 0 and the crediting happens afterwards in :func:`credit_rewards`
(called by the rollout in ``ppo.py``). Our decision, documented: the STOP decision counts as a decision of
the episode, so an episode of ``T`` blocks ended by STOP has ``D = T + 1`` decisions and one ended by force at
``T_max`` has ``D = T``; every decision is credited ``R / D`` (the paper, which has no STOP, credits ``R / T``
to each of its ``T`` steps; in both cases the credited rewards sum to ``R``).

An invalid action (STOP before ``t_min``, or any action after the episode ended) leaves the state unchanged;
the policy never emits one because it masks them (``wolpertinger.py``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from hm3_jax.moo.scalarize import weighted_sum


@struct.dataclass
class EnvParams:
    """Settings of one path MDP; the array fields are vmappable, the static ones select compiled shapes.

    Attributes:
      preference: ``[K]`` float, lambda on the simplex (K = number of tasks = number of experts).
      beta1: length-penalty weight in ``R = sum_k lambda_k f_k - beta1 * T / T_max``.
      num_sources: static, K + 1 (experts plus the merged model).
      num_layers: static, L (blocks per source).
      t_min: static, minimum number of blocks before STOP is allowed (>= 1).
      t_max: static, maximum path length (the episode ends there by force).
    """

    preference: jax.Array
    beta1: jax.Array | float = 0.0
    num_sources: int = struct.field(pytree_node=False, default=1)
    num_layers: int = struct.field(pytree_node=False, default=1)
    t_min: int = struct.field(pytree_node=False, default=1)
    t_max: int = struct.field(pytree_node=False, default=1)

    @property
    def pool_size(self) -> int:
        """P = num_sources * num_layers."""
        return self.num_sources * self.num_layers

    @property
    def stop_action(self) -> int:
        """The STOP action id, P."""
        return self.pool_size

    @property
    def num_actions(self) -> int:
        """P + 1 (every pool block plus STOP)."""
        return self.pool_size + 1


@struct.dataclass
class EnvState:
    """What evolves during an episode.

    Attributes:
      path: ``[t_max]`` int32 pool indices, ``-1`` padded.
      length: int32 scalar, number of blocks in ``path``.
      num_decisions: int32 scalar, actions taken so far (blocks plus a STOP, if any).
      done: bool scalar.
    """

    path: jax.Array
    length: jax.Array
    num_decisions: jax.Array
    done: jax.Array


@struct.dataclass
class Observation:
    """What the policy sees: the path so far and the preference. ``path [t_max]``, ``length []``,
    ``preference [K]``."""

    path: jax.Array
    length: jax.Array
    preference: jax.Array


def make_env_params(
    preference: Any, beta1: float, num_sources: int, num_layers: int, t_min: int, t_max: int
) -> EnvParams:
    """Builds :class:`EnvParams` and checks the static settings, raising ``ValueError`` naming the bad one."""
    if num_sources < 1 or num_layers < 1:
        raise ValueError(f"num_sources={num_sources} and num_layers={num_layers} must both be >= 1")
    if not 1 <= t_min <= t_max:
        raise ValueError(f"need 1 <= t_min <= t_max, got t_min={t_min}, t_max={t_max}")
    preference = jnp.asarray(preference, jnp.float32)
    if preference.ndim != 1:
        raise ValueError(f"preference must be a vector [K], got shape {preference.shape}")
    return EnvParams(
        preference=preference,
        beta1=jnp.asarray(beta1, jnp.float32),
        num_sources=int(num_sources),
        num_layers=int(num_layers),
        t_min=int(t_min),
        t_max=int(t_max),
    )


def get_obs(state: EnvState, params: EnvParams) -> Observation:
    """The observation of ``state`` (path, length, preference)."""
    return Observation(path=state.path, length=state.length, preference=params.preference)


def reset(key: jax.Array, params: EnvParams) -> tuple[Observation, EnvState]:
    """Starts an episode with the empty path. ``key`` is unused (the start state is deterministic) but kept
    first, gymnax-style."""
    del key
    state = EnvState(
        path=jnp.full((params.t_max,), -1, jnp.int32),
        length=jnp.zeros((), jnp.int32),
        num_decisions=jnp.zeros((), jnp.int32),
        done=jnp.zeros((), bool),
    )
    return get_obs(state, params), state


def action_mask(state: EnvState, params: EnvParams) -> jax.Array:
    """``[P + 1]`` bool, True where the action is valid in ``state``: every block while ``length < t_max``,
    STOP only once ``length >= t_min``; nothing once the episode is done."""
    blocks_ok = jnp.full((params.pool_size,), state.length < params.t_max)
    stop_ok = state.length >= params.t_min
    return jnp.append(blocks_ok, stop_ok) & ~state.done


def step(
    key: jax.Array, state: EnvState, action: jax.Array, params: EnvParams
) -> tuple[Observation, EnvState, jax.Array, jax.Array, dict[str, jax.Array]]:
    """One decision. Returns ``(obs, state, reward, done, info)``.

    ``reward`` is always 0: the episode's return ``R`` is known only once the finished path has been scored,
    and is credited afterwards by :func:`credit_rewards` (see the module docstring). ``info["valid"]`` says
    whether ``action`` was a valid action (an invalid one leaves the state unchanged); ``info["appended"]``
    whether a block was appended. No auto-reset: after ``done`` the state is frozen, which the rollout relies
    on (one episode per environment per iteration, at most ``t_max`` decisions).
    """
    del key
    action = jnp.asarray(action, jnp.int32)
    valid = action_mask(state, params)[jnp.clip(action, 0, params.pool_size)] & (action >= 0)
    valid = valid & (action <= params.pool_size)
    is_stop = action == params.stop_action
    appended = valid & ~is_stop
    position = jnp.minimum(state.length, params.t_max - 1)
    path = jnp.where(appended, state.path.at[position].set(action), state.path)
    length = state.length + appended.astype(jnp.int32)
    done = state.done | (valid & is_stop) | (length >= params.t_max)
    new_state = EnvState(
        path=path,
        length=length,
        num_decisions=state.num_decisions + valid.astype(jnp.int32),
        done=done,
    )
    reward = jnp.zeros((), jnp.float32)
    info = {"valid": valid, "appended": appended}
    return get_obs(new_state, params), new_state, reward, done, info


def length_penalised(weighted, length, beta1, t_max):
    """The reward ``R = w - beta1 * T / T_max`` from a path's preference-weighted score ``w = sum_k lambda_k f_k``
    (HM3_SPEC "Reward"): the one place the equation is written (:func:`episode_return` on the device in float32,
    :func:`host_reward` on the host in float64, and reward differences ``R_a - R_b`` from ``w_a - w_b`` and
    ``T_a - T_b``, the equation being linear). Computed in the callers' dtypes, as ``w - ((beta1 * T) / T_max)``.

    Args:
      weighted: ``[...]`` weighted scores (or their differences); length: ``[...]`` path lengths T (or their
        differences); beta1, t_max: the length penalty's weight and the maximum path length.
    """
    return weighted - beta1 * length / t_max


def episode_return(scores: jax.Array, length: jax.Array, params: EnvParams) -> jax.Array:
    """``R = sum_k lambda_k f_k(path) - beta1 * T / T_max`` (the paper's reward), jittable, float32.

    The weighted sum is `hm3_jax.moo.weighted_sum`; `host_reward` is the same equation on the host in float64.

    Args:
      scores: ``[..., K]`` normalised task scores of the finished path(s).
      length: ``[...]`` path lengths T.
      params: the env params (preference ``[..., K]`` broadcast against ``scores``).
    """
    weighted = weighted_sum(scores, params.preference)
    return length_penalised(weighted, length.astype(jnp.float32), params.beta1, params.t_max)


def host_reward(normalised_scores, preference, length, beta1: float, t_max: int) -> np.ndarray:
    """The reward ``R = sum_k lambda_k f_k - beta1 * T / T_max`` of finished paths, on the host in float64.

    `episode_return`'s equation (HM3_SPEC "Reward"), for ranking and confirming paths outside the trainer
    (local search, brute-force optima, benchmarks).

    Args:
      normalised_scores: ``[..., K]`` task scores of the paths, normalised by the ideal point.
      preference: ``[K]`` lambda.
      length: ``[...]`` path lengths T.
      beta1, t_max: the length penalty's weight and the maximum path length.

    Returns:
      ``[...]`` float64 rewards.
    """
    s = np.asarray(normalised_scores, np.float64)
    return length_penalised(s @ np.asarray(preference, np.float64), np.asarray(length), beta1, t_max)


def credit_rewards(episode_returns: jax.Array, decision_mask: jax.Array) -> jax.Array:
    """Credits each episode's return evenly over its decisions: ``r_t = R / D`` on the ``D`` decisions.

    Args:
      episode_returns: ``[N]`` returns R.
      decision_mask: ``[T, N]`` bool/float, 1 where step ``t`` of episode ``n`` was a decision of the episode.

    Returns:
      ``[T, N]`` float32 rewards (0 where ``decision_mask`` is 0); each column sums to ``R``.
    """
    mask = decision_mask.astype(jnp.float32)
    num_decisions = jnp.maximum(mask.sum(axis=0), 1.0)
    return mask * (episode_returns / num_decisions)[None, :]
