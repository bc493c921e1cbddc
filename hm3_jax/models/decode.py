"""Greedy decoding with a KV cache along a layer path (DESIGN: `greedy_decode`).

Left-padded prompts: `prompt_mask` is 1 on real tokens; RoPE/learned positions are `cumsum(mask) - 1`, so the
first real token of every row is position 0 and the n-th generated token of a row with `n_real` prompt tokens
is at position `n_real + n`, exactly as HF `generate` does.

KV cache: k and v of shape [T_max, B, S_total, KV, hd] with `S_total = S_prompt + max_new_tokens`, one slot
per *path step* (a pool block can repeat in a path and then sees different inputs at each occurrence). Slots
`0..S_prompt-1` hold the prompt; the token generated at step n is written to slot `S_prompt + n`.
A query at slot i sees key slot j iff `j <= i` and the key is a real token (prompt padding is masked).
Padding path steps (`-1`) leave both h and their cache slot untouched.

Everything is traced (path, junction, prompts), so one compilation serves every path of a given T_max.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hm3_jax.models import layers
from hm3_jax.models.config import ModelConfig
from hm3_jax.models.path import _family, _is_concrete, check_junction, pool_size, validate_path

LM_FAMILIES = ("llama", "gpt2")


def _path_with_cache(config, module, pool, path, junction, h, ctx, cache_k, cache_v):
    """Runs h [B, s, D] along the path, reading/writing per-step caches [T_max, B, S_total, KV, hd]."""
    scales, shifts = junction["scale"], junction["shift"]

    def step(h, xs):
        idx, scale, shift, k, v = xs

        def run(operand):
            h, k, v = operand
            p = jax.tree.map(lambda leaf: jax.lax.dynamic_index_in_dim(leaf, idx, 0, keepdims=False), pool)
            x = (h * scale + shift).astype(h.dtype)
            h, (k, v) = module.block_with_cache(config, p, x, ctx, (k, v))
            return h, k, v

        h, k, v = jax.lax.cond(idx >= 0, run, lambda operand: operand, (h, k, v))
        return h, (k, v)

    h, (cache_k, cache_v) = jax.lax.scan(step, h, (path, scales, shifts, cache_k, cache_v))
    return h, cache_k, cache_v


def greedy_decode(
    config: ModelConfig,
    shell: dict,
    pool: dict,
    path: jax.Array,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    max_new_tokens: int,
    junction: dict | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> jax.Array:
    """Greedy (argmax) generation along a layer path with a per-step KV cache.

    Args:
      config: LM config (family "llama" or "gpt2"); static under jit, as are `max_new_tokens`, `eos_id`,
        `pad_id`.
      shell: embeddings, final norm and head; pool: stacked blocks [P, ...].
      path: int32 [T_max], -1 = padding.
      prompt_ids: int [B, S_prompt], left-padded; prompt_mask: [B, S_prompt], 1 on real tokens
        (every row needs at least one real token).
      max_new_tokens: number of tokens to generate (static).
      junction: None or {"scale", "shift"}: [T_max, D], applied before each step as in `apply_path`.
      eos_id: if set, once a row emits `eos_id` every later token of that row is `pad_id`.
    Returns: tokens int32 [B, max_new_tokens].
    """
    if config.family not in LM_FAMILIES:
        raise ValueError(f"greedy_decode needs a language model family {LM_FAMILIES}, got {config.family!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(
            f"prompt_ids {prompt_ids.shape} and prompt_mask {prompt_mask.shape} must both be [B, S_prompt]"
        )
    module = _family(config)
    if _is_concrete(path):
        validate_path(path, pool_size(pool))
    path = jnp.asarray(path, jnp.int32)
    t_max = path.shape[0]
    d = config.hidden_size
    check_junction(junction, t_max, d)
    dtype = jax.tree.leaves(shell["embed"])[0].dtype
    if junction is None:
        junction = {"scale": jnp.ones((t_max, d), dtype), "shift": jnp.zeros((t_max, d), dtype)}

    b, s_prompt = prompt_ids.shape
    s_total = s_prompt + max_new_tokens
    if s_total > config.max_position_embeddings and config.family == "gpt2":
        raise ValueError(f"prompt + new tokens = {s_total} exceeds max_position_embeddings")
    prompt_mask = prompt_mask.astype(jnp.int32)
    key_mask = jnp.concatenate(
        [prompt_mask, jnp.ones((b, max_new_tokens), jnp.int32)], axis=1
    )  # [B, S_total]
    slots = jnp.arange(s_total)
    cache_shape = (t_max, b, s_total, config.kv_heads, config.head_size)
    cache_k = jnp.zeros(cache_shape, dtype)
    cache_v = jnp.zeros(cache_shape, dtype)

    # Prefill: the whole prompt in one pass, writing cache slots 0..S_prompt-1.
    positions = layers.positions_from_mask(prompt_mask)  # [B, S_prompt]
    mask = layers.causal_mask(slots[:s_prompt], slots, key_mask, config.sliding_window)
    ctx = module.make_ctx(config, positions, mask, cache_index=0)
    h = module.embed_tokens(config, shell, prompt_ids, positions)
    h, cache_k, cache_v = _path_with_cache(config, module, pool, path, junction, h, ctx, cache_k, cache_v)
    first = jnp.argmax(module.head(config, shell, h[:, -1:])[:, 0], axis=-1).astype(jnp.int32)  # [B]
    num_real = jnp.sum(prompt_mask, axis=1)  # [B]

    def step(carry, n):
        token, done, cache_k, cache_v = carry
        slot = s_prompt + n
        pos = (num_real + n)[:, None]  # [B, 1]
        mask = layers.causal_mask(slot[None], slots, key_mask, config.sliding_window)
        ctx = module.make_ctx(config, pos, mask, cache_index=slot)
        h = module.embed_tokens(config, shell, token[:, None], pos)
        h, cache_k, cache_v = _path_with_cache(config, module, pool, path, junction, h, ctx, cache_k, cache_v)
        nxt = jnp.argmax(module.head(config, shell, h)[:, 0], axis=-1).astype(jnp.int32)
        if eos_id is not None:
            done = done | (token == eos_id)
            nxt = jnp.where(done, pad_id, nxt)
        return (nxt, done, cache_k, cache_v), token

    done0 = jnp.zeros((b,), bool)
    carry = (first, done0, cache_k, cache_v)
    # The last token never needs its own forward pass: scan max_new_tokens - 1 steps, then append it.
    (last, done, _, _), tokens = jax.lax.scan(step, carry, jnp.arange(max_new_tokens - 1))
    tokens = jnp.concatenate([tokens, last[None]], axis=0).T  # [B, max_new_tokens]
    return tokens
