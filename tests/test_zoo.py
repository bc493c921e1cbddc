"""The tiny3 zoo: the smoke config builds HF directories, reloads from cache, detects config changes."""

import json
import os

import numpy as np
import pytest

from experiments.configs import tiny3
from hm3_jax.tasks import data, objectives, tiny3_zoo, zoo_format
from hm3_jax.tasks import zoo as zoo_lib


@pytest.fixture(scope="module")
def smoke_config():
    return tiny3.get_config("smoke").zoo


@pytest.fixture(scope="module")
def smoke_zoo(tmp_path_factory, smoke_config):
    workdir = str(tmp_path_factory.mktemp("zoo") / "tiny3")
    return zoo_lib.build_or_load(smoke_config, workdir, progress=False)


def test_smoke_zoo_layout_and_manifest(smoke_zoo, smoke_config):
    from transformers import AutoConfig, AutoTokenizer

    root = smoke_zoo.workdir
    manifest = json.load(open(os.path.join(root, "manifest.json")))
    assert manifest["fingerprint"] == zoo_lib.config_fingerprint(smoke_config)
    assert manifest["tasks"] == list(data.TASK_NAMES)
    assert manifest["rows"] == ["base", *data.TASK_NAMES]
    for split in ("search", "heldout"):
        matrix = np.array(manifest["score_matrix"][split])
        assert matrix.shape == (4, 3) and np.all((matrix >= 0) & (matrix <= 100))
    for rel in ["base", "experts/translation", "experts/math", "experts/code"]:
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert os.path.isfile(os.path.join(root, rel, name)), (rel, name)
        hf = AutoConfig.from_pretrained(os.path.join(root, rel))
        assert hf.num_hidden_layers == smoke_config.model.num_layers
        assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)
    tok = AutoTokenizer.from_pretrained(os.path.join(root, "tokenizer"))
    assert len(tok) == manifest["sizes"]["vocab_size"] == smoke_zoo.base.config.vocab_size
    for task in data.TASK_NAMES:
        examples = data.read_jsonl(os.path.join(root, "data", f"{task}.jsonl"))
        counts = {s: sum(e["split"] == s for e in examples) for s in data.SPLITS}
        assert counts == {"train": 200, "search": 21, "heldout": 9}
    ratios = manifest["task_vector_norm_ratio"]
    assert set(ratios) == set(data.TASK_NAMES) and all(0 < r < 1 for r in ratios.values())
    assert not [p for p in os.listdir(os.path.dirname(root)) if p.startswith(".")]  # no temp dirs left
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(root).st_mode & 0o777 == 0o777 & ~umask
    assert os.stat(os.path.join(root, "base", "model.safetensors")).st_mode & 0o777 == 0o666 & ~umask


def test_reloaded_models_reproduce_the_manifest_scores(smoke_zoo, smoke_config):
    assert smoke_zoo.base.config == tiny3_zoo.model_config(smoke_config, smoke_zoo.base.config.vocab_size)
    rows = [smoke_zoo.base, *smoke_zoo.experts.values()]
    for split in ("search", "heldout"):
        recomputed = zoo_format.score_matrix(rows, smoke_zoo.objectives[split])
        np.testing.assert_allclose(recomputed, smoke_zoo.manifest["score_matrix"][split], atol=1e-3)
    assert isinstance(smoke_zoo.objectives["search"]["math"], objectives.Objective)
    assert smoke_zoo.objectives["search"]["translation"].metric == "chrf"


def test_same_config_is_a_cache_hit(smoke_zoo, smoke_config, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("must not rebuild")

    monkeypatch.setattr(zoo_lib, "build", no_build)
    again = zoo_lib.build_or_load(smoke_config, smoke_zoo.workdir, progress=False)
    assert again.manifest == smoke_zoo.manifest


def test_config_change_is_detected(smoke_zoo, smoke_config):
    changed = smoke_config.copy_and_resolve_references()
    changed.seed = 1
    assert zoo_lib.config_fingerprint(changed) != zoo_lib.config_fingerprint(smoke_config)
    before = os.listdir(smoke_zoo.workdir)
    with pytest.raises(ValueError, match="another config"):
        zoo_lib.build_or_load(changed, smoke_zoo.workdir, on_mismatch="error")
    assert os.listdir(smoke_zoo.workdir) == before
    with pytest.raises(ValueError, match="on_mismatch"):
        zoo_lib.build_or_load(changed, smoke_zoo.workdir, on_mismatch="ignore")


def test_load_matching_never_builds(smoke_zoo, smoke_config, tmp_path, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("must not build")

    monkeypatch.setattr(zoo_lib, "build", no_build)
    assert zoo_lib.load_matching(smoke_config, smoke_zoo.workdir).manifest == smoke_zoo.manifest
    with pytest.raises(ValueError, match="holds no zoo"):
        zoo_lib.load_matching(smoke_config, str(tmp_path / "none"))
    changed = smoke_config.copy_and_resolve_references()
    changed.seed = 1
    with pytest.raises(ValueError, match="another config"):
        zoo_lib.load_matching(changed, smoke_zoo.workdir)


def test_rebuild_replaces_the_directory_atomically(tmp_path, monkeypatch, smoke_config):
    def fake_build(config, out_dir, progress):
        open(os.path.join(out_dir, "weights.bin"), "w").write(str(config.seed))
        return {"fingerprint": zoo_lib.config_fingerprint(config), "build_time_s": 0.0}

    monkeypatch.setattr(zoo_lib, "build_into", fake_build)
    workdir = str(tmp_path / "zoo")
    zoo_lib.build(smoke_config, workdir)
    changed = smoke_config.copy_and_resolve_references()
    changed.seed = 7
    zoo_lib.build(changed, workdir)
    assert open(os.path.join(workdir, "weights.bin")).read() == "7"
    assert zoo_lib.read_manifest(workdir)["fingerprint"] == zoo_lib.config_fingerprint(changed)
    assert sorted(os.listdir(tmp_path)) == ["zoo"]  # old copy and temp dirs are gone

    def failing_build(config, out_dir, progress):
        raise RuntimeError("boom")

    monkeypatch.setattr(zoo_lib, "build_into", failing_build)
    with pytest.raises(RuntimeError, match="boom"):
        zoo_lib.build(smoke_config, workdir)
    assert open(os.path.join(workdir, "weights.bin")).read() == "7"  # untouched
    assert sorted(os.listdir(tmp_path)) == ["zoo"]

    stranger = tmp_path / "not_a_zoo"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(zoo_lib.ZooError, match="refusing"):
        zoo_lib.build(smoke_config, str(stranger))
    with pytest.raises(FileNotFoundError, match="not a zoo"):
        zoo_lib.load(str(stranger))


def test_get_config_rejects_unknown_variant():
    with pytest.raises(ValueError, match="unknown tiny3 variant"):
        tiny3.get_config("huge")
