"""Analytic forward FLOP counts for cost accounting (a multiply-add counts as 2 FLOPs).

Counted: every matmul of a block and of the LM head. Not counted: embeddings (a gather), norms, RoPE, softmax,
residual adds and junction scalings (all O(D) per token, < 1% of a block at our sizes).

Per token of a sequence whose attention spans `context` keys, for one Llama/GPT-2 block
(D = hidden_size, F = intermediate_size, H = num_heads, KV = kv heads, hd = head_size):

    q and o projections       2 * (2 * D * H * hd)
    k and v projections       2 * (2 * D * KV * hd)
    scores QK^T and A V       2 * (2 * context * H * hd)     # dense: XLA computes the masked half too
    MLP                       3 * (2 * D * F)  (Llama SwiGLU: gate, up, down)  or  2 * (2 * D * F) (GPT-2)

and the LM head costs 2 * D * V per token whose logits are computed.
"""

from __future__ import annotations

from hm3_jax.models.config import ModelConfig


def block_flops_per_token(config: ModelConfig, context: int) -> int:
    """FLOPs of one block for one query token attending over `context` keys (formula in the module doc)."""
    d, f = config.hidden_size, config.intermediate_size
    h, kv, hd = config.num_heads, config.kv_heads, config.head_size
    proj = 2 * (2 * d * h * hd) + 2 * (2 * d * kv * hd)
    attn = 2 * (2 * context * h * hd)
    mlp = (3 if config.family == "llama" else 2) * (2 * d * f)
    return int(proj + attn + mlp)


def head_flops_per_token(config: ModelConfig) -> int:
    """FLOPs of the LM head for one token: 2 * D * V (0 for families without a vocabulary head)."""
    return int(2 * config.hidden_size * config.vocab_size)


def teacher_forced_flops(config: ModelConfig, batch: int, seq_len: int, num_block_steps: int) -> int:
    """Forward FLOPs of `num_block_steps` block applications plus one head on a [batch, seq_len] input."""
    tokens = batch * seq_len
    return int(
        tokens * (num_block_steps * block_flops_per_token(config, seq_len) + head_flops_per_token(config))
    )


def decode_flops(
    config: ModelConfig, batch: int, prompt_len: int, max_new_tokens: int, num_block_steps: int
) -> int:
    """FLOPs of greedy decoding (`models.greedy_decode`) with a KV cache of `prompt_len + max_new_tokens` slots.

    Blocks: the prefill of `prompt_len` tokens, then `max_new_tokens - 1` single-token steps, every query
    attending over the whole cache (dense masked attention, as executed). Head: on the last prompt position
    (the first new token) and on each of the `max_new_tokens - 1` steps, i.e. `max_new_tokens` times per row
    (greedy_decode computes no logits for the other prompt positions, so none are counted).
    """
    total = prompt_len + max_new_tokens
    block_tokens = batch * (prompt_len + max(max_new_tokens - 1, 0))
    return int(
        block_tokens * num_block_steps * block_flops_per_token(config, total)
        + batch * max_new_tokens * head_flops_per_token(config)
    )
