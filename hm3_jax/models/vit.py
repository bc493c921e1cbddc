"""Vision Transformer as pure functions, Hugging Face `ViTModel` layout (`config.family == "vit"`).

Dosovitskiy et al. 2021, eq. 1-4: non-overlapping p x p patches are flattened and projected (the patch
convolution written as a matmul), a learned CLS token is prepended, learned position embeddings are added,
then pre-LayerNorm blocks (GELU MLP, no causal mask) and a final LayerNorm.

Inputs: `pixel_values` float [B, C, H, W] (NCHW, as HF's `pixel_values`).
Outputs of `head`/`apply`: the final hidden states [B, N+1, D] (HF `last_hidden_state`; N = number of
patches, index 0 is CLS) when `config.num_labels == 0`, else class logits [B, num_labels] from the CLS token
(HF `ViTForImageClassification`). HF's pooler is not used (ViTForImageClassification has none).

Param layout (D = hidden, F = intermediate, p = patch_size, C = channels):

    embed/patch/kernel     [p*p*C, D]   vit.embeddings.patch_embeddings.projection.weight [D, C, p, p]
                                        transposed to [p, p, C, D] (row-major: patch row, column, channel)
    embed/patch/bias       [D]          ...projection.bias
    embed/cls              [D]          vit.embeddings.cls_token [1, 1, D]
    embed/position         [N+1, D]     vit.embeddings.position_embeddings [1, N+1, D]
    blocks/attn_norm/{scale,bias} [L, D]     vit.encoder.layer.{l}.layernorm_before
    blocks/{q,k,v}/kernel  [L, D, D]    ...attention.attention.{query,key,value}.weight (transposed)
    blocks/{q,k,v}/bias    [L, D]       (only if config.attention_bias, HF `qkv_bias`)
    blocks/o/{kernel,bias}               ...attention.output.dense
    blocks/mlp_norm/{scale,bias}         ...layernorm_after
    blocks/up/{kernel,bias}   [L, D, F]  ...intermediate.dense
    blocks/down/{kernel,bias} [L, F, D]  ...output.dense
    final/norm/{scale,bias}   [D]        vit.layernorm
    head/{kernel,bias}  [D, num_labels], [num_labels]   classifier (only if num_labels > 0; else head = {})
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hm3_jax.models import layers
from hm3_jax.models.config import ModelConfig


def init(config: ModelConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """Random params in the layout above (kernels, CLS and positions `N(0, initializer_range^2)`, norms 1,
    biases 0)."""
    d, p, c = config.hidden_size, config.patch_size, config.num_channels
    head = {}
    if config.num_labels > 0:
        head = layers.dense_spec((d, config.num_labels), bias=True)
    spec = {
        "embed": {
            "patch": layers.dense_spec((p * p * c, d), bias=True),
            "cls": ("normal", (d,)),
            "position": ("normal", (config.num_patches + 1, d)),
        },
        "blocks": layers.layernorm_blocks_spec(config, config.attention_bias),
        "final": {"norm": {"scale": ("ones", (d,)), "bias": ("zeros", (d,))}},
        "head": head,
    }
    return layers.materialize(spec, key, config.initializer_range, dtype)


def patchify(config: ModelConfig, pixel_values: jax.Array) -> jax.Array:
    """pixel_values [B, C, H, W] -> patches [B, N, p*p*C], patches in row-major order, each flattened (row,
    column, channel) to match the transposed convolution kernel."""
    b, c, hgt, wid = pixel_values.shape
    p = config.patch_size
    if (c, hgt, wid) != (config.num_channels, config.image_size, config.image_size):
        raise ValueError(
            f"pixel_values must be [B, C, H, W] = [B, {config.num_channels}, {config.image_size}, "
            f"{config.image_size}] (NCHW), got {tuple(pixel_values.shape)}"
        )
    x = pixel_values.transpose(0, 2, 3, 1)  # [B, H, W, C]
    x = x.reshape(b, hgt // p, p, wid // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (hgt // p) * (wid // p), p * p * c)


def embed(config: ModelConfig, shell: dict, pixel_values: jax.Array, attention_mask=None):
    """pixel_values [B, C, H, W] -> (h [B, N+1, D], ctx {"mask": all-true [1, 1, N+1, N+1]})."""
    if attention_mask is not None:
        raise ValueError("ViT takes no attention_mask")
    e = shell["embed"]
    dtype = e["patch"]["kernel"].dtype
    tokens = layers.dense(e["patch"], patchify(config, pixel_values.astype(dtype)))  # [B, N, D]
    cls = jnp.broadcast_to(e["cls"], (tokens.shape[0], 1, tokens.shape[-1])).astype(tokens.dtype)
    h = jnp.concatenate([cls, tokens], axis=1) + e["position"].astype(tokens.dtype)
    s = h.shape[1]
    return h, {"mask": jnp.ones((1, 1, s, s), bool)}


def block(config: ModelConfig, p: dict, h: jax.Array, ctx: dict) -> jax.Array:
    """One ViT encoder block: h [B, N+1, D] -> [B, N+1, D]."""
    return layers.layernorm_block_with_cache(config, p, h, ctx, None)[0]


def head(config: ModelConfig, shell: dict, h: jax.Array) -> jax.Array:
    """Final LayerNorm; then hidden states [B, N+1, D], or class logits [B, num_labels] (float32) from CLS."""
    x = layers.layer_norm(shell["final"]["norm"], h, config.norm_eps)
    if config.num_labels == 0:
        return x
    return layers.dense(shell["head"], x[:, 0]).astype(jnp.float32)


def apply(config: ModelConfig, params: dict, pixel_values: jax.Array, attention_mask=None) -> jax.Array:
    """Full forward: pixel_values [B, C, H, W] -> hidden states [B, N+1, D] or logits [B, num_labels]."""
    h, ctx = embed(config, params, pixel_values, attention_mask)
    h, _ = jax.lax.scan(lambda h, p: (block(config, p, h, ctx), None), h, params["blocks"])
    return head(config, params, h)
