"""config.json forms: transformers 4 (`rope_theta`/`rope_scaling`) vs 5 (`rope_parameters`), fields hm3_jax does
not implement (clear errors, never silent defaults), and remote-code pointers (`auto_map`) refused and never
written."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hm3_jax import models
from hm3_jax.io import hf_config
from hm3_jax.io.checkpoint import Model, load_pretrained, save_pretrained
from hm3_jax.io.hf_config import config_from_hf_dict, read_hf_config
from hm3_jax.io.hf_config_write import hf_dict_from_config
from tests import hf_fixtures

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 50,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def _to_v5(hf: dict) -> dict:
    """The transformers-5 form of a transformers-4 config dict: RoPE settings moved into `rope_parameters`."""
    out = {k: v for k, v in hf.items() if k not in ("rope_theta", "rope_scaling")}
    out["rope_parameters"] = dict(
        hf.get("rope_scaling") or {"rope_type": "default"}, rope_theta=hf["rope_theta"]
    )
    return out


def _rewrite_v5(src, dst) -> dict:
    """Copies checkpoint `src` to `dst` with its config.json rewritten to the transformers-5 form."""
    shutil.copytree(src, dst)
    with open(os.path.join(src, "config.json")) as f:
        v5 = _to_v5(json.load(f))
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(v5, f, indent=2)
    return v5


def _ids(vocab: int, seed: int = 0):
    # 40 positions: past original_max_position_embeddings=16, where llama3 scaling matters.
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, size=(2, 40)), jnp.int32)


def _qwen25_checkpoint(path):
    """A transformers-4 Qwen2.5-style checkpoint: Qwen2Config as Qwen2.5 ships it (rope_theta 1e6, tied head,
    `use_sliding_window: false` with a `sliding_window` and `max_window_layers` present), q/k/v biases, no o bias."""
    import transformers

    _, params, _ = hf_fixtures.make_flax_model("LlamaForCausalLM", seed=7, attention_bias=True)
    state = hf_fixtures.pt_state_dict(params)
    for name in [n for n in state if n.endswith("o_proj.bias") or n == "lm_head.weight"]:
        del state[name]
    cfg = transformers.Qwen2Config(
        **hf_fixtures.TINY["llama"],
        rope_theta=1e6,
        tie_word_embeddings=True,
        use_sliding_window=False,
        sliding_window=32,
        max_window_layers=2,
    )
    cfg.architectures = ["Qwen2ForCausalLM"]
    hf_fixtures.write_checkpoint(path, cfg, state)


# ---------------------------------------------------------------------------- RoPE: transformers 4 vs 5


@pytest.mark.parametrize("family", ["llama3", "qwen2.5"])
def test_v4_and_v5_rope_forms_load_to_the_same_model(tmp_path, family):
    if family == "llama3":
        hf_fixtures.make_checkpoint(
            tmp_path / "v4", "LlamaForCausalLM", seed=3, rope_theta=5e5, rope_scaling=dict(LLAMA3_SCALING)
        )
    else:
        _qwen25_checkpoint(tmp_path / "v4")
    v5 = _rewrite_v5(tmp_path / "v4", tmp_path / "v5")
    assert "rope_theta" not in v5 and "rope_scaling" not in v5  # really the new form
    old, new = load_pretrained(tmp_path / "v4"), load_pretrained(tmp_path / "v5")
    assert old.config == new.config and hash(old.config) == hash(new.config)
    c = old.config
    if family == "llama3":
        assert c.rope_theta == 5e5 and c.rope_scaling_dict == LLAMA3_SCALING
    else:
        assert c.rope_theta == 1e6 and c.rope_scaling is None and c.sliding_window is None
        assert c.attention_bias and not c.attention_out_bias and c.tie_word_embeddings
    ids = _ids(c.vocab_size)
    logits_old = models.apply(old.config, old.params, ids)
    np.testing.assert_array_equal(logits_old, models.apply(new.config, new.params, ids))
    # The RoPE settings are used: plain RoPE with theta 1e4 gives other logits.
    plain = c.replace(rope_theta=1e4, rope_scaling=None)
    assert float(jnp.abs(logits_old - models.apply(plain, old.params, ids)).max()) > 1e-3


def test_both_forms_together_when_they_agree():
    v4 = dict(BASE, rope_theta=5e5, rope_scaling=dict(LLAMA3_SCALING))
    both = dict(_to_v5(v4), rope_theta=5e5, rope_scaling=dict(LLAMA3_SCALING))
    assert config_from_hf_dict(both) == config_from_hf_dict(v4) == config_from_hf_dict(_to_v5(v4))
    # The old `type` spelling and ints where transformers 5 writes floats are the same settings.
    old_spelling = dict(LLAMA3_SCALING, factor=8, type="llama3")
    del old_spelling["rope_type"]
    assert config_from_hf_dict(dict(both, rope_scaling=old_spelling)) == config_from_hf_dict(v4)


def test_default_rope_type_is_plain_rope():
    plain = config_from_hf_dict(dict(BASE, rope_theta=1e6))
    assert plain.rope_scaling is None
    for hf in (
        dict(BASE, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        dict(BASE, rope_theta=1e6, rope_scaling={"rope_type": "default"}),
        dict(BASE, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 1.0}),
        # transformers 5 nests per layer type in some models; identical entries are one RoPE.
        dict(BASE, rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6}}),
    ):
        assert config_from_hf_dict(hf) == plain
    # Missing theta everywhere: the architecture's transformers default.
    assert config_from_hf_dict(dict(BASE, rope_parameters={"rope_type": "default"})).rope_theta == 1e4


def test_v5_form_is_kept_or_rewritten_consistently():
    v5 = _to_v5(dict(BASE, rope_theta=5e5, rope_scaling=dict(LLAMA3_SCALING)))
    c = config_from_hf_dict(v5)
    assert hf_dict_from_config(c, base=v5) == v5  # unchanged config: the loaded dict as it was
    grown = c.replace(num_layers=5)
    out = hf_dict_from_config(
        grown, base=v5
    )  # rebuilt: transformers-4 RoPE keys only, no stale rope_parameters
    assert "rope_parameters" not in out and out["rope_theta"] == 5e5 and config_from_hf_dict(out) == grown


def test_linear_scaling_in_both_forms():
    v4 = dict(BASE, rope_theta=1e4, rope_scaling={"type": "linear", "factor": 2})
    c = config_from_hf_dict(v4)
    assert c == config_from_hf_dict(_to_v5(v4)) and c.rope_scaling_dict == {
        "rope_type": "linear",
        "factor": 2.0,
    }


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(rope_theta=1e4, rope_parameters={"rope_type": "default", "rope_theta": 5e5}), r"rope_theta=10000\.0 and rope_parameters\.rope_theta=500000\.0 disagree"),
        (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}), "rope_scaling=.* and rope_parameters=.* disagree"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6, "original_max_position_embeddings": 32}), r"rope_parameters\.rope_type='yarn' is not implemented"),
        (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), r"rope_scaling\.rope_type='dynamic' is not implemented"),
        (dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}), "'longrope' is not implemented"),
        (dict(rope_scaling={"factor": 2.0}), "rope_scaling has no 'rope_type'"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "lacks .*low_freq_factor"),
        (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}), "partial_rotary_factor=0.25"),
        (dict(partial_rotary_factor=1.0, rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5}), "partial_rotary_factor=1.0 and rope_parameters.partial_rotary_factor=0.5 disagree"),
        (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6}, "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}), "differ per layer type"),
        (dict(hidden_act="swish"), "hidden_act='swish'"),
    ],
)  # fmt: skip
def test_unsupported_or_contradictory_fields_are_clear_errors(fields, match):
    with pytest.raises(ValueError, match=match) as err:
        config_from_hf_dict(dict(BASE, **fields), where="ckpt/config.json")
    assert str(err.value).startswith("ckpt/config.json: ")


def test_error_names_the_file(tmp_path):
    os.makedirs(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text(
        json.dumps(dict(BASE, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}))
    )
    with pytest.raises(ValueError, match=r"ck/config\.json: rope_parameters\.rope_type='yarn'"):
        load_pretrained(tmp_path / "ck")


def test_fields_that_do_not_change_the_maths_are_accepted():
    plain = config_from_hf_dict(BASE)
    assert config_from_hf_dict(dict(BASE, attention_dropout=0.1, pretraining_tp=2, pad_token_id=0)) == plain
    # transformers' Mistral ignores `attention_bias` / `mlp_bias` (its projections have no bias).
    mistral = dict(BASE, architectures=["MistralForCausalLM"], sliding_window=8)
    assert config_from_hf_dict(dict(mistral, attention_bias=True, mlp_bias=True)) == config_from_hf_dict(
        mistral
    )


# ------------------------------------------------------------------------------ Qwen2 sliding windows


def _qwen(**fields):
    return dict(BASE, architectures=["Qwen2ForCausalLM"], **fields)


def test_qwen2_sliding_window_follows_transformers_layer_rule():
    # Off, or on for no layer (max_window_layers >= num layers): full attention everywhere.
    assert config_from_hf_dict(_qwen(use_sliding_window=False, sliding_window=8)).sliding_window is None
    assert (
        config_from_hf_dict(
            _qwen(use_sliding_window=True, sliding_window=8, max_window_layers=3)
        ).sliding_window
        is None
    )
    # Every layer slides: the window.
    assert (
        config_from_hf_dict(
            _qwen(use_sliding_window=True, sliding_window=8, max_window_layers=0)
        ).sliding_window
        == 8
    )
    every = ["sliding_attention"] * 3
    assert (
        config_from_hf_dict(
            _qwen(use_sliding_window=True, sliding_window=8, layer_types=every)
        ).sliding_window
        == 8
    )
    # Some layers, with a window covering every position: the same function as no window.
    assert (
        config_from_hf_dict(
            _qwen(use_sliding_window=True, sliding_window=64, max_window_layers=1)
        ).sliding_window
        is None
    )
    with pytest.raises(ValueError, match=r"sliding_window=8 on layers \[1, 2\] only \(max_window_layers=1\)"):
        config_from_hf_dict(_qwen(use_sliding_window=True, sliding_window=8, max_window_layers=1))
    mixed = ["full_attention", "sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match=r"on layers \[1\] only \(layer_types\)"):
        config_from_hf_dict(_qwen(use_sliding_window=True, sliding_window=8, layer_types=mixed))
    # Written back so that transformers' Qwen2 slides every layer too.
    c = config_from_hf_dict(_qwen(use_sliding_window=True, sliding_window=8, max_window_layers=0))
    hf = hf_dict_from_config(c)
    assert hf["architectures"] == ["Qwen2ForCausalLM"] and hf["max_window_layers"] == 0
    assert hf["layer_types"] == every and config_from_hf_dict(hf) == c
    import transformers

    assert transformers.Qwen2Config(**hf).layer_types == every  # transformers reads it the same way


def test_qwen2_hf_config_from_transformers_reads_back():
    """A Qwen2Config saved by transformers 4.57 (with its `layer_types`) reads as transformers builds it."""
    import transformers

    for kwargs, window in [
        (dict(use_sliding_window=False), None),
        (dict(use_sliding_window=True, max_window_layers=0), 16),
    ]:
        cfg = transformers.Qwen2Config(**hf_fixtures.TINY["llama"], sliding_window=16, **kwargs)
        cfg.architectures = ["Qwen2ForCausalLM"]
        assert config_from_hf_dict(cfg.to_dict()).sliding_window == window


# ------------------------------------------------------------------------------------- remote code


def test_auto_map_is_refused_at_load(tmp_path):
    hf_fixtures.make_checkpoint(tmp_path / "ck", "LlamaForCausalLM", seed=0)
    cfg_file = tmp_path / "ck" / "config.json"
    hf = json.loads(cfg_file.read_text())
    hf["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    cfg_file.write_text(json.dumps(hf))
    for load in (read_hf_config, load_pretrained):
        with pytest.raises(ValueError) as err:
            load(tmp_path / "ck")
        msg = str(err.value)
        assert str(cfg_file) in msg and "'auto_map'" in msg and "never runs checkpoint code" in msg
        assert "delete 'auto_map'" in msg and "LlamaForCausalLM" in msg
    # Following the advice loads it.
    del hf["auto_map"]
    cfg_file.write_text(json.dumps(hf))
    assert load_pretrained(tmp_path / "ck").config.family == "llama"


def test_auto_map_is_never_written(tmp_path):
    hf_fixtures.make_checkpoint(tmp_path / "ck", "LlamaForCausalLM", seed=0)
    model = load_pretrained(tmp_path / "ck")
    # An hf_config carrying remote-code pointers (e.g. built by hand from a source config.json).
    tainted = dict(model.hf_config, auto_map={"AutoConfig": "x.Y"}, custom_pipelines={"p": {"impl": "p.P"}})
    for config in (model.config, model.config.replace(num_layers=2)):  # kept base and rebuilt dict
        params = model.params
        if config.num_layers == 2:
            params = dict(params, blocks=jax.tree.map(lambda x: x[:2], params["blocks"]))
        assert not set(hf_config.REMOTE_CODE_KEYS) & set(hf_dict_from_config(config, tainted))
        save_pretrained(Model(config, params, tainted), tmp_path / "out")
        written = json.loads((tmp_path / "out" / "config.json").read_text())
        assert "auto_map" not in written and "custom_pipelines" not in written
        assert load_pretrained(tmp_path / "out").config == config
