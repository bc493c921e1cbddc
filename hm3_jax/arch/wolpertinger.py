"""Wolpertinger action selection (Dulac-Arnold et al. 2015; HM3_SPEC "The path MDP").

Given a proto-action ``a_hat`` in the action-embedding space: take the ``k`` valid discrete actions nearest to it
(Euclidean), score each with the critic proxy ``Q(S, a) = gamma * V(S + a)``, and pick the best with probability
``1 - eps`` or a uniformly random one of the ``k`` otherwise. Invalid actions (``valid == False``, e.g. STOP before
``t_min``) are never candidates. PPO's log-prob is that of ``a_hat`` under the Gaussian, so this selection is part of
the environment from PPO's point of view.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def nearest_actions(
    proto: jax.Array, embeddings: jax.Array, valid: jax.Array, k: int
) -> tuple[jax.Array, jax.Array]:
    """The ``k`` valid actions nearest to ``proto``.

    Args:
      proto: ``[E]`` proto-action. embeddings: ``[A, E]`` action embeddings. valid: ``[A]`` bool. k: static, <= A.

    Returns:
      ``(candidates [k] int32, candidate_valid [k] bool)``, nearest first; ``candidate_valid`` is False only when
      fewer than ``k`` actions are valid.
    """
    dist2 = jnp.sum((embeddings - proto) ** 2, axis=-1)
    score = jnp.where(valid, -dist2, -jnp.inf)
    _, candidates = jax.lax.top_k(score, k)
    return candidates.astype(jnp.int32), valid[candidates]


def select_action(
    key: jax.Array,
    proto: jax.Array,
    embeddings: jax.Array,
    valid: jax.Array,
    q_fn: Callable[[jax.Array], jax.Array],
    k: int,
    eps: float | jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Wolpertinger selection.

    Args:
      key: PRNG key (exploration coin and uniform pick).
      proto: ``[E]``; embeddings: ``[A, E]``; valid: ``[A]`` bool.
      q_fn: ``candidates [k] int32 -> Q values [k]`` (``gamma * V(S + a)``).
      k: number of nearest candidates M' (static; clipped to A).
      eps: exploration probability.

    Returns:
      ``(action int32 [], info)`` with ``info = {"candidates" [k], "q" [k], "explored" []}``.
    """
    k = min(int(k), embeddings.shape[0])
    candidates, cand_valid = nearest_actions(proto, embeddings, valid, k)
    q = jnp.where(cand_valid, q_fn(candidates), -jnp.inf)
    best = candidates[jnp.argmax(q)]
    key_coin, key_pick = jax.random.split(key)
    explored = jax.random.uniform(key_coin) < eps
    logits = jnp.where(cand_valid, 0.0, -jnp.inf)
    random_pick = candidates[jax.random.categorical(key_pick, logits)]
    action = jnp.where(explored, random_pick, best)
    return action, {"candidates": candidates, "q": q, "explored": explored}
