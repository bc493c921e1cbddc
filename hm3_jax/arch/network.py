"""Preference-conditioned actor-critic over layer paths (HM3_SPEC "The path MDP": actor, critic).

State encoder: a GRU over step tokens ``x_j = [emb_m(m_j); emb_l(l_j); W phi(block_j); emb_t(j)]`` for the blocks
``j < length`` of the path (padding steps leave the carry unchanged), started from ``tanh(W_0 lambda)`` so that
the preference conditions the whole encoding. Heads on ``[h; lambda]``:

* actor: Gaussian proto-action ``N(mu(S), diag(exp(log_std)^2))`` in the action-embedding space
  (``descriptors.action_embeddings``), ``log_std`` a state-independent learned vector (as in purejaxrl's
  continuous PPO), clipped to ``[-5, 2]``;
* critic: ``V(S)``.

Every method works on ONE state (no batch axis); callers vmap. ``extend`` appends one more token to an encoded
state without re-running the GRU over the path, which Wolpertinger uses for ``Q(S, a) = gamma * V(S + a)``.
STOP is encoded as source ``num_sources`` (its own embedding), block 0 and a zero descriptor.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LOG_STD_MIN = -5.0
LOG_STD_MAX = 2.0


class ActorCritic(nn.Module):
    """GRU encoder + Gaussian proto-action head + value head.

    Attributes:
      num_sources: K + 1. num_layers: L. t_max: maximum path length.
      action_dim: size E of the action-embedding space.
      hidden_size: GRU/MLP width. embed_size: width of each token embedding.
      init_log_std: initial value of the proto-action log-std.
    """

    num_sources: int
    num_layers: int
    t_max: int
    action_dim: int
    hidden_size: int = 64
    embed_size: int = 16
    init_log_std: float = -0.5

    def setup(self):
        self.emb_m = nn.Embed(self.num_sources + 1, self.embed_size)
        self.emb_l = nn.Embed(self.num_layers, self.embed_size)
        self.emb_t = nn.Embed(self.t_max + 1, self.embed_size)
        self.phi_proj = nn.Dense(self.embed_size)
        self.pref_proj = nn.Dense(self.hidden_size)
        token_size = 4 * self.embed_size
        glorot = nn.initializers.glorot_uniform()
        self.gru_wi = self.param("gru_wi", glorot, (token_size, 3 * self.hidden_size))
        self.gru_wh = self.param(
            "gru_wh", nn.initializers.orthogonal(), (self.hidden_size, 3 * self.hidden_size)
        )
        self.gru_b = self.param("gru_b", nn.initializers.zeros, (3 * self.hidden_size,))
        orth = nn.initializers.orthogonal
        self.actor_1 = nn.Dense(self.hidden_size, kernel_init=orth(np.sqrt(2)))
        self.actor_2 = nn.Dense(self.hidden_size, kernel_init=orth(np.sqrt(2)))
        self.actor_mean = nn.Dense(self.action_dim, kernel_init=orth(0.01))
        self.log_std = self.param("log_std", nn.initializers.constant(self.init_log_std), (self.action_dim,))
        self.critic_1 = nn.Dense(self.hidden_size, kernel_init=orth(np.sqrt(2)))
        self.critic_2 = nn.Dense(self.hidden_size, kernel_init=orth(np.sqrt(2)))
        self.critic_out = nn.Dense(1, kernel_init=orth(1.0))

    def token(self, action: jax.Array, position: jax.Array, phi: jax.Array) -> jax.Array:
        """Token ``[..., 4 * embed]`` of ``action [...]`` (pool index or STOP = P) taken at step ``position [...]``;
        ``phi [P, d]``."""
        pool_size = self.num_sources * self.num_layers
        is_stop = action >= pool_size
        safe = jnp.clip(action, 0, pool_size - 1)
        source = jnp.where(is_stop, self.num_sources, safe // self.num_layers)
        layer = jnp.where(is_stop, 0, safe % self.num_layers)
        descriptor = jnp.where(is_stop[..., None], 0.0, phi[safe])
        return jnp.concatenate(
            [
                self.emb_m(source),
                self.emb_l(layer),
                self.phi_proj(descriptor),
                self.emb_t(jnp.clip(position, 0, self.t_max)),
            ],
            axis=-1,
        )

    def encode(self, path: jax.Array, length: jax.Array, preference: jax.Array, phi: jax.Array) -> jax.Array:
        """GRU state ``h [hidden]`` of ``path [t_max]`` (its first ``length`` entries) under ``preference``.

        The tokens of all steps are embedded at once; the recurrence is a ``lax.scan`` over plain arrays (no
        submodule calls inside it), which keeps compile time low.
        """
        positions = jnp.arange(self.t_max)
        tokens = self.token(path, positions, phi)  # [t_max, 4 * embed]
        params = (self.gru_wi, self.gru_wh, self.gru_b)

        def body(carry, x):
            token, j = x
            return jnp.where(j < length, gru_step(params, carry, token), carry), None

        carry, _ = jax.lax.scan(body, jnp.tanh(self.pref_proj(preference)), (tokens, positions))
        return carry

    def extend(self, carry: jax.Array, action: jax.Array, position: jax.Array, phi: jax.Array) -> jax.Array:
        """GRU state of the path extended by ``action`` at step ``position`` (the state ``S + a``)."""
        return gru_step((self.gru_wi, self.gru_wh, self.gru_b), carry, self.token(action, position, phi))

    def heads(self, carry: jax.Array, preference: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(mean [E], log_std [E], value [])`` of the encoded state."""
        x = jnp.concatenate([carry, preference])
        a = nn.tanh(self.actor_2(nn.tanh(self.actor_1(x))))
        mean = self.actor_mean(a)
        log_std = jnp.clip(self.log_std, LOG_STD_MIN, LOG_STD_MAX)
        c = nn.tanh(self.critic_2(nn.tanh(self.critic_1(x))))
        value = self.critic_out(c)[0]
        return mean, log_std, value

    def value(self, carry: jax.Array, preference: jax.Array) -> jax.Array:
        """``V`` of an encoded state."""
        return self.heads(carry, preference)[2]

    def __call__(self, path, length, preference, phi):
        """Encode then heads; also touches ``extend`` so that ``init`` creates every parameter."""
        carry = self.encode(path, length, preference, phi)
        carry = jnp.where(False, self.extend(carry, path[0], length, phi), carry)
        return self.heads(carry, preference)


