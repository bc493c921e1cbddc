"""Parity with transformers for GPT-2 and ViT (see test_io_parity.py for the method): tiny random Flax models
written as PyTorch-named safetensors, loaded with hm3_jax and compared, saved with hm3_jax and reloaded with
transformers' Flax classes and compared again (float32, max abs diff < 1e-4)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from hm3_jax import models
from hm3_jax.io.checkpoint import load_pretrained
from tests import hf_fixtures
from tests.test_io_parity import TOL, _ids, _maxdiff, _roundtrip_with_transformers


def test_gpt2_parity_both_ways(tmp_path):
    pytest.importorskip("hm3_jax.models.gpt2", reason="GPT-2 model module not written yet")
    flax_model, params, _ = hf_fixtures.make_checkpoint(tmp_path / "src", "GPT2LMHeadModel", seed=6)
    # Real GPT-2 files also carry the causal-mask buffers `h.{l}.attn.bias`; they hold no parameters.
    state = load_file(str(tmp_path / "src" / "model.safetensors"))
    for l in range(3):
        state[f"transformer.h.{l}.attn.bias"] = np.tril(np.ones((64, 64), np.float32))[None, None]
    hf = json.loads((tmp_path / "src" / "config.json").read_text())
    hf_fixtures.write_checkpoint(tmp_path / "src", hf, state)
    ids = _ids(seed=6)
    expected = flax_model(ids, params=params).logits
    model = load_pretrained(tmp_path / "src")
    assert model.config.family == "gpt2" and model.params["head"] == {}
    assert _maxdiff(models.apply(model.config, model.params, jnp.asarray(ids)), expected) < TOL
    _roundtrip_with_transformers(model, tmp_path / "ours", "GPT2LMHeadModel", ids, expected)
    # The original openai-community/gpt2 files carry GPT2Model names (no "transformer." prefix).
    bare = {k.removeprefix("transformer."): v for k, v in state.items()}
    hf_fixtures.write_checkpoint(tmp_path / "bare", hf, bare)
    bare_model = load_pretrained(tmp_path / "bare")
    assert _maxdiff(models.apply(bare_model.config, bare_model.params, jnp.asarray(ids)), expected) < TOL


@pytest.mark.parametrize("arch", ["ViTModel", "ViTForImageClassification"])
def test_vit_parity_both_ways(tmp_path, arch):
    pytest.importorskip("hm3_jax.models.vit", reason="ViT model module not written yet")
    overrides = {"num_labels": 5} if arch == "ViTForImageClassification" else {}
    flax_model, params, _ = hf_fixtures.make_checkpoint(tmp_path / "src", arch, seed=7, **overrides)
    pixels = np.random.default_rng(7).normal(size=(2, 3, 16, 16)).astype(np.float32)  # NCHW, as HF
    out = flax_model(pixels, params=params)
    expected = out.logits if hasattr(out, "logits") else out.last_hidden_state
    model = load_pretrained(tmp_path / "src")
    assert model.config.num_labels == overrides.get("num_labels", 0)
    ours = models.apply(model.config, model.params, jnp.asarray(pixels))
    assert ours.shape == expected.shape
    assert _maxdiff(ours, expected) < TOL
    _roundtrip_with_transformers(model, tmp_path / "ours", arch, pixels, expected)
