"""Issue 22: every mistake of a user gets one line naming the thing at fault, and leaves nothing behind.

The tables (71 bad inputs) feed mistakes to each entry point in process, and each case checks the exit code (or
exception type), that the message is one line naming the offending file, key, row, tensor or flag, and that no
directory it could write to holds anything new:
`MERGE_CASES` and `FLAG_CASES` to `experiments.merge` (exit code 2, one line `error: ...` on stderr);
`ZOO_CASES` to `zoo.build_or_load` (what `experiments.build_zoo` calls; its flags clash with merge's in one
process) and `RUN_CASES` to `run.run_hm3` (a `ZooError` / `ConfigError`, what the binaries print as that line);
`LOAD_CASES` to `load_pretrained` and `SUGGEST_CASES` to `suggest` (library calls: the exception). Some cases of
each binary also run as a subprocess, to check that no traceback reaches the terminal (and `--verbosity=1`
brings it back, in process).
"""

import json
import os
import pickle
import shutil
import subprocess
import sys

import jax
import pytest
import yaml
from absl import flags

from experiments import cli_errors
from experiments import merge as merge_cli
from experiments.configs import tiny3
from hm3_jax import models
from hm3_jax.io.checkpoint import Model, load_pretrained, save_pretrained
from hm3_jax.io.safetensors_io import CheckpointError
from hm3_jax.models.config import ModelConfig
from hm3_jax.pipeline import run as run_lib
from hm3_jax.pipeline import run_config
from hm3_jax.pipeline import suggest as suggest_lib
from hm3_jax.pipeline.workdir import WorkdirError
from hm3_jax.tasks import zoo as zoo_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = ModelConfig(family="llama", vocab_size=16, hidden_size=8, intermediate_size=12, num_layers=2,
                     num_heads=2, max_position_embeddings=16)  # fmt: skip


def _broken_copy(dirs, root, name, edit):
    """A copy of the `base` checkpoint as `name`, changed by `edit(directory)`."""
    dirs[name] = str(root / name)
    shutil.copytree(dirs["base"], dirs[name])
    edit(dirs[name])


def _edit_config(directory, **changes):
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        hf = json.load(f)
    with open(path, "w") as f:
        json.dump({**hf, **changes}, f)


