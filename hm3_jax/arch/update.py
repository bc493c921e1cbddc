"""The PPO update of one rollout (HM3 Sec. 3.2, Alg. 1): rewards, GAE, clipped losses, minibatch epochs.

1. **Rewards**: the finished paths' scores give ``R = sum_k lambda_k f_k - beta1 T / t_max``
   (``env.episode_return``), credited ``R / D`` to each of the episode's ``D`` decisions (``env.credit_rewards``).
2. **GAE** (:func:`gae`, reverse ``lax.scan``, gamma = 0.99 as in the paper), advantages normalised over the
   decisions.
3. ``update_epochs`` x ``num_minibatches`` PPO steps (:func:`clipped_loss`: clipped surrogate on the proto-action
   log-prob, clipped value loss, entropy bonus; optax adam with global-norm clipping). Steps that are not
   decisions carry zero weight in every loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from hm3_jax.arch import env as env_lib
from hm3_jax.arch import network as network_lib
from hm3_jax.arch.config import ArchConfig
from hm3_jax.arch.rollout import Batch, RunnerState, env_params


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


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """``sum(x * mask) / max(sum(mask), 1)``."""
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_optimiser(config: ArchConfig) -> optax.GradientTransformation:
    """Adam (eps 1e-5) after global-norm clipping at ``max_grad_norm``."""
    return optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm), optax.adam(config.learning_rate, eps=1e-5)
    )


def clipped_loss(
    config: ArchConfig, log_prob: jax.Array, log_std: jax.Array, value: jax.Array, mb: dict
) -> tuple[jax.Array, dict]:
    """PPO's loss on a minibatch of ``B`` samples under the current policy.

    ``ratio = exp(log_prob - mb.log_prob)``; policy loss ``-mean(min(ratio A, clip(ratio, 1 +- eps) A))``;
    value loss ``0.5 mean(max((V - G)^2, (V_old + clip(V - V_old, +-eps) - G)^2))``; entropy of the Gaussian;
    ``total = policy + vf_coef value - ent_coef entropy``; every mean over ``mb["mask"]`` (decisions only).

    Args:
      log_prob: ``[B]`` the sampled proto-actions' log-probs now; log_std: ``[B, E]``; value: ``[B]``.
      mb: ``log_prob``, ``value``, ``advantage``, ``target``, ``mask`` ``[B]`` from the rollout and GAE.
    Returns: ``(total, {"policy_loss", "value_loss", "entropy", "approx_kl"})``.
    """
    ratio = jnp.exp(log_prob - mb["log_prob"])
    adv = mb["advantage"]
    surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - config.clip_eps, 1.0 + config.clip_eps) * adv)
    policy_loss = -masked_mean(surrogate, mb["mask"])
    value_clipped = mb["value"] + jnp.clip(value - mb["value"], -config.clip_eps, config.clip_eps)
    value_loss = 0.5 * masked_mean(
        jnp.maximum((value - mb["target"]) ** 2, (value_clipped - mb["target"]) ** 2), mb["mask"]
    )
    entropy = masked_mean(network_lib.gaussian_entropy(log_std), mb["mask"])
    total = policy_loss + config.vf_coef * value_loss - config.ent_coef * entropy
    approx_kl = masked_mean(mb["log_prob"] - log_prob, mb["mask"])
    return total, {
        "policy_loss": policy_loss,
        "value_loss": value_loss,
        "entropy": entropy,
        "approx_kl": approx_kl,
    }


def update(
    config: ArchConfig,
    network: network_lib.ActorCritic,
    optimiser: optax.GradientTransformation,
    table: jax.Array,
    runner: RunnerState,
    batch: Batch,
    scores: jax.Array,
) -> tuple[RunnerState, dict]:
    """One PPO update from a rollout's ``batch`` and its finished paths' ``scores [N, K]`` (module docstring).

    Returns the runner (new params, optimiser state, key, iteration + 1) and scalar metrics.
    """
    ep = env_params(config, batch.preference)
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
    adv_mean = masked_mean(advantages, mask)
    adv_std = jnp.sqrt(masked_mean((advantages - adv_mean) ** 2, mask))
    advantages = (advantages - adv_mean) / (adv_std + 1e-8)

    num_samples = config.t_max * config.num_envs
    flat = {
        "path": batch.path.reshape(num_samples, config.t_max),
        "length": batch.length.reshape(num_samples),
        "preference": jnp.broadcast_to(batch.preference, (config.t_max,) + batch.preference.shape).reshape(
            num_samples, -1
        ),
        "descriptor_row": jnp.broadcast_to(batch.descriptor_row, (config.t_max, config.num_envs)).reshape(
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
        def one(path, length, preference, descriptor_row):
            carry = network.apply(params, path, length, preference, table[descriptor_row], method="encode")
            return network.apply(params, carry, preference, method="heads")

        mean, log_std, value = jax.vmap(one)(mb["path"], mb["length"], mb["preference"], mb["descriptor_row"])
        log_prob = network_lib.gaussian_log_prob(mb["proto"], mean, log_std)
        return clipped_loss(config, log_prob, log_std, value, mb)

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
            "explored_fraction": masked_mean(batch.explored.astype(jnp.float32), mask),
            "stop_fraction": jnp.mean(batch.final_length < config.t_max),
            "iteration": runner.iteration + 1,
        }
    )
    new_runner = RunnerState(params, opt_state, key, runner.iteration + 1)
    return new_runner, metrics
