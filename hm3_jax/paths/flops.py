"""Batch-level forward FLOP counts for the engine's cost accounting, on top of `hm3_jax.models.flops`.

The per-token formulas (what is counted: every matmul of a block, the attention scores over the full key
length as executed, the LM head; not counted: embeddings, norms, RoPE, softmax, residual adds and junction
scalings) live in `hm3_jax.models.flops`, the one place they are written. This module scales them to the
engine's units: a [batch, seq_len] teacher-forced batch through `num_block_steps` blocks, and a greedy decode
of `batch` rows. A multiply-add counts as 2 FLOPs.
"""

from __future__ import annotations

from hm3_jax.models import flops as model_flops
from hm3_jax.models.config import ModelConfig

block_flops_per_token = model_flops.block_flops_per_token  # (config, keys attended) -> FLOPs of one block
head_flops_per_token = model_flops.head_flops_per_token  # 2 * D * V for an LM


def teacher_forced_flops(config: ModelConfig, batch: int, seq_len: int, num_block_steps: int) -> int:
    """Forward FLOPs of `num_block_steps` block applications plus the head on every position of a
    [batch, seq_len] input: batch * `models.flops.forward_flops(config, seq_len, num_block_steps)` (LMs)."""
    tokens = batch * seq_len
    return int(
        tokens * (num_block_steps * block_flops_per_token(config, seq_len) + head_flops_per_token(config))
    )


def decode_flops(
    config: ModelConfig, batch: int, prompt_len: int, max_new_tokens: int, num_block_steps: int
) -> int:
    """FLOPs of greedy decoding (`models.greedy_decode`) of `batch` rows along `num_block_steps` blocks:
    batch * `models.flops.decode_flops(config, prompt_len, max_new_tokens, num_block_steps)` (the prefill and
    `max_new_tokens - 1` single-token steps, each query over all `prompt_len + max_new_tokens` cache slots; the
    head on the last prompt position and on every step)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return int(batch * model_flops.decode_flops(config, prompt_len, max_new_tokens, num_block_steps))
