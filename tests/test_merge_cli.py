"""Streaming merges of tiny HF-style safetensors checkpoints and the `python -m experiments.merge` CLI."""

import json
import os
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import yaml
from absl import flags
from safetensors import safe_open
from safetensors.numpy import save_file

from experiments import merge as cli
from hm3_jax.merging import merge
from hm3_jax.merging.groups import shell_end
from hm3_jax.merging.mergekit_config import gradient, parse_config
from hm3_jax.merging.passthrough import passthrough_checkpoints
from hm3_jax.merging.streaming import merge_checkpoints

SHAPES = {
    "lm_head.weight": (10, 4),
    "model.embed_tokens.weight": (10, 4),
    "model.layers.0.self_attn.q_proj.weight": (4, 4),
    "model.layers.0.mlp.up_proj.weight": (6, 4),
    "model.layers.1.self_attn.q_proj.weight": (4, 4),
    "model.layers.1.mlp.up_proj.weight": (6, 4),
    "model.norm.weight": (4,),
}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save(path, tensors, num_layers=2):
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "num_hidden_layers": num_layers, "torch_dtype": "bfloat16"}, f)
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        f.write('{"version": "1.0"}')


def _load(path):
    out = {}
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    for file in files:
        with safe_open(os.path.join(path, file), framework="numpy") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    return out


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(0)
    base = {k: rng.normal(size=s).astype(ml_dtypes.bfloat16) for k, s in SHAPES.items()}
    _save(root / "base", base)
    experts = []
    for i in range(3):
        tensors = {
            k: (v.astype(np.float32) + 0.1 * rng.normal(size=v.shape)).astype(ml_dtypes.bfloat16)
            for k, v in base.items()
        }
        _save(root / f"m{i}", tensors)
        experts.append(tensors)
    return {"root": root, "base": base, "experts": experts, "dirs": [str(root / f"m{i}") for i in range(3)]}


@pytest.mark.parametrize(
    "method,hparams",
    [
        ("dare_ties", {"drop_rate": 0.3, "density": 0.6}),
        ("ties", {"density": 0.5}),
        ("pcb", {"density": 0.4}),
        ("consensus", {"k": 2}),
    ],
)
def test_streaming_equals_in_memory(pool, tmp_path, method, hparams):
    key = jax.random.key(11)
    weights = [0.5, [0.2, 0.8], {"attention": 1.0, "default": 0.3}]
    out = tmp_path / "out"
    merge_checkpoints(
        method,
        str(pool["root"] / "base"),
        pool["dirs"],
        str(out),
        key=key,
        weights=weights,
        progress=False,
        max_shard_bytes=200,
        **hparams,
    )
    in_memory = merge(method, pool["base"], pool["experts"], key, weights=weights, **hparams)
    streamed = _load(out)
    assert sorted(streamed) == sorted(SHAPES)
    for name in SHAPES:
        assert streamed[name].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(streamed[name], np.asarray(in_memory[name]))
    # sharded output with an index, config and tokenizer copied, no temp dirs left behind
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(SHAPES)
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_streaming_errors_leave_no_output(pool, tmp_path):
    root = pool["root"]
    bad_shape = dict(pool["base"])
    bad_shape["model.layers.1.mlp.up_proj.weight"] = np.zeros((5, 4), ml_dtypes.bfloat16)
    _save(tmp_path / "bad_shape", bad_shape)
    nan = {k: v.copy() for k, v in pool["base"].items()}
    nan["model.norm.weight"][2] = np.nan
    _save(tmp_path / "nan", nan)
    missing = dict(pool["base"])
    del missing["lm_head.weight"]
    _save(tmp_path / "missing", missing)
    out = tmp_path / "out"
    base = str(root / "base")
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight.*shape \\(5, 4\\) vs \\(6, 4\\)"):
        merge_checkpoints(
            "ties", base, [pool["dirs"][0], str(tmp_path / "bad_shape")], str(out), progress=False
        )
    with pytest.raises(ValueError, match="NaN in checkpoint .*nan.* at tensor 'model.norm.weight'"):
        merge_checkpoints("ties", base, [pool["dirs"][0], str(tmp_path / "nan")], str(out), progress=False)
    with pytest.raises(ValueError, match="tensor 'lm_head.weight' missing"):
        merge_checkpoints("ties", base, [str(tmp_path / "missing")], str(out), progress=False)
    with pytest.raises(ValueError, match="empty"):
        merge_checkpoints("ties", base, [], str(out), progress=False)
    with pytest.raises(ValueError, match="weights: got 1 values for 2 models"):
        merge_checkpoints("ties", base, pool["dirs"][:2], str(out), weights=[1.0], progress=False)
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert leftovers == []