def _truncate(directory):
    path = os.path.join(directory, "model.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _pickle_as_safetensors(directory):
    with open(os.path.join(directory, "model.safetensors"), "wb") as f:
        pickle.dump({"model.embed_tokens.weight": [0.0]}, f)


def _index_of_a_missing_shard(directory):
    os.remove(os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}, f)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """base, two experts (loadable llama checkpoints) and broken copies of the base: a config.json that says
    hidden_size 12, or is no JSON, or points at remote code, or is missing; weights truncated, pickled, only
    `pytorch_model.bin`, an index naming a missing shard, a NaN tensor."""
    root = tmp_path_factory.mktemp("bad_inputs")
    dirs = {}
    for i, name in enumerate(("base", "a", "b")):
        dirs[name] = str(root / name)
        save_pretrained(Model(CONFIG, models.init(CONFIG, jax.random.key(i))), dirs[name])
    _broken_copy(dirs, root, "wrong_config", lambda d: _edit_config(d, hidden_size=12))
    _broken_copy(dirs, root, "remote_code", lambda d: _edit_config(d, auto_map={"AutoModel": "m.M"}))
    _broken_copy(dirs, root, "no_config", lambda d: os.remove(os.path.join(d, "config.json")))
    _broken_copy(dirs, root, "bad_json", lambda d: open(os.path.join(d, "config.json"), "w").write("{oops"))
    _broken_copy(dirs, root, "truncated", _truncate)
    _broken_copy(dirs, root, "pickled", _pickle_as_safetensors)
    _broken_copy(dirs, root, "torch_only", lambda d: os.rename(
        os.path.join(d, "model.safetensors"), os.path.join(d, "pytorch_model.bin")))  # fmt: skip
    _broken_copy(dirs, root, "missing_shard", _index_of_a_missing_shard)
    nan = models.init(CONFIG, jax.random.key(0))
    nan["final"]["norm"]["scale"] = nan["final"]["norm"]["scale"].at[0].set(float("nan"))  # model.norm.weight
    dirs["nan"] = str(root / "nan")
    save_pretrained(Model(CONFIG, nan), dirs["nan"])
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
    ("model_truncated", lambda d, t, o: ["--method=linear", f"--models={d['a']},{d['truncated']}", f"--out={o}"],
     ["truncated/model.safetensors", "not a readable safetensors file"]),
    ("model_pickled", lambda d, t, o: ["--method=linear", f"--models={d['a']},{d['pickled']}", f"--out={o}"],
     ["pickled/model.safetensors", "not a readable safetensors file"]),
    ("model_torch_only", lambda d, t, o: ["--method=linear", f"--models={d['a']},{d['torch_only']}", f"--out={o}"],
     ["torch_only", "no model.safetensors"]),
    ("model_nan_tensor", lambda d, t, o: ["--method=linear", f"--models={d['a']},{d['nan']}", f"--out={o}"],
     ["nan'", "model.norm.weight", "NaN"]),
    ("out_exists", lambda d, t, o: ["--method=linear", f"--models={d['a']},{d['b']}", f"--out={d['b']}"],
     ["b' exists", "--overwrite"]),
    ("out_missing", lambda d, t, o: ["--method=linear", f"--models={d['a']},{d['b']}"], ["--out is required"]),
    ("models_missing", lambda d, t, o: ["--method=linear", f"--out={o}"], ["--method and --models"]),
    ("weights_count", lambda d, t, o: ["--method=linear", f"--models={d['a']},{d['b']}", "--weights=1", f"--out={o}"],
     ["weights", "1 values for 2 models"]),
    ("density_out_of_range", lambda d, t, o: ["--method=ties", f"--base={d['base']}", f"--models={d['a']},{d['b']}",
                                              "--density=2", f"--out={o}"], ["density", "(0, 1]", "2.0"]),
    ("dtype_unknown", lambda d, t, o: ["--method=linear", f"--models={d['a']},{d['b']}", "--dtype=int4", f"--out={o}"],
     ["int4", "supported"]),
    ("tokenizer_source_missing", lambda d, t, o: ["--method=linear", f"--models={d['a']},{d['b']}",
                                                  f"--tokenizer_source={t / 'nowhere'}", f"--out={o}"],
     ["nowhere", "not a directory"]),
    ("config_and_method_flags", lambda d, t, o: [f"--config={_yaml(t, _ties(d))}", "--method=ties", f"--out={o}"],
     ["--config cannot be combined with --method"]),
]  # fmt: skip


def _case(c):
    """(id, argv builder, words[, mark]) -> a pytest param."""
    return pytest.param(c[1], c[2], id=c[0], marks=c[3:])


def _assert_one_error_line(exit_info, capsys, words):
    """Exit code 2, and stderr is one line `error: ...` holding every one of `words` (any case)."""
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for word in words:
        assert word.lower() in err[0].lower(), (word, err[0])


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
    _assert_one_error_line(exit_info, capsys, words)
    assert {p: sorted(os.listdir(p)) for p in before} == before


# (id, merge flags, words): mistakes absl finds while parsing the flags (`cli_errors.make_flags_parser`)
FLAG_CASES = [
    ("unknown_flag", ["--methodz=ties"], ["methodz", "unknown command line flag"]),
    ("not_a_number", ["--density=half"], ["--density=half"]),
    ("shard_size_zero", ["--max_shard_mb=0"], ["--max_shard_mb=0", "not a positive integer"]),
    ("enum_value", ["--normalize=maybe"], ["--normalize=maybe", "true", "false"]),
]


