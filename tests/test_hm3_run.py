"""The end-to-end HM3 run on the tiny3 smoke zoo: report content, exports, resume, suggestions, bad input."""

import json
import os
import shutil

import numpy as np
import pytest

from experiments.configs import tiny3
from hm3_jax.hm3 import run as run_lib
from hm3_jax.hm3 import suggest as suggest_lib
from hm3_jax.hm3.workdir import Workdir, WorkdirError

METHODS = (
    "task_arithmetic", "ties", "dare_ties", "consensus", "pcb", "ea", "moea", "grid_search",
    "differential_evolution", "hm3", "hm3_no_param_level", "hm3_no_arch_level",
)  # fmt: skip
EXPERTS = ("expert:translation", "expert:math", "expert:code", "base")


@pytest.fixture(scope="module")
def smoke_run(smoke_zoo_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("hm3") / "run")
    config = tiny3.get_config("smoke")
    report = run_lib.run_hm3(config, workdir, zoo_dir=smoke_zoo_dir)
    return config, workdir, report


def test_report_files_tasks_and_preferences(smoke_run):
    config, workdir, report = smoke_run
    with open(os.path.join(workdir, "report.json")) as f:
        on_disk = json.load(f)
    assert on_disk["methods"].keys() == report["methods"].keys()
    assert report["tasks"] == ["translation", "math", "code"]
    assert set(METHODS + EXPERTS) <= report["methods"].keys()
    ref = np.asarray(report["reference_point"])
    for m in report["methods"].values():  # also any method not named in METHODS
        assert np.all(np.asarray(m["normalised_points"]) > ref)
    n = config.preferences.num
    assert len(report["methods"]["hm3"]["points"]) == n
    assert np.allclose(report["methods"]["hm3"]["preferences"][0], 1 / 3)
    for fname in ("report.md", "front.png", "reward_curves.png"):
        assert os.path.getsize(os.path.join(workdir, fname)) > 0


@pytest.mark.parametrize("name", METHODS + EXPERTS)
def test_method_has_held_out_points_in_the_report(smoke_run, name):
    """One test per method (a failure names it): held-out points in [0, 100], normalised by the ideal, a
    hypervolume, counts, dominating the reference point; path baselines within the equal budget."""
    config, _, report = smoke_run
    m = report["methods"][name]
    pts = np.asarray(m["points"])
    assert pts.ndim == 2 and pts.shape[1] == 3 and len(pts) >= 1
    assert np.all((pts >= 0) & (pts <= 100))
    np.testing.assert_allclose(m["normalised_points"], pts / np.asarray(report["ideal"]), rtol=1e-9)
    assert m["hypervolume"] >= 0 and "evaluations" in m and "wall_seconds" in m
    assert np.all(np.asarray(m["normalised_points"]) > np.asarray(report["reference_point"]))
    if name in ("ea", "moea", "grid_search", "differential_evolution"):
        # Equal budget: every path baseline spent at most the configured path evaluations.
        assert m["evaluations"] <= config.baselines.budget


def test_exported_path_model_loads_in_transformers_and_matches(smoke_run):
    import jax.numpy as jnp
    from transformers import FlaxLlamaForCausalLM

    from hm3_jax import load_pretrained, models

    _, workdir, report = smoke_run
    export = os.path.join(workdir, "exports", "pref_0")
    assert os.path.exists(os.path.join(export, "merged.mergekit.yml"))
    assert os.path.exists(os.path.join(export, "path.mergekit.yml"))
    ours = load_pretrained(os.path.join(export, "path_model"))
    steps = [p for p in report["methods"]["hm3"]["paths"][0] if p >= 0]
    assert ours.config.num_layers == len(steps)
    ids = jnp.asarray(np.arange(1, 13, dtype=np.int32)[None] % ours.config.vocab_size)
    ref = FlaxLlamaForCausalLM.from_pretrained(os.path.join(export, "path_model")).__call__(ids).logits
    np.testing.assert_allclose(
        np.asarray(models.apply(ours.config, ours.params, ids)), np.asarray(ref), atol=1e-4
    )


