"""Issue 22: every mistake of a user gets one line naming the thing at fault, and leaves nothing behind.

The table `MERGE_CASES` feeds bad inputs to `experiments.merge` (in process): each must exit with code 1, print
`error: <message>` naming the offending file, key, tensor or flag, and leave the output's directory as it was.
`ZOO_CASES` feeds bad zoo directories and configs to `zoo.build_or_load` (what `experiments.build_zoo` calls;
its flags clash with merge's in one process): each must be a `ZooError` naming the thing, before anything is
written. One case of each binary also runs as a subprocess, to check that no traceback reaches the terminal.
"""

import json
import os
import subprocess
import sys

import jax
import pytest
import yaml
from absl import flags

from experiments import merge as merge_cli
from experiments.configs import tiny3
from hm3_jax import models
from hm3_jax.model_io import Model, load_pretrained, save_pretrained
from hm3_jax.models.config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = ModelConfig(family="llama", vocab_size=16, hidden_size=8, intermediate_size=12, num_layers=2,
                     num_heads=2, max_position_embeddings=16)  # fmt: skip


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """base, two experts (loadable llama checkpoints) and a base whose config.json says hidden_size 12."""
    root = tmp_path_factory.mktemp("bad_inputs")
    dirs = {}
    for i, name in enumerate(("base", "a", "b")):
        dirs[name] = str(root / name)
        save_pretrained(Model(CONFIG, models.init(CONFIG, jax.random.key(i))), dirs[name])
    dirs["wrong_config"] = str(root / "wrong_config")
    save_pretrained(Model(CONFIG, models.init(CONFIG, jax.random.key(0))), dirs["wrong_config"])
    cfg_path = os.path.join(dirs["wrong_config"], "config.json")
    with open(cfg_path) as f:
        hf = json.load(f)
    with open(cfg_path, "w") as f:
        json.dump({**hf, "hidden_size": 12}, f)
    dirs["file"] = str(root / "a_file")
    with open(dirs["file"], "w") as f:
        f.write("not a directory\n")
    dirs["readonly"] = str(root / "readonly")
    os.makedirs(dirs["readonly"])
    os.chmod(dirs["readonly"], 0o555)
    yield dirs
    os.chmod(dirs["readonly"], 0o755)


def _yaml(tmp_path, config) -> str:
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config) if isinstance(config, dict) else config)
    return str(path)


def _ties(d, **over):
    return {"merge_method": "ties", "base_model": d["base"],
            "models": [{"model": d[m], "parameters": {"weight": 0.5, "density": 0.5}} for m in ("a", "b")],
            **over}  # fmt: skip