@pytest.mark.parametrize("argv,words", [pytest.param(*c[1:], id=c[0]) for c in FLAG_CASES])
def test_merge_flag_mistake_is_one_line_exit_2(tmp_path, capsys, argv, words):
    flags.FLAGS.unparse_flags()
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli_errors.make_flags_parser()(["merge", "--method=linear", f"--out={tmp_path / 'out'}", *argv])
    finally:
        flags.FLAGS.unparse_flags()
    _assert_one_error_line(exit_info, capsys, words)
    assert os.listdir(tmp_path) == []


def test_verbosity_1_prints_the_traceback_before_the_line(pool, tmp_path, capsys):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["merge", "--method=linear", f"--models={pool['a']},{pool['truncated']}", f"--out={tmp_path / 'o'}",
                 "--noprogress", "--verbosity=1"])  # fmt: skip
    try:
        with pytest.raises(SystemExit) as exit_info:
            merge_cli.main(["merge"])
    finally:
        flags.FLAGS.unparse_flags()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[0] == "Traceback (most recent call last):"
    assert err[-1].startswith("error: ") and "truncated/model.safetensors" in err[-1]
    assert os.listdir(tmp_path) == []


def test_merge_cli_subprocess_prints_no_traceback(pool, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.merge", "--method=task_arithmetic", f"--base={pool['wrong_config']}",
         f"--models={pool['a']}", f"--out={out}"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
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


def test_outputs_never_carry_remote_code_pointers(pool, tmp_path):
    """`auto_map` / `custom_pipelines` / `trust_remote_code` of a source's config.json or tokenizer_config.json
    never reach a merged or saved checkpoint: it does not come with that code, and nobody reviewed it."""
    remote = {"auto_map": {"AutoModel": "m.M"}, "custom_pipelines": {"p": {}}, "trust_remote_code": True}
    source = tmp_path / "source"
    shutil.copytree(pool["base"], source)
    _edit_config(source, **remote)
    (source / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16, **remote}))
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["merge", "--method=task_arithmetic", f"--base={source}", f"--models={pool['a']}",
                 f"--out={tmp_path / 'merged'}", "--noprogress"])  # fmt: skip
    try:
        merge_cli.main(["merge"])
    finally:
        flags.FLAGS.unparse_flags()
    model = load_pretrained(str(tmp_path / "merged"))
    save_pretrained(model._replace(hf_config={**model.hf_config, **remote}), tmp_path / "saved")
    written = {
        "merged config": json.loads((tmp_path / "merged" / "config.json").read_text()),
        "merged tokenizer config": json.loads((tmp_path / "merged" / "tokenizer_config.json").read_text()),
        "saved config": json.loads((tmp_path / "saved" / "config.json").read_text()),
    }
    for what, config in written.items():
        assert not set(remote) & set(config), (what, config)
    assert written["merged tokenizer config"]["model_max_length"] == 16


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
    ("another_configs_zoo", _zoo_with_manifest, {}, "error", ["other_zoo", "another config", "--on_mismatch=rebuild"]),
]  # fmt: skip


@pytest.mark.parametrize(
    "workdir_fn,overrides,on_mismatch,words", [pytest.param(*c[1:5], id=c[0], marks=c[5:]) for c in ZOO_CASES]
)
def test_build_zoo_bad_input_is_a_zoo_error_before_anything_is_written(
    pool, tmp_path, monkeypatch, workdir_fn, overrides, on_mismatch, words
):
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
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert f"error: zoo directory {workdir} cannot be created: {pool['file']} is a file" in result.stderr
    assert os.listdir(tmp_path) == []


