"""Analytic forward FLOPs for cost accounting (counted as 2 FLOPs per multiply-add, matmuls only).

What is counted is what this package executes: every projection and MLP matmul, the attention scores
`q k^T` and the weighted sum `p v` over the full key length (masked entries are computed too, so a causal
prefill of S tokens costs S keys per query, and a decode step with a cache of S_total slots costs S_total keys
per query), the patch projection (ViT) and the output head. Norms, softmax, activations, RoPE and residual
adds are O(S * D) and left out; for real model sizes they are well under 1% (checked against XLA's own count in
tests/test_models_flops.py). Without attention, a block costs 2 FLOPs per block parameter per token (Kaplan
et al. 2020, "C_forward = 2N").
"""

from __future__ import annotations

from hm3_jax.models.config import ModelConfig


def block_flops_per_token(config: ModelConfig, num_keys: int) -> int:
    """Forward FLOPs of one block for one query token attending over `num_keys` keys.

    llama: 2*D*(H*hd + 2*KV*hd) (q, k, v) + 2*H*hd*D (o) + 3 * 2*D*F (gate, up, down) + 2 * 2*H*hd*num_keys;
    gpt2 / vit: 2*D*3D + 2*D*D + 2 * 2*D*F + 2 * 2*H*hd*num_keys.
    """
    d, f, h, hd = config.hidden_size, config.intermediate_size, config.num_heads, config.head_size
    attn_scores = 2 * 2 * h * hd * num_keys
    if config.family == "llama":
        proj = 2 * d * (h * hd + 2 * config.kv_heads * hd) + 2 * h * hd * d
        mlp = 3 * 2 * d * f
    else:
        proj = 2 * d * (3 * h * hd) + 2 * h * hd * d
        mlp = 2 * 2 * d * f
    return proj + mlp + attn_scores


def embed_flops_per_token(config: ModelConfig) -> int:
    """Embedding FLOPs per token: 0 for a lookup table (LMs); 2 * p*p*C * D for a ViT patch token."""
    if config.family == "vit":
        return 2 * config.patch_size**2 * config.num_channels * config.hidden_size
    return 0


def head_flops_per_token(config: ModelConfig) -> int:
    """Output head FLOPs per token whose output is computed: 2*D*V (LM), 2*D*num_labels (ViT classifier,
    CLS token only; 0 without a classifier)."""
    if config.family == "vit":
        return 2 * config.hidden_size * config.num_labels
    return 2 * config.hidden_size * config.vocab_size


def sequence_length(config: ModelConfig, seq_len: int | None) -> int:
    """The sequence length S: given for LMs, `num_patches + 1` for ViT."""
    if config.family == "vit":
        return config.num_patches + 1
    if seq_len is None:
        raise ValueError(f"seq_len is required for family {config.family!r}")
    return int(seq_len)


def forward_flops(config: ModelConfig, seq_len: int | None = None, num_blocks: int | None = None) -> int:
    """FLOPs of one forward pass of one sequence (as `apply` / `apply_path` run it).

    Args: seq_len S (ignored for ViT, which uses N+1); num_blocks: path length T (default L; padding steps
      cost nothing). Returns: S * (embed + T * block(S keys)) + head, with the head on every token for LMs
      and on the CLS token only for a ViT classifier.
    """
    s = sequence_length(config, seq_len)
    t = config.num_layers if num_blocks is None else int(num_blocks)
    body = s * (embed_flops_per_token(config) + t * block_flops_per_token(config, s))
    head_tokens = 1 if config.family == "vit" else s
    return body + head_tokens * head_flops_per_token(config)


def flops_per_token(config: ModelConfig, seq_len: int | None = None, num_blocks: int | None = None) -> float:
    """`forward_flops / S`: average forward FLOPs per token of a length-S sequence."""
    return forward_flops(config, seq_len, num_blocks) / sequence_length(config, seq_len)


def decode_flops(
    config: ModelConfig, prompt_len: int, max_new_tokens: int, num_blocks: int | None = None
) -> int:
    """FLOPs of `greedy_decode` for one sequence: the prefill of `prompt_len` tokens (keys: all S_total cache
    slots), then `max_new_tokens - 1` single-token steps over S_total slots, with the head on the last
    prompt token and on every step."""
    t = config.num_layers if num_blocks is None else int(num_blocks)
    s_total = prompt_len + max_new_tokens
    per_token = t * block_flops_per_token(config, s_total)
    head = head_flops_per_token(config)
    return prompt_len * per_token + head + (max_new_tokens - 1) * (per_token + head)
