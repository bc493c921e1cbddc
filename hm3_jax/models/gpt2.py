"""GPT-2 as pure functions (`config.family == "gpt2"`; Radford et al. 2019).

Learned token + position embeddings, pre-LayerNorm blocks with biased q/k/v/o and a GELU (tanh, `gelu_new`)
MLP, final LayerNorm, LM head tied to the token embedding (`head` is {}).

Param layout (D = hidden_size, F = intermediate_size (HF `n_inner`, default 4D), V = vocab, P = n_positions).
HF's PyTorch `Conv1D` weights are already [in, out]; the fused `c_attn` [D, 3D] is split into q | k | v:

    embed/embedding        [V, D]       transformer.wte.weight
    embed/position         [P, D]       transformer.wpe.weight
    blocks/attn_norm/{scale,bias} [L, D]    transformer.h.{l}.ln_1.{weight,bias}
    blocks/{q,k,v}/kernel  [L, D, D]    transformer.h.{l}.attn.c_attn.weight[:, i*D:(i+1)*D]
    blocks/{q,k,v}/bias    [L, D]       transformer.h.{l}.attn.c_attn.bias[i*D:(i+1)*D]
    blocks/o/{kernel,bias} [L, D, D], [L, D]    transformer.h.{l}.attn.c_proj
    blocks/mlp_norm/{scale,bias} [L, D]     transformer.h.{l}.ln_2
    blocks/up/{kernel,bias}   [L, D, F], [L, F]  transformer.h.{l}.mlp.c_fc
    blocks/down/{kernel,bias} [L, F, D], [L, D]  transformer.h.{l}.mlp.c_proj
    final/norm/{scale,bias}   [D]       transformer.ln_f

Positions: `0..S-1`, or `cumsum(attention_mask) - 1` (clipped at 0) when a mask is given (as HF `generate`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hm3_jax.models import layers
from hm3_jax.models.config import ModelConfig


def init(config: ModelConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """Random params in the layout above (kernels and embeddings `N(0, initializer_range^2)`, norms 1,
    biases 0)."""
    d = config.hidden_size
    spec = {
        "embed": {
            "embedding": ("normal", (config.vocab_size, d)),
            "position": ("normal", (config.max_position_embeddings, d)),
        },
        "blocks": layers.layernorm_blocks_spec(config, qkv_bias=True),
        "final": {"norm": {"scale": ("ones", (d,)), "bias": ("zeros", (d,))}},
        "head": {},
    }
    return layers.materialize(spec, key, config.initializer_range, dtype)


def embed_tokens(config: ModelConfig, shell: dict, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
    """`wte[ids] + wpe[positions]`: ids, positions [B, S] -> h [B, S, D]."""
    del config
    e = shell["embed"]
    return jnp.take(e["embedding"], input_ids, axis=0) + jnp.take(e["position"], positions, axis=0)


def make_ctx(config: ModelConfig, positions: jax.Array, mask: jax.Array, cache_index=None) -> dict:
    """Block context: the boolean attention mask [B, 1, S, Sk] (and the cache slot when decoding)."""
    del config, positions
    ctx = {"mask": mask}
    if cache_index is not None:
        ctx["cache_index"] = jnp.asarray(cache_index, jnp.int32)
    return ctx


def embed(config: ModelConfig, shell: dict, input_ids: jax.Array, attention_mask: jax.Array | None = None):
    """input_ids [B, S] (attention_mask [B, S] optional) -> (h [B, S, D], ctx {"mask": [B, 1, S, S]})."""
    attention_mask, positions = layers.mask_and_positions(input_ids, attention_mask)
    s = input_ids.shape[1]
    if s > config.max_position_embeddings:
        raise ValueError(
            f"sequence length {s} exceeds max_position_embeddings={config.max_position_embeddings}"
        )
    slots = jnp.arange(s)
    mask = layers.causal_mask(slots, slots, attention_mask)
    return embed_tokens(config, shell, input_ids, positions), make_ctx(config, positions, mask)


def block_with_cache(config: ModelConfig, p: dict, h: jax.Array, ctx: dict, cache: tuple | None):
    """One GPT-2 block with an optional KV cache (see `layers.layernorm_block_with_cache`)."""
    return layers.layernorm_block_with_cache(config, p, h, ctx, cache)


def block(config: ModelConfig, p: dict, h: jax.Array, ctx: dict) -> jax.Array:
    """One GPT-2 block: h [B, S, D] -> [B, S, D]."""
    return layers.layernorm_block_with_cache(config, p, h, ctx, None)[0]


def head(config: ModelConfig, shell: dict, h: jax.Array) -> jax.Array:
    """Final LayerNorm and tied LM head: h [B, S, D] -> logits [B, S, V] float32."""
    x = layers.layer_norm(shell["final"]["norm"], h, config.norm_eps)
    wte = shell["embed"]["embedding"]
    return layers.einsum_f32("bsd,vd->bsv", x.astype(wte.dtype), wte)


def apply(config: ModelConfig, params: dict, input_ids: jax.Array, attention_mask: jax.Array | None = None):
    """Full forward: input_ids [B, S] -> logits [B, S, V] float32 (`lax.scan` over the stacked blocks)."""
    h, ctx = embed(config, params, input_ids, attention_mask)
    h, _ = jax.lax.scan(lambda h, p: (block(config, p, h, ctx), None), h, params["blocks"])
    return head(config, params, h)