# (id, config overrides (dotted key -> value), --zoo_dir, words): `run.run_hm3` on the tiny3 smoke config
RUN_CASES = [
    ("t_max_below_depth", {"arch.rl.t_max": 1}, None, ["arch.rl.t_max=1", "2 blocks"]),
    ("unknown_baseline", {"baselines.path_methods": ("ea", "nsga3")}, None, ["unknown baseline method(s) ['nsga3']"]),
    ("unknown_ablation", {"ablations": ("no_magic",)}, None, ["config.ablations", "no_magic"]),
    ("unknown_alignment", {"arch.alignment": "procrustes"}, None, ["arch.alignment", "procrustes"]),
    ("unknown_pool_model", {"param_level.pool_model": "best"}, None, ["param_level.pool_model", "best"]),
    ("unknown_preference_kind", {"preferences.kind": "uniform"}, None, ["preferences.kind", "uniform"]),
    ("no_divisions", {"preferences.kind": "das_dennis", "preferences.divisions": 0}, None,
     ["preferences.divisions must be >= 1"]),
    ("zoo_dir_under_proc", {}, "/proc/hm3_zoo", ["zoo directory /proc/hm3_zoo cannot be created"]),
]  # fmt: skip


@pytest.mark.parametrize("overrides,zoo_dir,words", [pytest.param(*c[1:], id=c[0]) for c in RUN_CASES])
def test_run_hm3_bad_config_is_refused_before_anything_is_written(tmp_path, overrides, zoo_dir, words):
    config = tiny3.get_config("smoke")
    for key, value in overrides.items():
        *path, name = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[name] = value
    with pytest.raises((run_config.ConfigError, zoo_lib.ZooError)) as err:
        run_lib.run_hm3(config, str(tmp_path / "w"), zoo_dir)
    assert "\n" not in str(err.value), str(err.value)
    for word in words:
        assert word in str(err.value), (word, str(err.value))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "flag,words",
    [
        ("--config.preferences.num=0", "preferences.num must be >= 1"),
        ("--config.baselines.methodz=1", "--config.baselines.methodz: the config has no key 'methodz'"),
        (f"--config={REPO}/experiments/configs/nope.py", f"--config: [Errno 2] No such file or directory: '{REPO}"),
        ("--workdir=", "flag --workdir=: --workdir must name a directory"),
    ],
)  # fmt: skip
def test_run_hm3_binary_mistake_is_one_line_exit_2(tmp_path, flag, words):
    """The binary's edge: a ConfigError of the run, a `--config.*` override of a missing key, a config file that
    does not exist, an empty --workdir (which was the current directory)."""
    workdir = tmp_path / "w"
    config = [] if flag.startswith("--config=") else [f"--config={REPO}/experiments/configs/tiny3.py:smoke"]
    result = subprocess.run(
        [sys.executable, "-m", "experiments.run_hm3", *config, f"--workdir={workdir}", flag],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {words}"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []


# (id, directory builder (pool, tmp_path) -> checkpoint, exception, words)
LOAD_CASES = [
    ("missing", lambda d, t: str(t / "nowhere"), FileNotFoundError, ["nowhere", "does not exist"]),
    ("no_config", lambda d, t: d["no_config"], FileNotFoundError, ["no_config", "has no config.json"]),
    ("config_not_json", lambda d, t: d["bad_json"], ValueError, ["bad_json/config.json", "not valid JSON"]),
    ("remote_code", lambda d, t: d["remote_code"], ValueError, ["remote_code/config.json", "'auto_map'"]),
    ("config_disagrees", lambda d, t: d["wrong_config"], CheckpointError, ["wrong_config/config.json", "model.embed_tokens.weight", "hidden_size=12"]),
    ("truncated", lambda d, t: d["truncated"], CheckpointError, ["truncated/model.safetensors", "not a readable"]),
    ("pickle_named_safetensors", lambda d, t: d["pickled"], CheckpointError, ["pickled/model.safetensors"]),
    ("torch_pickle_only", lambda d, t: d["torch_only"], CheckpointError, ["torch_only", "never loaded"]),
    ("index_names_a_missing_shard", lambda d, t: d["missing_shard"], CheckpointError,
     ["missing_shard/model.safetensors.index.json", "model-00001-of-00002.safetensors"]),
    ("nan_tensor", lambda d, t: d["nan"], CheckpointError, ["nan/model.safetensors", "model.norm.weight", "NaN"]),
]  # fmt: skip


@pytest.mark.parametrize("dir_fn,error,words", [pytest.param(*c[1:], id=c[0]) for c in LOAD_CASES])
def test_load_pretrained_names_the_file_and_thing_at_fault(pool, tmp_path, dir_fn, error, words):
    before = sorted(os.listdir(os.path.dirname(pool["base"])))
    with pytest.raises(error) as err:
        load_pretrained(dir_fn(pool, tmp_path))
    first = str(err.value).splitlines()[0]  # the pickle refusal goes on with a conversion snippet
    for word in words:
        assert word in first, (word, str(err.value))
    assert sorted(os.listdir(os.path.dirname(pool["base"]))) == before and os.listdir(tmp_path) == []


def _run_dir(t, run_json=None, report=True):
    """A finished run's directory as `suggest` reads it (3 tasks, one front point) or a broken one."""
    (t / "run").mkdir()
    if run_json is not None:
        (t / "run" / "run.json").write_text(run_json)
    if report:
        hm3 = {
            "preferences": [[1 / 3] * 3],
            "paths": [[0, 1]],
            "points": [[1.0] * 3],
            "normalised_points": [[1] * 3],
        }
        (t / "run" / "report.json").write_text(
            json.dumps({"tasks": ["a", "b", "c"], "methods": {"hm3": hm3}})
        )
    return str(t / "run")


_RUN_JSON = json.dumps({"fingerprint": "0", "config": {"seed": 0}})

# (id, run directory builder (tmp_path) -> path, preference, exception, words)
SUGGEST_CASES = [
    ("no_directory", lambda t: str(t / "nowhere"), [1, 0, 0], WorkdirError, ["nowhere", "no run.json"]),
    ("not_a_run", lambda t: _run_dir(t, None, report=False), [1, 0, 0], WorkdirError, ["run holds no HM3 run"]),
    ("unfinished_run", lambda t: _run_dir(t, _RUN_JSON, report=False), [1, 0, 0], WorkdirError,
     ["run has no report.json", "not finished"]),
    ("run_json_not_json", lambda t: _run_dir(t, "{"), [1, 0, 0], WorkdirError, ["run/run.json", "not readable as JSON"]),
    ("run_json_of_something_else", lambda t: _run_dir(t, "[]"), [1, 0, 0], WorkdirError, ["run/run.json", "'config'"]),
    ("preference_length", lambda t: _run_dir(t, _RUN_JSON), [0.5, 0.5], ValueError, ["2 entries", "k=3"]),
    ("preference_sum", lambda t: _run_dir(t, _RUN_JSON), [3, 1, 1], ValueError, ["sum to 1", "normalize=True"]),
    ("preference_negative", lambda t: _run_dir(t, _RUN_JSON), [1.5, -0.5, 0], ValueError, ["negative entry"]),
    ("preference_nan", lambda t: _run_dir(t, _RUN_JSON), [float("nan"), 0.5, 0.5], ValueError, ["NaN"]),
]  # fmt: skip


@pytest.mark.parametrize(
    "run_fn,preference,error,words", [pytest.param(*c[1:], id=c[0]) for c in SUGGEST_CASES]
)
def test_suggest_names_the_run_file_or_preference_at_fault(tmp_path, run_fn, preference, error, words):
    run_dir = run_fn(tmp_path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(error) as err:
        suggest_lib.suggest(run_dir, preference)
    assert "\n" not in str(err.value), str(err.value)
    for word in words:
        assert word in str(err.value), (word, str(err.value))
    assert sorted(os.listdir(tmp_path)) == before
