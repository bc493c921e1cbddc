"""Parity with transformers (the reference): tiny random models built with its Flax classes, written as
PyTorch-named safetensors (tests/hf_fixtures.py), loaded with hm3_jax, compared; then saved with hm3_jax and
loaded back with transformers, compared again. float32, max abs diff < 1e-4."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from hm3_jax import models
from hm3_jax.io.checkpoint import load_pretrained, save_pretrained
from tests import hf_fixtures

TOL = 1e-4


def _ids(vocab=97, shape=(2, 9), seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _maxdiff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _roundtrip_with_transformers(model, path, arch, inputs, expected):
    """Saves `model` with hm3_jax and loads it with transformers' Flax class; its outputs must match."""
    import transformers

    save_pretrained(model, path)
    flax_cls = getattr(transformers, hf_fixtures._ARCH[arch][1])
    reloaded = flax_cls.from_pretrained(str(path))
    out = reloaded(inputs)
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    assert _maxdiff(out, expected) < TOL


@pytest.mark.parametrize(
    "arch, overrides",
    [
        ("LlamaForCausalLM", {}),
        ("LlamaForCausalLM", {"attention_bias": True}),
        ("MistralForCausalLM", {"sliding_window": 64}),
    ],
)
def test_llama_family_parity_both_ways(tmp_path, arch, overrides):
    flax_model, params, _ = hf_fixtures.make_checkpoint(tmp_path / "src", arch, seed=1, **overrides)
    ids = _ids()
    expected = flax_model(ids, params=params).logits
    model = load_pretrained(tmp_path / "src")
    assert (
        model.config.attention_bias
        == model.config.attention_out_bias
        == bool(overrides.get("attention_bias"))
    )
    out = models.apply(model.config, model.params, jnp.asarray(ids))
    assert out.shape == (2, 9, 97)
    assert _maxdiff(out, expected) < TOL
    _roundtrip_with_transformers(model, tmp_path / "ours", arch, ids, expected)


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    flax_model, params, _ = hf_fixtures.make_checkpoint(
        tmp_path / "src", "LlamaForCausalLM", seed=2, num_shards=3
    )
    assert len([f for f in os.listdir(tmp_path / "src") if f.endswith(".safetensors")]) == 3
    ids = _ids(seed=2)
    model = load_pretrained(tmp_path / "src")
    assert (
        _maxdiff(models.apply(model.config, model.params, ids), flax_model(ids, params=params).logits) < TOL
    )
    # Our sharded output holds exactly the tensors of our single-file output (transformers' Flax classes
    # cannot read sharded safetensors -- "coming soon" in 4.57 -- so this is compared file against file).
    save_pretrained(model, tmp_path / "one")
    save_pretrained(model, tmp_path / "many", max_shard_size="10KB")
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    many = {}
    for file in sorted(set(index["weight_map"].values())):
        shard = load_file(str(tmp_path / "many" / file))
        assert sum(v.nbytes for v in shard.values()) <= 10_000 or len(shard) == 1
        assert all(index["weight_map"][k] == file for k in shard)
        many.update(shard)
    assert many.keys() == one.keys()
    for k in one:
        np.testing.assert_array_equal(many[k], one[k])


def test_bf16_loading_keeps_bf16_and_matches(tmp_path):
    flax_model, params, _ = hf_fixtures.make_checkpoint(tmp_path / "src", "LlamaForCausalLM", seed=3)
    model = load_pretrained(tmp_path / "src", dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(model.params)} == {jnp.dtype(jnp.bfloat16)}
    ids = _ids(seed=3)
    out = models.apply(model.config, model.params, ids)
    expected = flax_model(ids, params=params).logits
    # bf16 has 8 mantissa bits: only closeness, not the float32 tolerance.
    assert _maxdiff(out, expected) < 0.1 * float(np.abs(expected).max())


def _qwen2_from_llama(tmp_path, tie: bool):
    """A Qwen2 checkpoint (q/k/v bias, no o bias) and its exact reference: FlaxLlama with attention_bias and a
    zero o_proj bias, which computes the same function (Qwen2 = Llama + q/k/v biases)."""
    import transformers

    flax_model, params, llama_cfg = hf_fixtures.make_flax_model(
        "LlamaForCausalLM", seed=4, attention_bias=True
    )
    state = hf_fixtures.pt_state_dict(params)
    for l in range(llama_cfg.num_hidden_layers):
        params["model"]["layers"][str(l)]["self_attn"]["o_proj"]["bias"][:] = 0.0
        del state[f"model.layers.{l}.self_attn.o_proj.bias"]
    if tie:  # FlaxLlama has no tying: give it the tied head explicitly, and store no lm_head (as HF does)
        params["lm_head"]["kernel"] = params["model"]["embed_tokens"]["embedding"].T.copy()
        del state["lm_head.weight"]
    qwen_cfg = transformers.Qwen2Config(**hf_fixtures.TINY["llama"], tie_word_embeddings=tie)
    qwen_cfg.architectures = ["Qwen2ForCausalLM"]
    hf_fixtures.write_checkpoint(tmp_path / "qwen", qwen_cfg, state)
    return flax_model, params, state


@pytest.mark.parametrize("tie", [False, True])
def test_qwen2_bias_handling(tmp_path, tie):
    flax_model, params, state = _qwen2_from_llama(tmp_path, tie)
    model = load_pretrained(tmp_path / "qwen")
    c = model.config
    assert c.attention_bias and not c.attention_out_bias and c.tie_word_embeddings == tie
    assert "bias" not in model.params["blocks"]["o"] and "bias" in model.params["blocks"]["k"]
    assert (model.params["head"] == {}) == tie
    # Hand check of one bias: block 2's k projection of x is W x + b with W, b straight from the file.
    x = np.random.default_rng(0).normal(size=32).astype(np.float32)
    w, b = state["model.layers.2.self_attn.k_proj.weight"], state["model.layers.2.self_attn.k_proj.bias"]
    block2 = jax.tree.map(lambda leaf: leaf[2], model.params["blocks"])
    np.testing.assert_allclose(
        x @ block2["k"]["kernel"] + block2["k"]["bias"], w @ x + b, rtol=1e-5, atol=1e-6
    )
    ids = _ids(seed=4)
    out = models.apply(c, model.params, ids)
    assert _maxdiff(out, flax_model(ids, params=params).logits) < TOL
    # Saving writes a Qwen2 checkpoint again: q/k/v biases, no o bias, no lm_head when tied.
    save_pretrained(model, tmp_path / "ours")
    hf = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert hf["architectures"] == ["Qwen2ForCausalLM"] and hf["tie_word_embeddings"] == tie
    saved = load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert saved.keys() == state.keys()
    for k in state:
        np.testing.assert_array_equal(saved[k], state[k])


def test_qwen2_against_pytorch_reference(tmp_path):
    torch = pytest.importorskip("torch")
    import transformers

    _, _, _ = _qwen2_from_llama(tmp_path, tie=False)
    ids = _ids(seed=5)
    reference = transformers.Qwen2ForCausalLM.from_pretrained(
        str(tmp_path / "qwen"), torch_dtype=torch.float32
    )
    with torch.no_grad():
        expected = reference(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    model = load_pretrained(tmp_path / "qwen")
    assert _maxdiff(models.apply(model.config, model.params, ids), expected) < TOL