# (id, argv builder (pool, tmp_path, out) -> flags, words the message must contain[, pytest mark])
MERGE_CASES = [
    (
        "config_disagrees_with_weights",
        lambda d, t, o: [
            "--method=task_arithmetic",
            f"--base={d['wrong_config']}",
            f"--models={d['a']}",
            f"--out={o}",
        ],
        ["wrong_config/config.json", "model.embed_tokens.weight", "hidden_size=12"],
    ),
    (
        "passthrough_config_disagrees_with_weights",
        lambda d, t, o: [
            f"--config={_yaml(t, {'merge_method': 'passthrough', 'slices': [{'sources': [{'model': d['wrong_config'], 'layer_range': [0, 2]}]}]})}",
            f"--out={o}",
        ],  # noqa: E501
        ["wrong_config/config.json", "hidden_size=12"],
    ),
    (
        "nan_weight_flag",
        lambda d, t, o: [
            "--method=task_arithmetic",
            f"--base={d['base']}",
            f"--models={d['a']}",
            "--weights=nan",
            f"--out={o}",
        ],
        ["--weights", "nan"],
    ),
    (
        "nan_weight_yaml",
        lambda d, t, o: [
            f"--config={_yaml(t, _ties(d, models=[{'model': d['a'], 'parameters': {'weight': float('nan')}}]))}",
            f"--out={o}",
        ],  # noqa: E501
        ["weights of tensor", "nan"],
    ),
    (
        "weights_sum_to_zero_normalised",
        lambda d, t, o: ["--method=linear", f"--models={d['a']},{d['b']}", "--weights=1,-1", f"--out={o}"],
        ["sum to 0", "normalize", "tensor"],
    ),
    (
        "weights_sum_to_zero_ties_yaml",
        lambda d, t, o: [
            f"--config={_yaml(t, _ties(d, models=[{'model': d['a'], 'parameters': {'weight': 0.5}}, {'model': d['b'], 'parameters': {'weight': -0.5}}]))}",
            f"--out={o}",
        ],  # noqa: E501
        ["sum to 0", "normalize"],
    ),
    (
        "yaml_missing",
        lambda d, t, o: [f"--config={t / 'nope.yml'}", f"--out={o}"],
        ["nope.yml", "does not exist"],
    ),
    ("yaml_is_a_directory", lambda d, t, o: [f"--config={t}", f"--out={o}"], ["is a directory"]),
    (
        "yaml_syntax_error",
        lambda d, t, o: [f"--config={_yaml(t, 'merge_method: [ties')}", f"--out={o}"],
        ["merge.yml", "not valid YAML", "line"],
    ),
    (
        "yaml_not_a_mapping",
        lambda d, t, o: [f"--config={_yaml(t, '- ties')}", f"--out={o}"],
        ["merge.yml", "YAML mapping"],
    ),
    (
        "out_in_readonly_dir",
        lambda d, t, o: ["--method=linear", f"--models={d['a']},{d['b']}", f"--out={d['readonly']}/out"],
        ["readonly/out", "permission"],
        pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories"),
    ),
    (
        "out_under_proc",
        lambda d, t, o: ["--method=linear", f"--models={d['a']},{d['b']}", "--out=/proc/hm3_merge_out"],
        ["/proc/hm3_merge_out", "cannot be written"],
    ),
    (
        "out_below_a_file",
        lambda d, t, o: ["--method=linear", f"--models={d['a']},{d['b']}", f"--out={d['file']}/out"],
        ["a_file/out", "a_file' is a file"],
    ),
    (
        "unknown_method_flag",
        lambda d, t, o: ["--method=methodz", f"--base={d['base']}", f"--models={d['a']}", f"--out={o}"],
        ["methodz", "known methods"],
    ),
    (
        "unknown_method_yaml",
        lambda d, t, o: [f"--config={_yaml(t, _ties(d, merge_method='methodz'))}", f"--out={o}"],
        ["methodz", "supported"],
    ),
    (
        "model_missing",
        lambda d, t, o: ["--method=linear", f"--models={d['a']},{t / 'nowhere'}", f"--out={o}"],
        ["nowhere", "does not exist"],
    ),
]


def _case(c):
    """(id, argv builder, words[, mark]) -> a pytest param."""
    return pytest.param(c[1], c[2], id=c[0], marks=c[3:])


@pytest.mark.parametrize("argv_fn,words", [_case(c) for c in MERGE_CASES])
def test_merge_cli_bad_input_is_one_line_and_writes_nothing(pool, tmp_path, capsys, argv_fn, words):
    out = tmp_path / "out"
    argv = argv_fn(pool, tmp_path, out)
    before = {p: sorted(os.listdir(p)) for p in (tmp_path, pool["readonly"], os.path.dirname(pool["base"]))}
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["merge", *argv, "--noprogress"])
    try:
        with pytest.raises(SystemExit) as exit_info:
            merge_cli.main(["merge"])
    finally:
        flags.FLAGS.unparse_flags()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for word in words:
        assert word.lower() in err[0].lower(), (word, err[0])
    assert {p: sorted(os.listdir(p)) for p in before} == before


def test_merge_cli_subprocess_prints_no_traceback(pool, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.merge", "--method=task_arithmetic", f"--base={pool['wrong_config']}",
         f"--models={pool['a']}", f"--out={out}"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "error: " in result.stderr and "hidden_size=12" in result.stderr
    assert not out.exists() and os.listdir(tmp_path) == []


def test_merged_checkpoint_of_a_good_pool_loads(pool, tmp_path):
    """The check before writing accepts what `load_pretrained` accepts (and the merge then loads)."""
    out = tmp_path / "out"
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["merge", f"--config={_yaml(tmp_path, _ties(pool))}", f"--out={out}", "--noprogress"])
    try:
        merge_cli.main(["merge"])
    finally:
        flags.FLAGS.unparse_flags()
    assert load_pretrained(str(out)).config.hidden_size == CONFIG.hidden_size


def _zoo_with_manifest(d, t):
    """A zoo directory whose manifest records another config (what a changed config.zoo finds)."""
    (t / "other_zoo").mkdir()
    (t / "other_zoo" / "manifest.json").write_text(
        json.dumps({"fingerprint": "0" * 16, "config": {"seed": 9}})
    )
    return str(t / "other_zoo")


