"""Llama family vs transformers' Flax reference classes (FlaxLlamaForCausalLM, FlaxMistralForCausalLM)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import FlaxLlamaForCausalLM, FlaxMistralForCausalLM, LlamaConfig, MistralConfig
from transformers.models.llama import modeling_flax_llama

from hm3_jax import models
from hm3_jax.models import layers, llama

TOL = 1e-4
apply = jax.jit(llama.apply, static_argnums=0)  # one compile per config beats op-by-op dispatch


def randomise(params, seed):
    """Adds N(0, 0.1^2) noise to every leaf (init sets norms to 1 and biases to 0, which would hide layout
    errors). numpy, not jax.random: one threefry compile per leaf shape costs seconds of CPU."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(np.float32), params)


HF_NAMES = {  # ours -> (HF submodule, HF name) inside model.layers.{l}
    "attn_norm": ("input_layernorm", None),
    "mlp_norm": ("post_attention_layernorm", None),
    "q": ("self_attn", "q_proj"),
    "k": ("self_attn", "k_proj"),
    "v": ("self_attn", "v_proj"),
    "o": ("self_attn", "o_proj"),
    "gate": ("mlp", "gate_proj"),
    "up": ("mlp", "up_proj"),
    "down": ("mlp", "down_proj"),
}


def to_hf_llama(params, num_layers, tied=False):
    """Test-side conversion of our stacked layout into transformers' Flax Llama/Mistral param tree."""
    layers_tree = {}
    for l in range(num_layers):
        lay = {}
        for ours, (sub, name) in HF_NAMES.items():
            leaf = jax.tree.map(lambda x, l=l: x[l], params["blocks"][ours])
            if name is None:
                lay[sub] = {"weight": leaf["scale"]}
            else:
                lay.setdefault(sub, {})[name] = leaf
        layers_tree[str(l)] = lay
    embedding = params["embed"]["embedding"]
    return {
        "model": {
            "embed_tokens": {"embedding": embedding},
            "layers": layers_tree,
            "norm": {"weight": params["final"]["norm"]["scale"]},
        },
        "lm_head": {"kernel": embedding.T if tied else params["head"]["kernel"]},
    }


def hf_forward_fn(cls, hf_config):
    """Jitted HF Flax forward `(hf_params, ids, mask, positions) -> logits`, and its param shapes."""
    module = cls(hf_config, _do_init=False).module
    ids = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), ids, jnp.ones_like(ids), ids)["params"])

    @jax.jit
    def forward(hf_params, ids, mask, positions):
        return module.apply({"params": hf_params}, ids, mask, positions).logits

    return forward, shapes


