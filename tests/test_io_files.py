"""HF checkpoint I/O without reference models: config mapping, shard planning, file discovery, bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from hm3_jax import models
from hm3_jax.io import atomic, hf_config, hf_config_write, safetensors_io
from hm3_jax.io.checkpoint import Model, load_pretrained, save_pretrained
from hm3_jax.io.hf_config import UnsupportedArchitectureError, config_from_hf_dict
from hm3_jax.io.hf_config_write import hf_dict_from_config
from hm3_jax.io.safetensors_io import CheckpointError

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 50,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 32,
    "rope_scaling": {"type": "linear", "factor": 2.0},
    "bos_token_id": 1,
}


def _write(path, hf, tensors=None):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f)
    if tensors is not None:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return str(path)


# --------------------------------------------------------------------------------------------- config.json


def test_llama_family_configs_map_fields_and_biases():
    c = config_from_hf_dict(LLAMA)
    assert (c.family, c.num_layers, c.num_heads, c.kv_heads, c.head_size, c.norm_eps) == (
        "llama",
        2,
        4,
        2,
        4,
        1e-5,
    )
    assert c.rope_scaling_dict == {"rope_type": "linear", "factor": 2.0}
    assert (c.attention_bias, c.attention_out_bias, c.tie_word_embeddings, c.sliding_window) == (
        False,
        False,
        False,
        None,
    )
    biased = config_from_hf_dict(dict(LLAMA, attention_bias=True))  # Llama's flag biases q, k, v and o
    assert biased.attention_bias and biased.attention_out_bias
    qwen = config_from_hf_dict(dict(LLAMA, architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True))
    assert qwen.attention_bias and not qwen.attention_out_bias and qwen.tie_word_embeddings
    mistral = config_from_hf_dict(dict(LLAMA, architectures=["MistralForCausalLM"], sliding_window=8))
    assert mistral.sliding_window == 8
    no_kv = config_from_hf_dict({k: v for k, v in LLAMA.items() if k != "num_key_value_heads"})
    assert no_kv.kv_heads == 4


def test_gpt2_and_vit_configs():
    gpt2 = config_from_hf_dict(
        {
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": 50,
            "n_embd": 16,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 8,
        }
    )
    assert (gpt2.family, gpt2.intermediate_size, gpt2.hidden_act, gpt2.norm_eps) == (
        "gpt2",
        64,
        "gelu_new",
        1e-5,
    )
    vit = {
        "architectures": ["ViTModel"],
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 8,
        "patch_size": 4,
        "id2label": {"0": "a", "1": "b"},
    }
    assert (
        config_from_hf_dict(vit).num_labels == 0
    )  # the bare model has no classifier, whatever id2label says
    cls = config_from_hf_dict(
        dict(vit, architectures=["ViTForImageClassification"], id2label={"0": "a", "1": "b", "2": "c"})
    )
    assert (cls.num_labels, cls.num_patches, cls.norm_eps) == (3, 4, 1e-12)


@pytest.mark.parametrize(
    "arch", ["LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "GPT2LMHeadModel", "ViTModel"]
)
def test_config_roundtrip_through_hf_dict(arch):
    if arch == "GPT2LMHeadModel":
        c = models.ModelConfig(
            family="gpt2", vocab_size=50, hidden_size=16, intermediate_size=40, num_heads=4
        )
    elif arch == "ViTModel":
        c = models.ModelConfig(
            family="vit", hidden_size=16, num_heads=4, image_size=8, patch_size=4, num_labels=0
        )
    else:
        c = config_from_hf_dict(dict(LLAMA, architectures=[arch], sliding_window=16))
    hf = hf_dict_from_config(c)
    assert hf["architectures"] == [arch]
    assert hf_config_write.config_signature(
        config_from_hf_dict(json.loads(json.dumps(hf)))
    ) == hf_config_write.config_signature(c)


def test_hf_dict_keeps_unmodelled_fields_and_updates_modelled_ones():
    c = config_from_hf_dict(LLAMA)
    hf = hf_dict_from_config(c.replace(num_layers=5), base=LLAMA)
    assert (
        hf["bos_token_id"] == 1
        and hf["num_hidden_layers"] == 5
        and hf["architectures"] == ["LlamaForCausalLM"]
    )


def test_unsupported_architecture_lists_supported_ones(tmp_path):
    path = _write(tmp_path / "bert", {"architectures": ["BertModel"], "hidden_size": 8})
    with pytest.raises(UnsupportedArchitectureError) as err:
        load_pretrained(path)
    for arch in hf_config.SUPPORTED_ARCHITECTURES:
        assert arch in str(err.value)
    with pytest.raises(UnsupportedArchitectureError, match="no 'architectures'"):
        config_from_hf_dict({"hidden_size": 8})


def test_missing_config_field_named():
    with pytest.raises(ValueError, match="intermediate_size"):
        config_from_hf_dict({k: v for k, v in LLAMA.items() if k != "intermediate_size"})


def test_missing_directory_config_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_pretrained(tmp_path / "file")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path / "empty")
    path = _write(tmp_path / "noweights", LLAMA)
    with pytest.raises(CheckpointError, match="has no weights"):
        load_pretrained(path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_pretrained(tmp_path / "bad")


def test_bin_only_directory_is_refused_without_unpickling(tmp_path):
    path = _write(tmp_path / "bin", LLAMA)
    # Not a valid pickle: any attempt to unpickle it would raise a different error than the one we expect.
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"\x80\x04 this is not a pickle")
    with pytest.raises(CheckpointError) as err:
        load_pretrained(path)
    msg = str(err.value)
    assert "pytorch_model.bin" in msg and "safe_serialization=True" in msg and "never loaded" in msg


def test_bad_dtype(tmp_path):
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        load_pretrained(tmp_path, dtype=jnp.int32)


# --------------------------------------------------------------------------------------------- shards


def test_parse_size():
    assert safetensors_io.parse_size("2GB") == 2 * 10**9
    assert safetensors_io.parse_size("10KiB") == 10 * 1024
    assert safetensors_io.parse_size("1.5MB") == 1_500_000
    assert safetensors_io.parse_size(123) == 123
    for bad in ("2 parsecs", "", -1, 0, True):
        with pytest.raises(ValueError):
            safetensors_io.parse_size(bad)


def test_plan_shards_by_hand():
    sizes = [("a", 40), ("b", 40), ("c", 30), ("d", 150), ("e", 10)]
    assert safetensors_io.plan_shards(sizes, 100) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert safetensors_io.plan_shards(sizes, 10**6) == [["a", "b", "c", "d", "e"]]
    assert safetensors_io.shard_file_names(2) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert safetensors_io.shard_file_names(1) == ["model.safetensors"]


def test_index_naming_missing_shard_is_an_error(tmp_path):
    path = _write(tmp_path / "ck", LLAMA)
    save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "ck" / "model-00001-of-00002.safetensors"))
    index = {"weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}
    (tmp_path / "ck" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002"):
        safetensors_io.find_weight_files(path)


# --------------------------------------------------------------------------------------------- our own models


def _tiny_llama(dtype=jnp.float32):
    config = config_from_hf_dict(LLAMA)
    return Model(config, models.init(config, jax.random.key(0), dtype=dtype))


def test_save_load_roundtrip_sharded_and_bf16(tmp_path):
    model = _tiny_llama()
    save_pretrained(model, tmp_path / "one")
    save_pretrained(model, tmp_path / "many", max_shard_size=3000)
    files = sorted(os.listdir(tmp_path / "many"))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    one = safetensors_io.find_weight_files(tmp_path / "one")
    assert set(index["weight_map"]) == set(one)
    assert index["metadata"]["total_size"] == os.path.getsize(
        tmp_path / "one" / "model.safetensors"
    ) - _header(tmp_path / "one" / "model.safetensors")
    for path in ("one", "many"):
        back = load_pretrained(tmp_path / path)
        jax.tree.map(np.testing.assert_array_equal, back.params, model.params)
        assert back.config == model.config
    bf16 = load_pretrained(tmp_path / "many", dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(bf16.params)} == {jnp.dtype(jnp.bfloat16)}
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(a, b.astype(jnp.bfloat16)), bf16.params, model.params
    )
    save_pretrained(bf16, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="numpy") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert f.metadata() == {"format": "pt"}
    back = load_pretrained(tmp_path / "bf16", dtype=jnp.bfloat16)
    jax.tree.map(np.testing.assert_array_equal, back.params, bf16.params)


def test_float16_file_is_cast_on_read(tmp_path):
    from safetensors.numpy import load_file

    model = _tiny_llama()
    save_pretrained(model, tmp_path / "ck")
    state = load_file(str(tmp_path / "ck" / "model.safetensors"))
    hf = json.loads((tmp_path / "ck" / "config.json").read_text())
    half = {k: v.astype(np.float16) for k, v in state.items()}
    back = load_pretrained(_write(tmp_path / "half", hf, half))
    assert {x.dtype for x in jax.tree.leaves(back.params)} == {jnp.dtype(jnp.float32)}
    want = jax.tree.map(lambda x: np.asarray(x).astype(np.float16).astype(np.float32), model.params)
    jax.tree.map(np.testing.assert_array_equal, back.params, want)


def _header(file):
    with open(file, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_pytorch_names_and_layouts_by_hand(tmp_path):
    model = _tiny_llama()
    save_pretrained(model, tmp_path / "ck")
    from safetensors.numpy import load_file

    state = load_file(str(tmp_path / "ck" / "model.safetensors"))
    blocks = model.params["blocks"]
    # nn.Linear stores [out, in]; ours is [in, out].
    np.testing.assert_array_equal(
        state["model.layers.1.self_attn.k_proj.weight"], np.asarray(blocks["k"]["kernel"][1]).T
    )
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 4, 16)
    np.testing.assert_array_equal(
        state["model.layers.0.input_layernorm.weight"], blocks["attn_norm"]["scale"][0]
    )
    np.testing.assert_array_equal(state["lm_head.weight"], np.asarray(model.params["head"]["kernel"]).T)
    assert len(state) == 2 + 2 * 9 + 1


def test_shape_mismatch_names_the_tensor(tmp_path):
    model = _tiny_llama()
    save_pretrained(model, tmp_path / "ck")
    hf = json.loads((tmp_path / "ck" / "config.json").read_text())
    hf["intermediate_size"] = 20
    (tmp_path / "ck" / "config.json").write_text(json.dumps(hf))
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\[24, 16\].*\[20, 16\]"
    ):
        load_pretrained(tmp_path / "ck")


def test_missing_and_unexpected_tensors_named(tmp_path):
    from safetensors.numpy import load_file

    model = _tiny_llama()
    save_pretrained(model, tmp_path / "ck")
    state = load_file(str(tmp_path / "ck" / "model.safetensors"))
    hf = json.loads((tmp_path / "ck" / "config.json").read_text())
    missing = {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(CheckpointError, match=r"missing 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(_write(tmp_path / "missing", hf, missing))
    extra = dict(state, **{"model.layers.0.self_attn.q_proj.lora_A": np.zeros((2, 16), np.float32)})
    with pytest.raises(CheckpointError, match="lora_A"):
        load_pretrained(_write(tmp_path / "extra", hf, extra))
    deeper = dict(state, **{"model.layers.2.input_layernorm.weight": np.ones(16, np.float32)})
    with pytest.raises(CheckpointError, match="beyond num_layers=2"):
        load_pretrained(_write(tmp_path / "deeper", hf, deeper))
    # Buffers that hold no parameters are skipped; base-model names without the "model." prefix load too.
    bare = {k.removeprefix("model."): v for k, v in state.items()}
    bare["layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(2, np.float32)
    back = load_pretrained(_write(tmp_path / "bare", hf, bare))
    jax.tree.map(np.testing.assert_array_equal, back.params, model.params)


def test_non_finite_tensor_names_the_file_and_tensor(tmp_path):
    """A NaN or Inf weight (float32 or bfloat16, in any shard) is a CheckpointError naming file and tensor."""
    import ml_dtypes
    from safetensors.numpy import load_file

    model = _tiny_llama()
    save_pretrained(model, tmp_path / "ck")
    state = load_file(str(tmp_path / "ck" / "model.safetensors"))
    hf = json.loads((tmp_path / "ck" / "config.json").read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    for value, dtype in ((np.nan, np.float32), (np.inf, ml_dtypes.bfloat16)):
        bad = {k: v.astype(dtype) for k, v in state.items()}
        bad[name] = bad[name].copy()
        bad[name][3, 2] = value
        path = _write(tmp_path / f"bad_{np.dtype(dtype).name}", hf, bad)
        with pytest.raises(CheckpointError) as err:
            load_pretrained(path)
        message = str(err.value)
        assert os.path.join(path, "model.safetensors") in message and name in message, message
        assert "NaN or Inf" in message and "1 of" in message, message


def test_failed_save_leaves_nothing_behind(tmp_path):
    model = _tiny_llama()
    bad = Model(model.config, jax.tree.map(lambda x: x, model.params))
    bad.params["blocks"]["q"]["kernel"] = bad.params["blocks"]["q"]["kernel"][:, :, :4]
    with pytest.raises(ValueError, match="blocks/q/kernel"):
        save_pretrained(bad, tmp_path / "out")
    assert os.listdir(tmp_path) == []

    # A failure in the middle of writing shards: the target is not created and the temp dir is removed.
    def boom(name):
        raise RuntimeError(f"disk full while writing {name}")

    specs = [("a", (4,), np.float32), ("b", (4,), np.float32)]
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic.atomic_directory(tmp_path / "out") as tmp:
            safetensors_io.write_safetensors(tmp, specs, boom, 8)
    assert os.listdir(tmp_path) == []


def test_save_over_existing_directory_keeps_tokenizer_files(tmp_path):
    model = _tiny_llama()
    save_pretrained(model, tmp_path / "ck", max_shard_size=3000)
    (tmp_path / "ck" / "tokenizer.json").write_text("{}")
    save_pretrained(model, tmp_path / "ck")  # now a single file: stale shards and index must be gone
    assert sorted(os.listdir(tmp_path / "ck")) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_tokenizer_loads_through_autotokenizer(tmp_path):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    from hm3_jax.io import load_tokenizer

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "merge": 3}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded("hello merge world foo")["input_ids"] == [1, 3, 2, 0]
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="remote code"):
        load_tokenizer(tmp_path / "tok", trust_remote_code=True)
