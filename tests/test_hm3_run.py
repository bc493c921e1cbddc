"""The end-to-end HM3 run on the tiny3 smoke zoo: report content, bad input.

The run is the session's one smoke run (tests/conftest.py: `smoke_run`); its exports, a resume after a kill,
suggestions (also Theta(lambda) rebuilt at a run preference) and the demo notebook are checked in
tests/test_hm3_run_resume.py, which xdist can run on the other worker in parallel with this file.
"""

import json
import os

import numpy as np
import pytest

from experiments.configs import tiny3
from hm3_jax.pipeline import run as run_lib
from hm3_jax.pipeline.workdir import Workdir, WorkdirError

METHODS = (
    "task_arithmetic", "ties", "dare_ties", "consensus", "pcb", "ea", "moea", "grid_search",
    "differential_evolution", "hm3", "hm3_no_param_level", "hm3_no_arch_level",
)  # fmt: skip
EXPERTS = ("expert:translation", "expert:math", "expert:code", "base")


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
    for fname in ("report.md", "report.html", "front.png", "reward_curves.png"):
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


def test_the_distilled_policy_decodes_every_answer(smoke_run):
    """The smoke config distils the trained policy onto the answers (`arch.distill_steps`): its greedy decode at
    each preference is the answer, and it is saved where `suggest` restores it from."""
    config, workdir, _ = smoke_run
    assert config.arch.distill_steps > 0
    hm3 = Workdir(workdir, config.to_dict()).load_stage("hm3")["per_preference"]
    assert [r["distilled_greedy_path"] for r in hm3] == [r["path"] for r in hm3]
    assert os.listdir(os.path.join(workdir, "arch", "hm3", "distilled"))


def test_every_path_the_architecture_level_scored_is_saved(smoke_run):
    """scored_paths.npz holds the RL archive's paths, the refinement's and every answer (normalised search
    scores, one row per (preference, path)); score_archive.npz only the training's."""
    config, workdir, _ = smoke_run
    hm3 = Workdir(workdir, config.to_dict()).load_stage("hm3")
    with np.load(os.path.join(workdir, "arch", "hm3", "scored_paths.npz")) as z:
        saved = {(int(i), tuple(p)) for i, p in zip(z["index"], z["paths"], strict=True)}
        assert len(saved) == len(z["index"]) == hm3["search_evaluations"]
    with np.load(os.path.join(workdir, "arch", "hm3", "score_archive.npz")) as z:
        assert {(int(i), tuple(p)) for i, p in zip(z["index"], z["paths"], strict=True)} < saved
    for i, r in enumerate(hm3["per_preference"]):
        assert (i, tuple(r["path"])) in saved


def test_workdir_of_another_config_is_refused(smoke_run):
    config, workdir, _ = smoke_run
    other = tiny3.get_config("smoke")
    other.seed = 123
    with pytest.raises(WorkdirError, match="config differs in seed: 0 -> 123"):
        Workdir(workdir, other.to_dict())


def test_unknown_baseline_is_a_clear_error(tmp_path):
    config = tiny3.get_config("smoke")
    config.baselines.path_methods = ("ea", "nsga3")
    with pytest.raises(ValueError, match="nsga3"):
        run_lib.run_hm3(config, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")


def test_unknown_ablation_is_a_clear_error(tmp_path):
    config = tiny3.get_config("smoke")
    config.ablations = ("no_arch_level", "no_rl")
    with pytest.raises(ValueError, match="no_rl"):
        run_lib.run_hm3(config, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")