def gru_step(params: tuple[jax.Array, jax.Array, jax.Array], h: jax.Array, x: jax.Array) -> jax.Array:
    """One GRU step (Cho et al. 2014), gates ordered (reset r, update z, candidate n):

    ``r = sigma(x W_ir + h W_hr + b_r)``, ``z = sigma(x W_iz + h W_hz + b_z)``,
    ``n = tanh(x W_in + b_n + r * (h W_hn))``, ``h' = (1 - z) * n + z * h``.
    """
    w_i, w_h, b = params
    gi = x @ w_i + b
    gh = h @ w_h
    size = h.shape[-1]
    r = jax.nn.sigmoid(gi[..., :size] + gh[..., :size])
    z = jax.nn.sigmoid(gi[..., size : 2 * size] + gh[..., size : 2 * size])
    n = jnp.tanh(gi[..., 2 * size :] + r * gh[..., 2 * size :])
    return (1.0 - z) * n + z * h


def gaussian_log_prob(x: jax.Array, mean: jax.Array, log_std: jax.Array) -> jax.Array:
    """``log N(x; mean, diag(exp(2 log_std)))`` summed over the last axis."""
    z = (x - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * z**2 - log_std - 0.5 * jnp.log(2 * jnp.pi), axis=-1)


def gaussian_entropy(log_std: jax.Array) -> jax.Array:
    """Entropy of a diagonal Gaussian, ``sum_i (log_std_i + 0.5 * log(2 pi e))``."""
    return jnp.sum(log_std + 0.5 * jnp.log(2 * jnp.pi * jnp.e), axis=-1)