def test_passthrough_slices(pool, tmp_path):
    out = tmp_path / "frank"
    slices = [(pool["dirs"][0], 0, 2), (pool["dirs"][1], 1, 2)]
    summary = passthrough_checkpoints(slices, str(out), progress=False)
    assert summary["num_layers"] == 3
    merged = _load(out)
    np.testing.assert_array_equal(
        merged["model.layers.2.mlp.up_proj.weight"], pool["experts"][1]["model.layers.1.mlp.up_proj.weight"]
    )
    np.testing.assert_array_equal(
        merged["model.layers.1.self_attn.q_proj.weight"],
        pool["experts"][0]["model.layers.1.self_attn.q_proj.weight"],
    )
    # as mergekit: embeddings from the first slice's model, final norm and head from the last slice's
    np.testing.assert_array_equal(
        merged["model.embed_tokens.weight"], pool["experts"][0]["model.embed_tokens.weight"]
    )
    np.testing.assert_array_equal(merged["lm_head.weight"], pool["experts"][1]["lm_head.weight"])
    np.testing.assert_array_equal(merged["model.norm.weight"], pool["experts"][1]["model.norm.weight"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3


def test_merged_config_drops_remote_code_keys(pool, tmp_path):
    """A source config.json with `auto_map` / `custom_pipelines` (remote code) is written without them, by the
    arithmetic merge and by passthrough; every other key is kept."""
    remote = tmp_path / "remote"
    _save(remote, pool["base"])
    config = json.loads((remote / "config.json").read_text())
    config.update(auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"}, custom_pipelines={"x": {}})
    (remote / "config.json").write_text(json.dumps(config))
    merge_checkpoints("task_arithmetic", str(remote), pool["dirs"][:1], str(tmp_path / "out"), progress=False)
    passthrough_checkpoints([(str(remote), 0, 2)], str(tmp_path / "frank"), progress=False)
    for out in ("out", "frank"):
        written = json.loads((tmp_path / out / "config.json").read_text())
        assert not set(written) & {"auto_map", "custom_pipelines"}
        assert written["model_type"] == "llama" and written["torch_dtype"] == "bfloat16"


def test_shell_end():
    pre = ["model.embed_tokens.weight", "transformer.wte.weight", "transformer.wpe.weight",
           "vit.embeddings.patch_embeddings.projection.weight", "vit.embeddings.cls_token"]  # fmt: skip
    post = ["model.norm.weight", "lm_head.weight", "transformer.ln_f.weight", "gpt_neox.embed_out.weight",
            "vit.layernorm.weight", "classifier.weight"]  # fmt: skip
    assert [shell_end(n) for n in pre] == ["pre"] * len(pre)
    assert [shell_end(n) for n in post] == ["post"] * len(post)


def test_cli_passthrough_yaml_takes_shell_from_first_and_last_slice(tmp_path):
    """Tiny HF Llama checkpoints A, B (3 blocks each); slices A[0:2] + B[1:3]: embeddings are A's, final norm and
    head B's (mergekit's `pre_weights` / `post_weights`), blocks A0 A1 B1 B2; an empty slice [0, 0] of C at the
    end gives the head and norm of C without adding a block."""
    from tests.hf_fixtures import make_checkpoint

    dirs = {name: str(tmp_path / name) for name in "ABC"}
    for seed, name in enumerate("ABC"):
        make_checkpoint(dirs[name], "LlamaForCausalLM", seed=seed)
    src = {name: _load(d) for name, d in dirs.items()}
    for last in ("B", "C"):
        slices = [
            {"sources": [{"model": dirs["A"], "layer_range": [0, 2]}]},
            {"sources": [{"model": dirs["B"], "layer_range": [1, 3]}]},
        ]
        if last == "C":
            slices.append({"sources": [{"model": dirs["C"], "layer_range": [0, 0]}]})
        path = tmp_path / f"pass_{last}.yml"
        path.write_text(yaml.safe_dump({"merge_method": "passthrough", "slices": slices, "dtype": "float32"}))
        out = tmp_path / f"out_{last}"
        _run_cli([f"--config={path}", f"--out={out}", "--noprogress"])
        merged = _load(out)
        np.testing.assert_array_equal(
            merged["model.embed_tokens.weight"], src["A"]["model.embed_tokens.weight"]
        )
        for name in ("model.norm.weight", "lm_head.weight"):
            np.testing.assert_array_equal(merged[name], src[last][name])
        assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
        blocks = [("A", 0), ("A", 1), ("B", 1), ("B", 2)]
        layer_names = [n for n in src["A"] if n.startswith("model.layers.0.")]
        assert len(layer_names) == 9
        for new, (model, old) in enumerate(blocks):
            for name in layer_names:
                suffix = name[len("model.layers.0.") :]
                np.testing.assert_array_equal(
                    merged[f"model.layers.{new}.{suffix}"], src[model][f"model.layers.{old}.{suffix}"]
                )
        assert not any(n.startswith("model.layers.4.") for n in merged)


def test_yaml_parsing(pool):
    base = str(pool["root"] / "base")
    plan = parse_config(
        {
            "merge_method": "dare_ties",
            "base_model": base,
            "models": [
                {"model": base},
                {"model": pool["dirs"][0], "parameters": {"weight": 0.6, "density": 0.8}},
                {"model": pool["dirs"][1], "parameters": {"weight": [0.0, 1.0], "density": 0.5}},
            ],
            "parameters": {"normalize": True, "int8_mask": True},
            "dtype": "bfloat16",
        }
    )
    assert plan.models == tuple(pool["dirs"][:2])
    assert plan.hparams["drop_rate"] == pytest.approx([0.2, 0.5])
    assert plan.hparams["normalize"] is True
    # a gradient as mergekit evaluates it: block l at t = l / (L - 1), embeddings at t = 0, norm and head at 1
    w = plan.weights[1]
    assert [w("model.layers.0.mlp.up_proj.weight"), w("model.layers.1.mlp.up_proj.weight")] == [0.0, 1.0]
    assert [w("model.embed_tokens.weight"), w("model.norm.weight"), w("lm_head.weight")] == [0.0, 1.0, 1.0]
    np.testing.assert_allclose(gradient([0.0, 1.0, 0.0], 5), [0.0, 0.5, 1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="density must be a number"):
        parse_config(
            {
                "merge_method": "ties",
                "base_model": base,
                "models": [{"model": "a", "parameters": {"weight": 1.0, "density": [0.1, 0.5]}}],
            }
        )
    with pytest.raises(ValueError, match=r"weight\[0\]: a condition is \{filter, value\}"):
        parse_config(
            {
                "merge_method": "ties",
                "base_model": base,
                "models": [{"model": "a", "parameters": {"weight": [{"filters": "mlp", "value": 1.0}]}}],
            }
        )
    with pytest.raises(ValueError, match="filters are supported for 'weight' only"):
        parse_config(
            {
                "merge_method": "ties",
                "base_model": base,
                "models": [{"model": "a"}],
                "parameters": {"normalize": [{"filter": "mlp", "value": 1.0}]},
            }
        )
    with pytest.raises(ValueError, match="unsupported key\\(s\\) in merge config: \\['chat_template'\\]"):
        parse_config({"merge_method": "ties", "base_model": base, "models": [], "chat_template": "x"})
    with pytest.raises(ValueError, match="unsupported merge_method 'model_stock'"):
        parse_config({"merge_method": "model_stock", "models": []})
    with pytest.raises(ValueError, match="models\\[0\\].parameters: unsupported key\\(s\\) \\['gamma'\\]"):
        parse_config(
            {
                "merge_method": "ties",
                "base_model": base,
                "models": [{"model": "a", "parameters": {"gamma": 1}}],
            }
        )
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        parse_config(
            {
                "merge_method": "ties",
                "base_model": base,
                "models": [{"model": "a", "parameters": {"density": 2}}],
            }
        )


def _run_cli(argv):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["merge"] + argv)
    cli.main(["merge"])


def test_cli_yaml_in_process(pool, tmp_path):
    base = str(pool["root"] / "base")
    config = {
        "merge_method": "ties",
        "base_model": base,
        "models": [{"model": d, "parameters": {"weight": 1.0, "density": 0.5}} for d in pool["dirs"][:2]],
        "dtype": "float32",
    }
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    _run_cli([f"--config={path}", f"--out={out}", "--noprogress"])
    merged = _load(out)
    expected = merge("ties", pool["base"], pool["experts"][:2], density=0.5)
    for name in SHAPES:
        assert merged[name].dtype == np.float32
        np.testing.assert_allclose(merged[name], np.asarray(expected[name], np.float32), atol=1e-2)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    # plain flags, and errors: exit 1, nothing written
    out2 = tmp_path / "out2"
    _run_cli(
        [
            "--method=task_arithmetic",
            f"--base={base}",
            f"--models={pool['dirs'][0]}",
            "--weights=0.0",
            f"--out={out2}",
            "--noprogress",
        ]
    )
    for name in SHAPES:
        np.testing.assert_array_equal(_load(out2)[name], pool["base"][name])
    path.write_text(yaml.safe_dump({**config, "merge_method": "nuslerp"}))
    out3 = tmp_path / "out3"
    with pytest.raises(SystemExit) as exit_info:
        _run_cli([f"--config={path}", f"--out={out3}", "--noprogress"])
    assert exit_info.value.code == 2
    assert not out3.exists()
    flags.FLAGS.unparse_flags()


def test_cli_subprocess_unsupported_key(pool, tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text(
        yaml.safe_dump({"merge_method": "ties", "base_model": str(pool["root"] / "base"), "tokenizer": {}})
    )
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.merge", f"--config={path}", f"--out={out}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=120,
    )
    assert result.returncode == 2
    assert "unsupported key(s) in merge config: ['tokenizer']" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "method,hparams",
    [
        ("dare_ties", {"drop_rate": [0.3, 0.0, 0.5], "density": [0.6, 1.0, 0.3]}),
        ("dare_linear", {"drop_rate": 0.4}),
    ],
)
def test_streaming_in_small_chunks_equals_in_memory(pool, tmp_path, method, hparams):
    """Chunks of 8 elements (several per tensor, a padded last one): the host thresholds and the
    per-chunk flat offsets must give exactly the in-memory merge."""
    key = jax.random.key(3)
    weights = [0.7, [0.2, 0.8], 1.0]
    out = tmp_path / "out"
    merge_checkpoints(
        method,
        str(pool["root"] / "base"),
        pool["dirs"],
        str(out),
        key=key,
        weights=weights,
        progress=False,
        chunk_elements=8,
        **hparams,
    )
    in_memory = merge(method, pool["base"], pool["experts"], key, weights=weights, **hparams)
    streamed = _load(out)
    for name in SHAPES:
        np.testing.assert_array_equal(streamed[name], np.asarray(in_memory[name]))


def test_cli_yaml_filters_and_gradients_as_mergekit(pool, tmp_path):
    """mergekit's `evaluate_setting`: the first matching `filter` wins, else the unfiltered value; a gradient is
    taken at t = l / (L - 1) on block l, t = 0 on the embeddings, t = 1 on the final norm and head."""
    base = str(pool["root"] / "base")
    weight0 = [
        {"filter": "mlp", "value": 0.3},
        {"filter": "lm_head", "value": [5.0, 7.0]},
        {"value": [0.2, 0.8]},
    ]
    config = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": [
            {"model": pool["dirs"][0], "parameters": {"weight": weight0}},
            {"model": pool["dirs"][1]},  # the top-level weight
        ],
        "parameters": {"weight": [{"filter": "embed_tokens", "value": -1.0}, {"value": 0.5}]},
        "dtype": "float32",
    }
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config))
    _run_cli([f"--config={path}", f"--out={tmp_path / 'out'}", "--noprogress"])
    merged = _load(tmp_path / "out")
    expected_weights = {
        "lm_head.weight": (7.0, 0.5),
        "model.embed_tokens.weight": (0.2, -1.0),
        "model.layers.0.self_attn.q_proj.weight": (0.2, 0.5),
        "model.layers.0.mlp.up_proj.weight": (0.3, 0.5),
        "model.layers.1.self_attn.q_proj.weight": (0.8, 0.5),
        "model.layers.1.mlp.up_proj.weight": (0.3, 0.5),
        "model.norm.weight": (0.8, 0.5),
    }
    for name, weights in expected_weights.items():
        one = merge(
            "task_arithmetic",
            {name: pool["base"][name]},
            [{name: e[name]} for e in pool["experts"][:2]],
            weights=list(weights),
        )
        # the in-memory merge keeps the base's bf16; the CLI wrote float32 of the same float32 arithmetic
        np.testing.assert_array_equal(
            merged[name].astype(ml_dtypes.bfloat16), np.asarray(one[name]), err_msg=name
        )


