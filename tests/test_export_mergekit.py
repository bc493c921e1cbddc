"""The mergekit YAMLs HM3 exports rebuild the models it chose: `python -m experiments.merge` on
`merged.mergekit.yml` gives the parameter-level merge the export wrote, and on `path.mergekit.yml` the path
model (same logits as `models.apply_path` over the shell, pool and path)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from absl import flags

from experiments import merge as cli
from hm3_jax import load_pretrained, models
from hm3_jax.merging.safetensors_stream import Checkpoint
from hm3_jax.pipeline import export
from hm3_jax.search import merge_genes, param_level
from tests.hf_fixtures import make_checkpoint

PREFERENCE = [0.3, 0.7]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Tiny HF Llama checkpoints (3 blocks): a base and two "experts" (other seeds), loaded as params."""
    root = tmp_path_factory.mktemp("zoo")
    names = {"base": 0, "e0": 1, "e1": 2}
    for name, seed in names.items():
        make_checkpoint(root / name, "LlamaForCausalLM", seed=seed)
    loaded = {name: load_pretrained(root / name) for name in names}
    return {
        "config": loaded["base"].config,
        "problem": types.SimpleNamespace(
            base=loaded["base"].params, experts=[loaded["e0"].params, loaded["e1"].params]
        ),
        "dirs": {"base": str(root / "base"), "experts": [str(root / "e0"), str(root / "e1")]},
    }


def _run_cli(argv):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["merge"] + argv)
    try:
        cli.main(["merge"])
    finally:
        flags.FLAGS.unparse_flags()


def _tensors(directory) -> dict:
    with Checkpoint(str(directory)) as ckpt:
        return {name: np.asarray(ckpt.get(name), np.float32) for name in ckpt.names}


def _export(zoo, out_dir, merged, hparams, path):
    problem = zoo["problem"]
    pool = models.make_pool([e["blocks"] for e in problem.experts] + [merged["blocks"]])
    written = export.export_preference(
        str(out_dir), zoo["config"], merged, pool, path, PREFERENCE, zoo["dirs"], hparams
    )
    return written, pool


def _rebuild_merged(zoo, tmp_path, merged, hparams):
    """Exports `merged`, runs experiments.merge on merged.mergekit.yml; returns (yaml dict, rebuilt, written)."""
    written, _ = _export(zoo, tmp_path / "export", merged, hparams, [0])
    config_path = tmp_path / "export" / "merged.mergekit.yml"
    _run_cli([f"--config={config_path}", f"--out={tmp_path / 'rebuilt'}", "--noprogress"])
    return (
        yaml.safe_load(config_path.read_text()),
        _tensors(tmp_path / "rebuilt"),
        _tensors(written["merged"]),
    )


def _assert_same_tensors(rebuilt, expected):
    assert sorted(rebuilt) == sorted(expected)
    for name in expected:
        np.testing.assert_allclose(rebuilt[name], expected[name], rtol=1e-6, atol=1e-6, err_msg=name)


def test_tuned_task_arithmetic_with_scale_and_block_weights(zoo, tmp_path):
    """(a) sign election off, density 1, drop rate 0, scale 2.26, per-block weights: task_arithmetic with
    weight = scale * lambda_k * b_l per block and scale * lambda_k * mean(b) on the embeddings, norm and head."""
    hp = {
        "density": 1.0,
        "drop_rate": 0.0,
        "scale": 2.26,
        "block_weights": [0.8, 1.3, 1.1],
        "sign_election": False,
    }
    merged = merge_genes.tuned_merge(zoo["problem"], PREFERENCE, jax.random.key(0), hp)
    cfg, rebuilt, expected = _rebuild_merged(zoo, tmp_path, merged, hp)
    assert cfg["merge_method"] == "task_arithmetic"
    assert cfg["parameters"] == {"normalize": False}
    weight = cfg["models"][1]["parameters"]["weight"]
    assert {c.get("filter") for c in weight[:-1]} == {
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
    }
    assert weight[0]["value"] == pytest.approx(2.26 * 0.7 * np.mean([0.8, 1.3, 1.1]))
    assert weight[-1] == {"value": pytest.approx([2.26 * 0.7 * b for b in (0.8, 1.3, 1.1)])}
    _assert_same_tensors(rebuilt, expected)


