"""Llama family as pure functions: Llama-2/3, Mistral, Qwen2/2.5 (`config.family == "llama"`).

Architecture (Touvron et al. 2023): pre-norm decoder blocks
    h = h + o(attn(rope(q(rms(h))), rope(k(rms(h))), v(rms(h))))      # causal, grouped-query
    h = h + down(silu(gate(rms(h))) * up(rms(h)))                      # SwiGLU (Shazeer 2020)
then a final RMSNorm and the LM head (untied `head/kernel`, or the transposed embedding when tied).

Param layout (D = hidden_size, F = intermediate_size, V = vocab_size, L = num_layers, H = num_heads,
KV = kv heads, hd = head_size). Kernels are [in, out] (the transpose of PyTorch's `nn.Linear.weight`):

    embed/embedding            [V, D]            model.embed_tokens.weight
    blocks/attn_norm/scale     [L, D]            model.layers.{l}.input_layernorm.weight
    blocks/q/kernel            [L, D, H*hd]      model.layers.{l}.self_attn.q_proj.weight  (transposed)
    blocks/q/bias              [L, H*hd]         ... q_proj.bias       (only if config.attention_bias)
    blocks/k/kernel            [L, D, KV*hd]     ... k_proj.weight     (transposed)
    blocks/k/bias              [L, KV*hd]        ... k_proj.bias       (only if config.attention_bias)
    blocks/v/kernel            [L, D, KV*hd]     ... v_proj.weight     (transposed)
    blocks/v/bias              [L, KV*hd]        ... v_proj.bias       (only if config.attention_bias)
    blocks/o/kernel            [L, H*hd, D]      ... o_proj.weight     (transposed)
    blocks/o/bias              [L, D]            ... o_proj.bias       (only if config.attention_out_bias)
    blocks/mlp_norm/scale      [L, D]            model.layers.{l}.post_attention_layernorm.weight
    blocks/gate/kernel         [L, D, F]         model.layers.{l}.mlp.gate_proj.weight (transposed)
    blocks/up/kernel           [L, D, F]         model.layers.{l}.mlp.up_proj.weight   (transposed)
    blocks/down/kernel         [L, F, D]         model.layers.{l}.mlp.down_proj.weight (transposed)
    blocks/{gate,up,down}/bias [L, F] / [L, D]   (only if config.mlp_bias)
    final/norm/scale           [D]               model.norm.weight
    head/kernel                [D, V]            lm_head.weight (transposed); `head` is {} when tied

Positions: without `attention_mask` they are `0..S-1`; with one they are `cumsum(mask) - 1` (clipped at 0),
as HF `generate` does, so left-padded prompts see RoPE positions 0, 1, ... on their real tokens.
Deviation from HF's Flax classes (which ignore them): `rope_theta`, `rope_scaling` and `head_dim` are
honoured, as in HF's PyTorch classes.
`sliding_window` follows PyTorch Mistral (key visible iff `i - j < window`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hm3_jax.models import layers
from hm3_jax.models.config import ModelConfig


def init(config: ModelConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """Random params in the layout above: kernels and embedding `N(0, initializer_range^2)`, norms 1, biases 0.

    Args: config (family "llama"); key: PRNG key; dtype of every leaf.
    Returns: {"embed", "blocks", "final", "head"}; every `blocks` leaf has a leading axis L.
    """
    n, d, f, v = config.num_layers, config.hidden_size, config.intermediate_size, config.vocab_size
    q_dim, kv_dim = config.num_heads * config.head_size, config.kv_heads * config.head_size
    spec = {
        "embed": {"embedding": ("normal", (v, d))},
        "blocks": {
            "attn_norm": {"scale": ("ones", (n, d))},
            "q": layers.dense_spec((n, d, q_dim), config.attention_bias),
            "k": layers.dense_spec((n, d, kv_dim), config.attention_bias),
            "v": layers.dense_spec((n, d, kv_dim), config.attention_bias),
            "o": layers.dense_spec((n, q_dim, d), config.attention_out_bias),
            "mlp_norm": {"scale": ("ones", (n, d))},
            "gate": layers.dense_spec((n, d, f), config.mlp_bias),
            "up": layers.dense_spec((n, d, f), config.mlp_bias),
            "down": layers.dense_spec((n, f, d), config.mlp_bias),
        },
        "final": {"norm": {"scale": ("ones", (d,))}},
        "head": {} if config.tie_word_embeddings else {"kernel": ("normal", (d, v))},
    }
    return layers.materialize(spec, key, config.initializer_range, dtype)


def make_ctx(config: ModelConfig, positions: jax.Array, mask: jax.Array, cache_index=None) -> dict:
    """Block context: RoPE tables for `positions` [B, S] and the boolean attention `mask` [B, 1, S, Sk].

    `cache_index` (scalar int32) is the cache slot of the first query when blocks run with a KV cache.
    """
    sin, cos = layers.rope_tables(config, positions)
    ctx = {"sin": sin, "cos": cos, "mask": mask}
    if cache_index is not None:
        ctx["cache_index"] = jnp.asarray(cache_index, jnp.int32)
    return ctx


def embed_tokens(config: ModelConfig, shell: dict, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
    """Token embeddings h [B, S, D] (positions enter through RoPE in the blocks, so they are unused here)."""
    del config, positions
    return jnp.take(shell["embed"]["embedding"], input_ids, axis=0)


def embed(config: ModelConfig, shell: dict, input_ids: jax.Array, attention_mask: jax.Array | None = None):
    """Token embedding and block context.

    Args: input_ids int [B, S]; attention_mask [B, S] (1 = real token) or None (all real).
    Returns: (h [B, S, D] in the embedding dtype, ctx {"sin", "cos": [B, S, hd], "mask": bool [B, 1, S, S]}).
    """
    attention_mask, positions = layers.mask_and_positions(input_ids, attention_mask)
    slots = jnp.arange(input_ids.shape[1])
    mask = layers.causal_mask(slots, slots, attention_mask, config.sliding_window)
    return embed_tokens(config, shell, input_ids, positions), make_ctx(config, positions, mask)


def block_with_cache(config: ModelConfig, p: dict, h: jax.Array, ctx: dict, cache: tuple | None):
    """One decoder block, optionally reading and writing a KV cache.

    Args:
      p: one slice of params["blocks"] (leaves without the L axis); h [B, S, D]; ctx from `embed`/`make_ctx`.
      cache: None, or (k, v) each [B, KV, S_total, hd] (head-major); the new keys/values are written at slots
        `ctx["cache_index"] + 0..S-1` and the queries attend over all S_total slots with `ctx["mask"]`
        [B, 1, S, S_total].
    Returns: (h [B, S, D], updated cache or None).
    """
    b, s, _ = h.shape
    hd = config.head_size
    x = layers.rms_norm(p["attn_norm"]["scale"], h, config.norm_eps)
    q = layers.dense(p["q"], x).reshape(b, s, config.num_heads, hd)
    k = layers.dense(p["k"], x).reshape(b, s, config.kv_heads, hd)
    v = layers.dense(p["v"], x).reshape(b, s, config.kv_heads, hd)
    q = layers.apply_rope(q, ctx["sin"], ctx["cos"])
    k = layers.apply_rope(k, ctx["sin"], ctx["cos"])
    if cache is not None:
        cache = layers.write_cache(cache, k, v, ctx["cache_index"])
        attn = layers.attention(q, cache[0], cache[1], ctx["mask"], kv_head_major=True)
    else:
        attn = layers.attention(q, k, v, ctx["mask"])
    attn = attn.reshape(b, s, config.num_heads * hd)
    h = h + layers.dense(p["o"], attn).astype(h.dtype)
    x = layers.rms_norm(p["mlp_norm"]["scale"], h, config.norm_eps)
    gated = layers.activation(config.hidden_act, layers.dense(p["gate"], x)) * layers.dense(p["up"], x)
    h = h + layers.dense(p["down"], gated).astype(h.dtype)
    return h, cache


def block(config: ModelConfig, p: dict, h: jax.Array, ctx: dict) -> jax.Array:
    """One decoder block (no cache). p: one slice of params["blocks"]; h [B, S, D] -> [B, S, D]."""
    return block_with_cache(config, p, h, ctx, None)[0]


def head(config: ModelConfig, shell: dict, h: jax.Array) -> jax.Array:
    """Final RMSNorm and LM head: h [B, S, D] -> logits [B, S, V] (float32)."""
    x = layers.rms_norm(shell["final"]["norm"]["scale"], h, config.norm_eps)
    if config.tie_word_embeddings:
        kernel = shell["embed"]["embedding"].T
    else:
        kernel = shell["head"]["kernel"]
    return layers.einsum_f32("bsd,dv->bsv", x.astype(kernel.dtype), kernel)


def apply(config: ModelConfig, params: dict, input_ids: jax.Array, attention_mask: jax.Array | None = None):
    """Full forward: input_ids [B, S] (attention_mask [B, S] optional) -> logits [B, S, V] float32.

    Blocks run with `lax.scan` over the stacked L axis.
    """
    h, ctx = embed(config, params, input_ids, attention_mask)

    def step(h, p):
        return block(config, p, h, ctx), None

    h, _ = jax.lax.scan(step, h, params["blocks"])
    return head(config, params, h)
