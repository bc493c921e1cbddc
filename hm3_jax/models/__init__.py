"""Pure-function transformer families with layer paths (see docs/models.md and docs/DESIGN.md).

Family-agnostic entry points dispatch on `config.family` ("llama", "gpt2", "vit").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hm3_jax.models.config import ModelConfig, rope_scaling_from_dict
from hm3_jax.models.decode import greedy_decode
from hm3_jax.models.flops import decode_flops, flops_per_token, forward_flops
from hm3_jax.models.path import (
    apply_path,
    family_module,
    identity_path,
    path_from_pairs,
    run_path,
    validate_path,
)
from hm3_jax.models.pool import (
    block_signature,
    check_parted_pool,
    gather_blocks,
    is_parted,
    leading_blocks,
    make_parted_pool,
    make_pool,
    part_length,
    pool_block,
    pool_size,
    stacked,
)


def init(config: ModelConfig, key: jax.Array, dtype=None) -> dict:
    """Random params `{"embed", "blocks", "final", "head"}` for `config` (blocks stacked on axis 0)."""
    module = family_module(config)
    return module.init(config, key) if dtype is None else module.init(config, key, dtype=dtype)


def embed(config: ModelConfig, shell: dict, inputs, attention_mask=None):
    """`(h [B, S, D], ctx)` from the family's embedding."""
    return family_module(config).embed(config, shell, inputs, attention_mask)


def block(config: ModelConfig, block_params: dict, h, ctx):
    """One block of the family: h [B, S, D] -> [B, S, D]."""
    return family_module(config).block(config, block_params, h, ctx)


def head(config: ModelConfig, shell: dict, h):
    """Final norm and output head of the family."""
    return family_module(config).head(config, shell, h)


def apply(config: ModelConfig, params: dict, inputs, attention_mask=None):
    """Full forward of the family (logits [B, S, V] for LMs; ViT hidden states or class logits)."""
    return family_module(config).apply(config, params, inputs, attention_mask)


def cast(params: dict, dtype) -> dict:
    """Every floating-point leaf cast to `dtype` (e.g. jnp.bfloat16). Compute then runs in that dtype with
    float32 accumulation, and norms / attention softmax in float32 (see `hm3_jax.models.layers`)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def shell_of(params: dict) -> dict:
    """The shell: params without `"blocks"`."""
    return {k: v for k, v in params.items() if k != "blocks"}


__all__ = [
    "ModelConfig",
    "apply",
    "apply_path",
    "block",
    "cast",
    "decode_flops",
    "embed",
    "flops_per_token",
    "forward_flops",
    "greedy_decode",
    "head",
    "identity_path",
    "init",
    "block_signature",
    "check_parted_pool",
    "gather_blocks",
    "is_parted",
    "leading_blocks",
    "make_parted_pool",
    "make_pool",
    "part_length",
    "pool_block",
    "path_from_pairs",
    "pool_size",
    "rope_scaling_from_dict",
    "run_path",
    "shell_of",
    "stacked",
    "validate_path",
]
