"""GPT-2 and ViT vs transformers' Flax GPT2LMHeadModel, ViTModel and ViTForImageClassification."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import (
    FlaxGPT2LMHeadModel,
    FlaxViTForImageClassification,
    FlaxViTModel,
    GPT2Config,
    ViTConfig,
)

from hm3_jax import models
from tests.test_models_decode import greedy_decode_naive
from tests.test_models_llama import randomise

TOL = 1e-4
apply = jax.jit(models.apply, static_argnums=0)

GPT2_HF = dict(vocab_size=57, n_embd=32, n_layer=2, n_head=4, n_positions=24, n_inner=None)
GPT2 = models.ModelConfig(
    family="gpt2", vocab_size=57, hidden_size=32, intermediate_size=128, num_layers=2, num_heads=4,
    max_position_embeddings=24, norm_eps=1e-5, hidden_act="gelu_new",
)  # fmt: skip
VIT_HF = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=8,
    patch_size=4, num_channels=3, layer_norm_eps=1e-12, qkv_bias=True,
)  # fmt: skip
VIT = models.ModelConfig(
    family="vit", hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, image_size=8, patch_size=4,
    num_channels=3, norm_eps=1e-12, hidden_act="gelu", attention_bias=True,
)  # fmt: skip


def stack_to_layers(blocks, num_layers, fn):
    return {str(l): fn(jax.tree.map(lambda x, l=l: x[l], blocks)) for l in range(num_layers)}


def to_hf_gpt2(params, num_layers):
    """Our layout -> transformers' Flax GPT-2 tree (its Conv1D kernels are [out, in]; c_attn fuses q|k|v)."""

    def lay(b):
        qkv_kernel = jnp.concatenate([b["q"]["kernel"], b["k"]["kernel"], b["v"]["kernel"]], axis=1).T
        qkv_bias = jnp.concatenate([b["q"]["bias"], b["k"]["bias"], b["v"]["bias"]])
        return {
            "ln_1": b["attn_norm"],
            "attn": {
                "c_attn": {"kernel": qkv_kernel, "bias": qkv_bias},
                "c_proj": {"kernel": b["o"]["kernel"].T, "bias": b["o"]["bias"]},
            },
            "ln_2": b["mlp_norm"],
            "mlp": {
                "c_fc": {"kernel": b["up"]["kernel"].T, "bias": b["up"]["bias"]},
                "c_proj": {"kernel": b["down"]["kernel"].T, "bias": b["down"]["bias"]},
            },
        }

    return {
        "transformer": {
            "wte": {"embedding": params["embed"]["embedding"]},
            "wpe": {"embedding": params["embed"]["position"]},
            "h": stack_to_layers(params["blocks"], num_layers, lay),
            "ln_f": params["final"]["norm"],
        }
    }


def to_hf_vit(params, config):
    """Our layout -> transformers' Flax ViT tree (patch conv kernel [p, p, C, D], cls/pos with leading 1s)."""
    p, c, d = config.patch_size, config.num_channels, config.hidden_size

    def lay(b):
        return {
            "layernorm_before": b["attn_norm"],
            "attention": {
                "attention": {"query": b["q"], "key": b["k"], "value": b["v"]},
                "output": {"dense": b["o"]},
            },
            "layernorm_after": b["mlp_norm"],
            "intermediate": {"dense": b["up"]},
            "output": {"dense": b["down"]},
        }

    e = params["embed"]
    vit = {
        "embeddings": {
            "cls_token": e["cls"].reshape(1, 1, d),
            "position_embeddings": e["position"][None],
            "patch_embeddings": {
                "projection": {"kernel": e["patch"]["kernel"].reshape(p, p, c, d), "bias": e["patch"]["bias"]}
            },
        },
        "encoder": {"layer": stack_to_layers(params["blocks"], config.num_layers, lay)},
        "layernorm": params["final"]["norm"],
    }
    if config.num_labels:
        return {"vit": vit, "classifier": params["head"]}
    vit["pooler"] = {
        "dense": {"kernel": jnp.zeros((d, d)), "bias": jnp.zeros(d)}
    }  # unused by last_hidden_state
    return vit


def abstract_params(module, *args):
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *args)["params"])


def same_tree(a, b):
    return jax.tree.map(lambda x: x.shape, a) == jax.tree.map(lambda x: x.shape, b)


@pytest.fixture(scope="module")
def gpt2_setup():
    params = randomise(jax.jit(models.init, static_argnums=0)(GPT2, jax.random.key(0)), 1)
    hf = FlaxGPT2LMHeadModel(GPT2Config(**GPT2_HF), _do_init=False)
    hf_params = to_hf_gpt2(params, GPT2.num_layers)
    ids = jnp.zeros((1, 4), jnp.int32)
    assert same_tree(hf_params, abstract_params(hf.module, ids, jnp.ones_like(ids), ids))
    return params, hf, hf_params