def test_paper_ties_with_density(zoo, tmp_path):
    """(b) the paper's merge at density 0.4, drop rate 0: TIES (exact top-k trim) with weight = lambda_k."""
    hp = {"density": 0.4, "drop_rate": 0.0}
    merged = param_level.paper_merge(zoo["problem"], PREFERENCE, jax.random.key(0), 0.4, 0.0)
    cfg, rebuilt, expected = _rebuild_merged(zoo, tmp_path, merged, hp)
    assert cfg["merge_method"] == "ties"
    assert cfg["parameters"] == {"normalize": False}
    assert [m["parameters"] for m in cfg["models"]] == [
        {"weight": pytest.approx(lam), "density": pytest.approx(0.4)} for lam in PREFERENCE
    ]
    _assert_same_tensors(rebuilt, expected)


def test_tuned_ties_with_density_scale_and_block_weights(zoo, tmp_path):
    """(b) the tuned merge with sign election at density 0.5 (every tensor here has an even number of
    entries, where its quantile trim keeps the same n / 2 entries as mergekit's top-k), scale and block
    weights."""
    hp = {
        "density": 0.5,
        "drop_rate": 0.0,
        "scale": 1.7,
        "block_weights": [1.2, 0.7, 0.9],
        "sign_election": True,
    }
    merged = merge_genes.tuned_merge(zoo["problem"], PREFERENCE, jax.random.key(0), hp)
    cfg, rebuilt, expected = _rebuild_merged(zoo, tmp_path, merged, hp)
    assert cfg["merge_method"] == "ties"
    assert all(m["parameters"]["density"] == pytest.approx(0.5) for m in cfg["models"])
    _assert_same_tensors(rebuilt, expected)


def test_dare_yaml_says_it_is_not_bit_exact(zoo, tmp_path):
    text = export.mergekit_merge_yaml("b", ["e0", "e1"], PREFERENCE, {"density": 0.7, "drop_rate": 0.3})
    cfg = yaml.safe_load(text)
    assert cfg["merge_method"] == "dare_ties"
    assert [m["parameters"]["density"] for m in cfg["models"]] == [pytest.approx(0.7)] * 2
    assert "same merge in distribution" in text and "NOT EXACT" in text
    text = export.mergekit_merge_yaml(
        "b", ["e0", "e1"], PREFERENCE, {"drop_rate": 0.2, "sign_election": False}
    )
    assert yaml.safe_load(text)["merge_method"] == "dare_linear"


@pytest.mark.parametrize(
    "path",
    [
        [
            0 * 3 + 2,
            2 * 3 + 0,
            1 * 3 + 1,
            0 * 3 + 0,
            -1,
        ],  # starts and ends in an expert: Theta's shell by empty slices
        [2 * 3 + 0, 1 * 3 + 2, 2 * 3 + 2],  # starts and ends in Theta (merged/): no empty slices needed
    ],
)
def test_path_model_yaml_rebuilds_the_path_model(zoo, tmp_path, path):
    merged = param_level.paper_merge(zoo["problem"], PREFERENCE, jax.random.key(0), 0.5, 0.0)
    written, pool = _export(zoo, tmp_path / "export", merged, {"density": 0.5, "drop_rate": 0.0}, path)
    config_path = tmp_path / "export" / "path.mergekit.yml"
    slices = yaml.safe_load(config_path.read_text())["slices"]
    steps = [p for p in path if p >= 0]
    bookends = int(steps[0] // 3 != 2) + int(steps[-1] // 3 != 2)
    assert len(slices) == len(steps) + bookends
    _run_cli([f"--config={config_path}", f"--out={tmp_path / 'rebuilt'}", "--noprogress"])
    rebuilt = load_pretrained(tmp_path / "rebuilt")
    assert rebuilt.config.num_layers == len(steps)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, zoo["config"].vocab_size, (2, 7)), jnp.int32)
    got = models.apply(rebuilt.config, rebuilt.params, ids)
    want = models.apply_path(zoo["config"], models.shell_of(merged), pool, jnp.asarray(path, jnp.int32), ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    _assert_same_tensors(_tensors(tmp_path / "rebuilt"), _tensors(written["path_model"]))


def test_yaml_carries_tokenizer_source_and_dtype():
    """A run that mapped experts onto the base's vocabulary (spec `tokenizer_source: base`) asks mergekit for the
    same; the YAML's dtype is the merged model's."""
    text = export.mergekit_merge_yaml("B", ["E1", "E2"], [0.5, 0.5], {"density": 1.0}, (), "base", "bfloat16")
    cfg = yaml.safe_load(text)
    assert cfg["tokenizer_source"] == "base" and cfg["dtype"] == "bfloat16"
    plain = yaml.safe_load(export.mergekit_merge_yaml("B", ["E1", "E2"], [0.5, 0.5], {"density": 1.0}))
    assert "tokenizer_source" not in plain and plain["dtype"] == "float32"