def hf_logits(forward, hf_params, ids, mask=None):
    b, s = ids.shape
    if mask is None:
        mask = jnp.ones((b, s), jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    return forward(hf_params, ids, mask, positions)


def meta_llama3_inv_freq(theta, dim, factor, low, high, old_len):
    """Meta's reference `apply_scaling` (llama-models, Llama 3.1), written as a per-frequency loop."""
    freqs = [1.0 / theta ** (i / dim) for i in range(0, dim, 2)]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            out.append(freq)
        elif wavelen > old_len / low:
            out.append(freq / factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(out)


def patched_sinusoids(inv_freq):
    """Replacement for HF Flax's `create_sinusoidal_positions` (which hard-codes theta=10000, no scaling)."""

    def create(num_pos, dim):
        freqs = np.einsum("i,j->ij", np.arange(num_pos), inv_freq).astype("float32")
        emb = np.concatenate((freqs, freqs), axis=-1)
        return jnp.array(np.concatenate((np.sin(emb)[:, None, :], np.cos(emb)[:, None, :]), axis=-1))

    return create


def tiny_hf_config(**kw):
    base = dict(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
    )
    base.update(kw)
    return base


def our_config(hf, **kw):
    return models.ModelConfig(
        family="llama",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"],
        max_position_embeddings=hf["max_position_embeddings"],
        norm_eps=hf["rms_norm_eps"],
        **kw,
    )


def make_llama_pair(
    seed, hf_kwargs=None, ours_kwargs=None, tied=False, cls=FlaxLlamaForCausalLM, cfg_cls=None
):
    """(HF forward, HF params, our config, our params) for the same random tiny model."""
    key = jax.random.key(seed)
    hf_kwargs = tiny_hf_config(**(hf_kwargs or {}))
    cfg_cls = cfg_cls or LlamaConfig
    config = our_config(hf_kwargs, tie_word_embeddings=tied, **(ours_kwargs or {}))
    params = randomise(llama.init(config, key), seed)
    forward, shapes = hf_forward_fn(cls, cfg_cls(**hf_kwargs))
    hf_params = to_hf_llama(params, config.num_layers, tied)
    # our conversion must produce exactly the reference's tree of names and shapes
    assert jax.tree.map(lambda x: x.shape, hf_params) == jax.tree.map(lambda x: x.shape, shapes)
    return forward, hf_params, config, params


def random_ids(key, shape, vocab):
    return jax.random.randint(key, shape, 0, vocab)


@pytest.mark.parametrize("tied", [False, True])
def test_llama_matches_flax_reference(tied):
    hf_forward, hf_params, config, params = make_llama_pair(1, tied=tied)
    ids = random_ids(jax.random.key(2), (2, 7), config.vocab_size)
    ref = hf_logits(hf_forward, hf_params, ids)
    out = apply(config, params, ids)
    assert out.shape == (2, 7, config.vocab_size)
    np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)
    if tied:
        assert params["head"] == {}


def test_llama_attention_bias_matches_reference_and_qwen2_style_bias():
    bias = {"attention_bias": True, "attention_out_bias": True}
    hf_forward, hf_params, config, params = make_llama_pair(
        3, hf_kwargs={"attention_bias": True}, ours_kwargs=bias
    )
    ids = random_ids(jax.random.key(4), (2, 6), config.vocab_size)
    np.testing.assert_allclose(
        apply(config, params, ids), hf_logits(hf_forward, hf_params, ids), atol=TOL, rtol=0
    )
    # Qwen2: q/k/v biases but none on o_proj == HF Llama with attention_bias and a zero o_proj bias.
    qwen_config = config.replace(attention_out_bias=False)
    qwen_params = jax.tree.map(lambda x: x, params)
    del qwen_params["blocks"]["o"]["bias"]
    assert jax.tree.structure(qwen_params) == jax.tree.structure(llama.init(qwen_config, jax.random.key(0)))
    zero_o = jax.tree.map(lambda x: x, params)
    zero_o["blocks"]["o"]["bias"] = jnp.zeros_like(params["blocks"]["o"]["bias"])
    ref = hf_logits(hf_forward, to_hf_llama(zero_o, config.num_layers), ids)
    np.testing.assert_allclose(apply(qwen_config, qwen_params, ids), ref, atol=TOL, rtol=0)


def test_llama_padding_mask_matches_reference():
    hf_forward, hf_params, config, params = make_llama_pair(5)
    ids = random_ids(jax.random.key(6), (3, 6), config.vocab_size)
    mask = jnp.array([[1] * 6, [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    ref = hf_logits(hf_forward, hf_params, ids, mask)
    out = apply(config, params, ids, attention_mask=mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=TOL, rtol=0)
    # Left padding is invisible: a left-padded row equals the unpadded sequence.
    alone = apply(config, params, ids[1:2, 2:])
    np.testing.assert_allclose(out[1, 2:], alone[0], atol=TOL, rtol=0)
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize(
    "rope_scaling",
    [  # theta = 500 in both cases (HF's Flax classes hard-code 10000)
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
)
def test_llama_rope_theta_and_scaling(monkeypatch, rope_scaling):
    theta = 500.0
    hf_forward, hf_params, config, params = make_llama_pair(7)
    config = config.replace(rope_theta=theta, rope_scaling=models.rope_scaling_from_dict(rope_scaling))
    dim = config.head_size
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    if rope_scaling["rope_type"] == "linear":
        inv_freq = inv_freq / 4.0
    else:
        inv_freq = meta_llama3_inv_freq(theta, dim, 8.0, 1.0, 4.0, 64)
        # the test setup must exercise all three llama3 bands (kept, blended, divided)
        base = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
        ratio = base / inv_freq
        assert np.isclose(ratio, 1).any() and np.isclose(ratio, 8).any()
        assert ((ratio > 1.01) & (ratio < 7.99)).any()
    np.testing.assert_allclose(layers.rope_inv_freq(config), inv_freq, rtol=1e-12)
    monkeypatch.setattr(modeling_flax_llama, "create_sinusoidal_positions", patched_sinusoids(inv_freq))
    ids = random_ids(jax.random.key(8), (2, 40), config.vocab_size)
    ref = hf_logits(hf_forward, hf_params, ids)
    np.testing.assert_allclose(apply(config, params, ids), ref, atol=TOL, rtol=0)


def test_mistral_matches_flax_reference():
    hf_forward, hf_params, config, params = make_llama_pair(
        9,
        # HF Flax Mistral builds `triu(causal, k=-(sliding_window or 0))`, so `None` would leave only the
        # diagonal; a window longer than the sequence is full causal attention in both implementations.
        hf_kwargs={"sliding_window": 64},
        cls=FlaxMistralForCausalLM,
        cfg_cls=MistralConfig,
    )
    ids = random_ids(jax.random.key(10), (2, 9), config.vocab_size)
    np.testing.assert_allclose(
        apply(config, params, ids), hf_logits(hf_forward, hf_params, ids), atol=TOL, rtol=0
    )


def test_sliding_window_mask_hand_computed():
    slots = jnp.arange(4)
    mask = layers.causal_mask(slots, slots, jnp.ones((1, 4)), sliding_window=2)[0, 0]
    expected = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], bool)
    np.testing.assert_array_equal(mask, expected)


def test_bf16_params_close_to_float32():
    _, _, config, params = make_llama_pair(11)
    ids = random_ids(jax.random.key(12), (2, 5), config.vocab_size)
    ref = apply(config, params, ids)
    out = apply(config, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), ids)
    assert out.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(out - ref))) < 0.1 * float(jnp.max(jnp.abs(ref)))