def test_resume_after_kill_gives_the_same_report(smoke_run, smoke_zoo_dir, tmp_path):
    config, workdir, report = smoke_run
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    # Simulate a kill during the architecture level: later stages, the report and the last RL checkpoint gone.
    for name in os.listdir(os.path.join(resumed, "stages")):
        if name not in ("preferences.json", "param_level.json"):
            os.remove(os.path.join(resumed, "stages", name))
    os.remove(os.path.join(resumed, "report.json"))
    ckpt = os.path.join(resumed, "arch", "hm3", "ckpt")
    steps = sorted(int(s) for s in os.listdir(ckpt) if s.isdigit())
    shutil.rmtree(os.path.join(ckpt, str(steps[-1])))
    shutil.rmtree(os.path.join(resumed, "exports"), ignore_errors=True)
    again = run_lib.run_hm3(config, resumed, zoo_dir=smoke_zoo_dir)
    for name, m in report["methods"].items():
        np.testing.assert_allclose(again["methods"][name]["points"], m["points"], err_msg=name)
    assert again["methods"]["hm3"]["paths"] == report["methods"]["hm3"]["paths"]


def test_workdir_of_another_config_is_refused(smoke_run):
    config, workdir, _ = smoke_run
    other = tiny3.get_config("smoke")
    other.seed = 123
    with pytest.raises(WorkdirError, match="fingerprint"):
        Workdir(workdir, other.to_dict())


def test_unknown_baseline_is_a_clear_error(tmp_path):
    config = tiny3.get_config("smoke")
    config.baselines.path_methods = ("ea", "nsga3")
    with pytest.raises(ValueError, match="nsga3"):
        run_lib.run_hm3(config, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")


def test_suggest_from_the_front_and_from_the_policy(smoke_run):
    _, workdir, report = smoke_run
    near = suggest_lib.suggest(workdir, [0.34, 0.33, 0.33])
    assert near["source"] == "front" and near["front_index"] == 0
    assert near["heldout"] == report["methods"]["hm3"]["points"][0]
    new = suggest_lib.suggest(workdir, [0.7, 0.2, 0.1], search=True)
    assert new["source"] == "policy" and len(new["path"]) == 4
    assert all(0 <= s <= 100 for s in new["heldout"])
    # the answer is the decoded path only if its search reward beats Theta(lambda)'s identity path
    theta = [9, 10, -1, -1]  # source K = 3 of a 2-layer pool, T_max 4
    r = new["decision"]["search_rewards"]
    assert new["path"] == (new["decoded_path"] if r[0] > r[1] else theta)
    assert new["theta"]["variant"] == "tuned" and new["theta"]["from_preference"] == report["methods"]["hm3"][
        "preferences"][int(np.abs(np.asarray(report["methods"]["hm3"]["preferences"]) - [0.7, 0.2, 0.1]).sum(1).argmin())]  # fmt: skip


def test_suggest_rebuilds_the_runs_theta_at_a_front_preference(smoke_run):
    """At a preference of the run, the Theta(lambda) suggest builds is the run's (its held-out scores are the
    report's hm3_no_arch_level point)."""
    from hm3_jax.hm3.problem import score_params

    config, workdir, report = smoke_run
    _, _, problem = run_lib.setup(config, workdir)
    for i in range(len(report["methods"]["hm3_no_arch_level"]["points"])):
        pref = np.asarray(report["methods"]["hm3_no_arch_level"]["preferences"][i])
        theta, _ = suggest_lib._theta(workdir, config, problem, pref)
        got = score_params(problem.engines["heldout"], problem.experts, theta)
        np.testing.assert_allclose(got, report["methods"]["hm3_no_arch_level"]["points"][i], atol=1e-6)
    with pytest.raises(ValueError):
        suggest_lib.suggest(workdir, [0.5, 0.5])


def test_demo_notebook_runs_end_to_end(smoke_run, smoke_zoo_dir, tmp_path):
    """notebooks/hm3_demo.ipynb executed with nbclient on the smoke config (reusing this module's run dir)."""
    import nbformat
    from nbclient import NotebookClient

    _, workdir, _ = smoke_run
    demo = tmp_path / "demo"
    demo.mkdir()
    shutil.copytree(workdir, demo / "run")  # the notebook's run resumes it (every stage is stored)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    nb = nbformat.read(os.path.join(root, "notebooks", "hm3_demo.ipynb"), as_version=4)
    env_cell = nbformat.v4.new_code_cell(
        "import os, sys\n"
        f"os.environ['HM3_DEMO_DIR'] = {str(demo)!r}\n"
        f"os.environ['HM3_DEMO_ZOO'] = {smoke_zoo_dir!r}\n"
        f"sys.path.insert(0, {root!r})"
    )
    nb.cells.insert(0, env_cell)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": root}}).execute()
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "'source': 'policy'" in outputs
    assert "model.safetensors" in outputs