def test_cli_slerp_t_gradient_as_mergekit(pool, tmp_path):
    """slerp's `t: [0, 1]`: the embeddings at t = 0 (the base), the final norm and head at t = 1 (the model)."""
    config = {
        "merge_method": "slerp",
        "base_model": str(pool["root"] / "base"),
        "models": [{"model": pool["dirs"][0]}],
        "parameters": {"t": [0.0, 1.0]},
        "dtype": "float32",
    }
    path = tmp_path / "slerp.yml"
    path.write_text(yaml.safe_dump(config))
    _run_cli([f"--config={path}", f"--out={tmp_path / 'out'}", "--noprogress"])
    merged = _load(tmp_path / "out")
    for name, source in [("model.embed_tokens.weight", pool["base"]), ("lm_head.weight", pool["experts"][0]),
                         ("model.norm.weight", pool["experts"][0])]:  # fmt: skip
        np.testing.assert_allclose(merged[name], source[name].astype(np.float32), atol=1e-5, err_msg=name)


VOCAB_CORPUS = ["the quick brown fox jumps over the lazy dog", "two plus two is four", "merge the models"]
TOKEN_TABLES = {  # architecture: its token-indexed tensors (GPT-2's head is tied to wte)
    "LlamaForCausalLM": ("model.embed_tokens.weight", "lm_head.weight"),
    "GPT2LMHeadModel": ("transformer.wte.weight",),
}