def test_bf16_head_major_attention_runs_on_cpu_and_matches_float32():
    """The KV-cache layout's attention with bfloat16 inputs (the decode of a bf16 spec): XLA:CPU rejects this
    bf16 x bf16 -> f32 dot ("Unsupported element type for DotThunk::Execute"), so `layers.einsum_f32` widens
    bf16 operands on CPU; the result is the float32 attention's up to bf16 rounding of q, k, v."""
    q, k, v = (
        jax.random.normal(jax.random.key(i), s)
        for i, s in enumerate([(2, 4, 4, 8), (2, 2, 4, 8), (2, 2, 4, 8)])
    )
    mask = jnp.tril(jnp.ones((4, 4), bool))[None, None].repeat(2, 0)
    ref = layers.attention(q, k, v, mask, kv_head_major=True)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = jax.jit(layers.attention, static_argnames="kv_head_major")(*bf, mask, kv_head_major=True)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=0.05)
    exact = layers.attention(
        *[x.astype(jnp.float32) for x in bf], mask, kv_head_major=True
    )  # the same bf16 values
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(exact), atol=0.02)


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="family"):
        models.ModelConfig(family="bert", vocab_size=3)
    with pytest.raises(ValueError, match="num_kv_heads"):
        models.ModelConfig(family="llama", vocab_size=3, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="rope_scaling type"):
        models.ModelConfig(family="llama", vocab_size=3, rope_scaling=(("rope_type", "yarn"),))
    with pytest.raises(TypeError, match="rope_scaling_from_dict"):
        models.ModelConfig(family="llama", vocab_size=3, rope_scaling={"type": "linear"})
    cfg = models.ModelConfig(
        family="llama",
        vocab_size=3,
        rope_scaling=models.rope_scaling_from_dict({"type": "linear", "factor": 2}),
    )
    assert hash(cfg) == hash(cfg.replace()) and cfg.rope_scaling_dict == {"rope_type": "linear", "factor": 2}


def test_init_layout_shapes():
    config = models.ModelConfig(
        family="llama", vocab_size=11, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, attention_bias=True,
    )  # fmt: skip
    params = models.init(config, jax.random.key(0))
    shapes = jax.tree.map(lambda x: x.shape, params)
    assert shapes["blocks"]["q"] == {"kernel": (2, 16, 32), "bias": (2, 32)}
    assert shapes["blocks"]["k"] == {"kernel": (2, 16, 16), "bias": (2, 16)}
    assert shapes["blocks"]["o"] == {"kernel": (2, 32, 16)}
    assert shapes["blocks"]["down"] == {"kernel": (2, 24, 16)}
    assert shapes["head"] == {"kernel": (16, 11)} and shapes["embed"] == {"embedding": (11, 16)}
    logits = apply(config, params, jnp.zeros((1, 3), jnp.int32))
    assert logits.shape == (1, 3, 11)