def test_gpt2_matches_flax_reference_with_padding(gpt2_setup):
    params, hf, hf_params = gpt2_setup
    ids = jax.random.randint(jax.random.key(2), (2, 7), 0, GPT2.vocab_size)
    mask = jnp.array([[1] * 7, [0, 0, 0, 1, 1, 1, 1]], jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    forward = jax.jit(lambda p, i, m, pos: hf.module.apply({"params": p}, i, m, pos).logits)
    ref = forward(hf_params, ids, mask, positions)
    out = apply(GPT2, params, ids, mask)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=TOL, rtol=0)
    pool = models.make_pool([params["blocks"]])
    path_out = models.apply_path(
        GPT2, models.shell_of(params), pool, models.identity_path(2, 3), ids, None, mask
    )
    np.testing.assert_allclose(path_out, out, atol=1e-5, rtol=0)


def test_gpt2_greedy_decode_matches_recompute_loop(gpt2_setup):
    # GPT-2's forward is checked against HF above and Llama's decode against HF generate in
    # test_models_decode; here GPT-2's cache (learned positions, no RoPE) against a no-cache loop.
    params, _, _ = gpt2_setup
    ids = jax.random.randint(jax.random.key(3), (2, 4), 0, GPT2.vocab_size)
    mask = jnp.array([[1, 1, 1, 1], [0, 1, 1, 1]], jnp.int32)
    shell, pool = models.shell_of(params), models.make_pool([params["blocks"]])
    path = jnp.array([1, 0, 1], jnp.int32)
    out = models.greedy_decode(GPT2, shell, pool, path, ids, mask, 5)
    np.testing.assert_array_equal(out, greedy_decode_naive(GPT2, shell, pool, path, ids, mask, 5))


@pytest.mark.parametrize("num_labels", [0, 5])
def test_vit_matches_flax_reference(num_labels):
    config = VIT.replace(num_labels=num_labels)
    params = randomise(models.init(config, jax.random.key(4)), 5)
    cls = FlaxViTForImageClassification if num_labels else FlaxViTModel
    hf = cls(ViTConfig(**VIT_HF, num_labels=max(num_labels, 2)), _do_init=False)
    hf_params = to_hf_vit(params, config)
    pixels = jax.random.normal(jax.random.key(6), (2, 3, 8, 8))  # NCHW, as HF's pixel_values
    nhwc = pixels.transpose(0, 2, 3, 1)  # the Flax module below the HF wrapper takes NHWC
    assert same_tree(hf_params, abstract_params(hf.module, nhwc))
    hf_out = jax.jit(lambda p, x: hf.module.apply({"params": p}, x))(hf_params, nhwc)
    ref = hf_out.logits if num_labels else hf_out.last_hidden_state
    out = apply(config, params, pixels)
    expected_shape = (2, num_labels) if num_labels else (2, config.num_patches + 1, 32)
    assert out.shape == expected_shape
    np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)
    # the HF wrapper's own NCHW entry point agrees
    hf_nchw = jax.jit(lambda p, x: hf(x, params=p)[0])(hf_params, pixels)
    np.testing.assert_allclose(hf_nchw, ref, atol=1e-5, rtol=0)


def test_vit_mixed_path_and_bad_input():
    a = randomise(models.init(VIT, jax.random.key(7)), 8)
    b = randomise(models.init(VIT, jax.random.key(9)), 10)
    pixels = jax.random.normal(jax.random.key(11), (2, 3, 8, 8))
    pool = models.make_pool([a["blocks"], b["blocks"]])
    pairs = [(1, 0), (0, 1), (1, 1)]
    stacked = jax.tree.map(
        lambda *xs: jnp.stack(xs),
        *[jax.tree.map(lambda x, m=m, l=l: x[l], (a, b)[m]["blocks"]) for m, l in pairs],
    )
    expected = apply(VIT.replace(num_layers=3), {**models.shell_of(a), "blocks": stacked}, pixels)
    path = models.path_from_pairs(pairs, VIT.num_layers, t_max=4)
    np.testing.assert_allclose(
        models.apply_path(VIT, models.shell_of(a), pool, path, pixels), expected, atol=1e-5, rtol=0
    )
    with pytest.raises(ValueError, match="NCHW"):
        models.apply(VIT, a, pixels.transpose(0, 2, 3, 1))
    with pytest.raises(ValueError, match="language model"):
        models.greedy_decode(
            VIT, models.shell_of(a), pool, path, jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2)), 2
        )