@pytest.fixture(scope="module", params=sorted(TOKEN_TABLES))
def vocab_pool(request, tmp_path_factory):
    """Tiny transformers-written checkpoints with tokenizers: "base" has the trained vocabulary T plus an added
    token `<base_only>`; expert "chat" has T plus two added tokens `<x1>`, `<x2>` (so `<x1>` has
    `<base_only>`'s id); expert "same" has the base's tokenizer. Embedding rows = tokens."""
    from tests import hf_fixtures

    arch = request.param
    root = tmp_path_factory.mktemp("vocab_pool")
    dirs = {}
    for name, added, seed in (
        ("base", ["<base_only>"], 0),
        ("chat", ["<x1>", "<x2>"], 1),
        ("same", ["<base_only>"], 2),
    ):
        tok = hf_fixtures.tiny_tokenizer(VOCAB_CORPUS, add_bos=arch.startswith("Llama"))
        tok.add_tokens(added)
        hf_fixtures.make_checkpoint(root / name, arch, seed=seed, vocab_size=len(tok))
        tok.save_pretrained(str(root / name))
        dirs[name] = str(root / name)
    return arch, dirs


def test_cli_tokenizer_source_base_maps_expert_token_rows_onto_base_ids(vocab_pool, tmp_path):
    """An expert with 2 added tokens: refused without `tokenizer_source` (naming it and the option, nothing
    written); with `tokenizer_source: base` its embedding / LM-head rows follow the token strings onto the
    base's ids (`<base_only>`: the base's row; `<x1>`, `<x2>` dropped), and the merge equals the merge of an
    expert whose rows were aligned by hand; output vocab_size and tokenizer are the base's."""
    from hm3_jax.io.vocab import vocab_of

    arch, dirs = vocab_pool
    base, chat, same = dirs["base"], dirs["chat"], dirs["same"]
    vb, vc = vocab_of(base), vocab_of(chat)
    n = (
        len(vb) - 1
    )  # shared tokens have ids 0..n-1 in both; id n is `<base_only>` in the base, `<x1>` in chat
    assert vb["<base_only>"] == vc["<x1>"] == n and vc["<x2>"] == n + 1 and len(vc) == n + 2

    with pytest.raises(ValueError, match=r"(?s)'chat'.*2 tokens only the expert has.*tokenizer_source: base"):
        merge_checkpoints("task_arithmetic", base, [chat, same], str(tmp_path / "lib"), progress=False)
    assert not (tmp_path / "lib").exists()
    config = {
        "merge_method": "ties",
        "base_model": base,
        "models": [
            {"model": m, "parameters": {"weight": w, "density": 0.7}} for m, w in ((chat, 0.6), (same, 0.4))
        ],
        "dtype": "float32",
    }
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        _run_cli([f"--config={path}", f"--out={tmp_path / 'refused'}", "--noprogress"])
    assert exit_info.value.code == 2 and not (tmp_path / "refused").exists()

    # the expert aligned by hand: shared rows its own, `<base_only>`'s row the base's, a checkpoint of the base's
    # shapes, config and tokenizer
    b, c = _load(base), _load(chat)
    aligned = dict(c)
    for name in TOKEN_TABLES[arch]:
        rows = c[name][: n + 1].copy()
        rows[n] = b[name][n]
        aligned[name] = rows
    hand = tmp_path / "chat_aligned"
    hand.mkdir()
    save_file(aligned, str(hand / "model.safetensors"))
    for f in os.listdir(base):
        if not f.endswith(".safetensors"):
            shutil.copy2(os.path.join(base, f), hand / f)

    path.write_text(yaml.safe_dump({**config, "tokenizer_source": "base"}))
    _run_cli([f"--config={path}", f"--out={tmp_path / 'out'}", "--noprogress"])
    by_hand = {**config, "models": [{**config["models"][0], "model": str(hand)}, config["models"][1]]}
    path.write_text(yaml.safe_dump(by_hand))
    _run_cli([f"--config={path}", f"--out={tmp_path / 'out_hand'}", "--noprogress"])
    flags.FLAGS.unparse_flags()
    merged, expected = _load(tmp_path / "out"), _load(tmp_path / "out_hand")
    assert sorted(merged) == sorted(b)
    for name in b:
        assert merged[name].shape == b[name].shape
        np.testing.assert_array_equal(merged[name], expected[name], err_msg=name)
    # the token rows really moved: aligning by id (chat's first n + 1 rows as they are) differs at `<base_only>`
    table = TOKEN_TABLES[arch][0]
    assert not np.array_equal(aligned[table][n], c[table][n])
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["vocab_size"] == len(vb) and vocab_of(tmp_path / "out") == vb
