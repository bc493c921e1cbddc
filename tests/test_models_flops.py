"""Analytic FLOPs vs XLA's own count of the compiled functions, and vs 2 * parameters for Llama-2-7B."""

import math

import jax
import jax.numpy as jnp
import pytest

from hm3_jax import models
from hm3_jax.models import flops

LLAMA = models.ModelConfig(
    family="llama", vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
    num_kv_heads=2,
)  # fmt: skip
GPT2 = models.ModelConfig(
    family="gpt2", vocab_size=512, hidden_size=128, intermediate_size=512, num_layers=2, num_heads=4,
    max_position_embeddings=64, hidden_act="gelu_new",
)  # fmt: skip
VIT = models.ModelConfig(
    family="vit", hidden_size=128, intermediate_size=512, num_layers=2, num_heads=4, image_size=32,
    patch_size=8, num_labels=10, hidden_act="gelu", attention_bias=True,
)  # fmt: skip


def xla_flops(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return cost["flops"]


@pytest.mark.parametrize("config", [LLAMA, GPT2, VIT], ids=lambda c: c.family)
def test_block_and_head_flops_match_xla_count(config):
    params = jax.eval_shape(lambda: models.init(config, jax.random.key(0)))
    shell = models.shell_of(params)
    if config.family == "vit":
        inputs = jax.ShapeDtypeStruct((1, 3, 32, 32), jnp.float32)
    else:
        inputs = jax.ShapeDtypeStruct((1, 32), jnp.int32)
    s = flops.sequence_length(config, 32)
    h, ctx = jax.eval_shape(lambda sh, x: models.embed(config, sh, x), shell, inputs)
    one_block = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), params["blocks"])
    counted = xla_flops(lambda p, h, c: models.block(config, p, h, c), one_block, h, ctx)
    analytic = s * flops.block_flops_per_token(config, s)
    # XLA also counts elementwise work (norms, softmax, activations: an erf-GELU is ~50 FLOPs per element);
    # the analytic count is matmuls only, so allow an O(S * (D + F)) surplus and nothing more.
    elementwise = 80 * s * (config.hidden_size + config.intermediate_size)
    assert analytic <= counted <= analytic + elementwise, (counted, analytic)
    assert counted <= 1.1 * analytic
    counted_head = xla_flops(lambda sh, h: models.head(config, sh, h), shell, h)
    analytic_head = (1 if config.family == "vit" else s) * flops.head_flops_per_token(config)
    assert analytic_head <= counted_head <= analytic_head + 20 * s * config.hidden_size
    if config.family == "vit":
        counted_embed = xla_flops(lambda sh, x: models.embed(config, sh, x)[0], shell, inputs)
        analytic_embed = config.num_patches * flops.embed_flops_per_token(config)
        assert analytic_embed <= counted_embed <= 1.05 * analytic_embed


def test_llama2_7b_flops_are_twice_the_non_embedding_parameters():
    config = models.ModelConfig(
        family="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
        num_heads=32, max_position_embeddings=4096,
    )  # fmt: skip
    shapes = jax.eval_shape(lambda: models.init(config, jax.random.key(0)))
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    assert abs(total - 6_738_415_616) == 0  # Llama-2-7B's published parameter count
    norms = (2 * config.num_layers + 1) * config.hidden_size
    matmul_params = total - norms - config.vocab_size * config.hidden_size  # the input embedding is a lookup
    # one token, no context: attention adds 4 * H * hd per block for its single key
    attention = config.num_layers * 4 * config.hidden_size
    assert flops.forward_flops(config, seq_len=1) == 2 * matmul_params + attention
    assert flops.flops_per_token(config, 1, num_blocks=16) < flops.flops_per_token(config, 1)


def test_path_length_and_decode_accounting():
    per_block = flops.block_flops_per_token(LLAMA, 8)
    assert flops.forward_flops(LLAMA, 8, num_blocks=5) - flops.forward_flops(LLAMA, 8, num_blocks=2) == (
        3 * 8 * per_block
    )
    # decoding 1 token is one prefill over the whole cache plus one head call
    prefill = 4 * LLAMA.num_layers * flops.block_flops_per_token(LLAMA, 5)
    assert flops.decode_flops(LLAMA, 4, 1) == prefill + flops.head_flops_per_token(LLAMA)
    with pytest.raises(ValueError, match="seq_len"):
        flops.forward_flops(LLAMA)