def _not_a_zoo(d, t):
    (t / "mine").mkdir()
    (t / "mine" / "notes.txt").write_text("mine")
    return str(t / "mine")


# (id, workdir builder (pool, tmp_path) -> path, config.zoo overrides, on_mismatch, words[, pytest mark])
ZOO_CASES = [
    ("workdir_below_a_file", lambda d, t: f"{d['file']}/zoo", {}, "error", ["a_file/zoo", "a_file is a file"]),
    ("workdir_is_a_file", lambda d, t: d["file"], {}, "error", ["a_file", "is a file"]),
    (
        "workdir_in_readonly_dir",
        lambda d, t: f"{d['readonly']}/zoo",
        {},
        "error",
        ["readonly/zoo", "readonly is not writable"],
    ),
    (
        "workdir_below_readonly_dir",
        lambda d, t: f"{d['readonly']}/a/b/zoo",
        {},
        "rebuild",
        ["readonly/a/b/zoo", "readonly is not writable"],
    ),
    ("workdir_under_proc", lambda d, t: "/proc/hm3_zoo", {}, "rebuild", ["/proc/hm3_zoo", "cannot be created"]),
    ("unknown_zoo_kind", lambda d, t: str(t / "zoo"), {"kind": "tiny9"}, "rebuild", ["config.zoo.kind", "tiny9", "tiny3"]),
    ("not_a_zoo", _not_a_zoo, {}, "rebuild", ["mine", "holds no manifest.json"]),
    ("another_configs_zoo", _zoo_with_manifest, {}, "error", ["other_zoo", "another config"]),
]  # fmt: skip


@pytest.mark.parametrize(
    "workdir_fn,overrides,on_mismatch,words", [pytest.param(*c[1:5], id=c[0], marks=c[5:]) for c in ZOO_CASES]
)
def test_build_zoo_bad_input_is_a_zoo_error_before_anything_is_written(
    pool, tmp_path, monkeypatch, workdir_fn, overrides, on_mismatch, words
):
    from hm3_jax.tasks import zoo as zoo_lib

    if os.geteuid() == 0:  # root may write anywhere: let os.access answer from the mode bits, as for a user
        access = os.access
        monkeypatch.setattr(
            os, "access", lambda p, m: access(p, m) and not (m & os.W_OK and not os.stat(p).st_mode & 0o222)
        )

    workdir = workdir_fn(pool, tmp_path)
    config = tiny3.get_config("smoke").zoo
    with config.unlocked():
        config.update(overrides)
    before = {p: sorted(os.listdir(p)) for p in (tmp_path, pool["readonly"], os.path.dirname(pool["base"]))}
    with pytest.raises(zoo_lib.ZooError) as err:
        zoo_lib.build_or_load(config, workdir, on_mismatch=on_mismatch, progress=False)
    message = str(err.value)
    assert "\n" not in message, message
    for word in words:
        assert word.lower() in message.lower(), (word, message)
    assert {p: sorted(os.listdir(p)) for p in before} == before


def test_build_zoo_subprocess_is_one_line_without_traceback(pool, tmp_path):
    workdir = f"{pool['file']}/zoo"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.build_zoo", "--config=experiments/configs/tiny3.py:smoke",
         f"--workdir={workdir}"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert f"error: zoo directory {workdir} cannot be created: {pool['file']} is a file" in result.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "flag,words",
    [
        ("--config.preferences.num=0", "preferences.num must be >= 1"),
        ("--config.arch.rl.t_max=1", "arch.rl.t_max=1 is smaller than the models' 2 blocks"),
        ("--config.baselines.path_methods=('ea','nsga3')", "unknown baseline method(s) ['nsga3']"),
        ("--zoo_dir=/proc/hm3_zoo", "zoo directory /proc/hm3_zoo cannot be created"),
        ("--config.baselines.methodz=1", "--config.baselines.methodz: the config has no key 'methodz'"),
        (
            "--config=experiments/configs/nope.py",
            "--config: [Errno 2] No such file or directory: 'experiments/co",
        ),
    ],
)
def test_run_hm3_bad_config_is_one_line_before_anything_is_written(tmp_path, flag, words):
    workdir = tmp_path / "w"
    config = [] if flag.startswith("--config=") else ["--config=experiments/configs/tiny3.py:smoke"]
    result = subprocess.run(
        [sys.executable, "-m", "experiments.run_hm3", *config, flag, f"--workdir={workdir}"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert f"error: {words}" in result.stderr
    assert os.listdir(tmp_path) == []
