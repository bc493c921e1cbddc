"""HM3 on a user's own checkpoints, end to end: README's "HM3 on your own models" example (its code block, run as
written) and the smoke command on it; the run's report, exports and `suggest`; a resume; a changed data file
under the same workdir is refused."""

import json
import os
import re
import shutil

import numpy as np
import pytest

_README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _readme_example() -> str:
    text = open(_README).read()
    section = text[text.index("## HM3 on your own models") :]
    section = section[: section.index("\n## ", 5)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "README's spec section has one Python example"
    commands = re.findall(r"python -m experiments.run_hm3 (--config=\S+) (--workdir=\S+)", section)
    assert commands and commands[0][0].endswith(",smoke")
    return blocks[0], commands[0][0].split("=", 1)[1]


@pytest.fixture(scope="module")
def spec_run(tmp_path_factory):
    from experiments.configs import checkpoints
    from hm3_jax.pipeline import run as run_lib

    root = tmp_path_factory.mktemp("spec_run")
    code, config_arg = _readme_example()
    cwd = os.getcwd()
    os.chdir(root)
    try:
        exec(compile(code, "README example", "exec"), {})
        config = checkpoints.get_config(config_arg.split(":", 1)[1])
    finally:
        os.chdir(cwd)
    # Without the no-parameter-level ablation (a second architecture level, ~15% of this run): the tiny3 smoke
    # run (tests/test_hm3_run.py) computes and checks it; here the spec path is what is under test.
    config.ablations = ("no_arch_level",)
    workdir = str(root / "run")
    report = run_lib.run_hm3(config, workdir)
    return root, config, workdir, report


def test_readme_example_runs_end_to_end(spec_run):
    root, config, workdir, report = spec_run
    assert report["tasks"] == ["math", "choice"]  # objectives, in the spec's expert order
    methods = report["methods"]
    for m in ("hm3", "hm3_no_arch_level", "task_arithmetic", "ea", "base"):
        assert m in methods, m
    assert "hm3_no_param_level" not in methods  # config.ablations (set above) is honoured
    assert len(methods["hm3"]["points"]) == config.preferences.num == 2
    for name in ("report.json", "report.md"):
        assert os.path.isfile(os.path.join(workdir, name))
    stage = json.load(open(os.path.join(workdir, "stages", "spec.json")))
    stage = stage.get("value", stage)
    assert set(stage["groups"]) == {"sums", "sums_chrf", "bigger"}
    assert stage["groups"]["sums_chrf"] == "math"
    splits = stage["splits"]["sums"]
    assert len(splits["search"]) == 42 and len(splits["heldout"]) == 18  # 60 rows, 70 / 30
    assert sorted(splits["search"] + splits["heldout"]) == list(range(1, 61))  # 1-based row numbers
    assert os.path.join(str(root), "my_merge", "data", "sums.jsonl") in stage["files"]
    for i in range(2):
        exp = os.path.join(workdir, "exports", f"pref_{i}")
        assert os.path.isfile(os.path.join(exp, "merged", "config.json"))
        assert os.path.isfile(os.path.join(exp, "merged.mergekit.yml"))


def test_objective_is_mean_of_its_tasks(spec_run):
    """The sources' objective scores are the means of their tasks' scores (math = mean of sums, sums_chrf)."""
    from hm3_jax.pipeline import run as run_lib
    from hm3_jax.tasks import scoring

    _, config, workdir, report = spec_run
    _, zoo, problem = run_lib.setup(config, workdir)
    assert problem.task_names == ("sums", "sums_chrf", "bigger") and problem.groups == (0, 0, 1)
    base = zoo.base
    per_task = [scoring.score_model(base.config, base.params, o) for o in problem.objectives["heldout"]]
    expected = [(per_task[0] + per_task[1]) / 2, per_task[2]]
    np.testing.assert_allclose(problem.source_scores["heldout"][0], expected, atol=1e-9)
    np.testing.assert_allclose(report["methods"]["base"]["points"][0], expected, atol=1e-9)


def test_suggest_and_resume(spec_run):
    from hm3_jax.pipeline import run as run_lib
    from hm3_jax.pipeline.suggest import suggest

    _, config, workdir, report = spec_run
    front = suggest(workdir, [0.3, 0.7])
    assert front["source"] == "front" and len(front["heldout"]) == 2
    searched = suggest(workdir, [0.3, 0.7], search=True)
    assert len(searched["heldout"]) == 2 and searched["path"]
    again = run_lib.run_hm3(config, workdir)  # every stage stored: the same report
    assert again["methods"]["hm3"]["points"] == report["methods"]["hm3"]["points"]


def test_changed_data_file_is_refused(spec_run, tmp_path):
    from hm3_jax.pipeline import run as run_lib
    from hm3_jax.pipeline.workdir import WorkdirError

    root, config, workdir, _ = spec_run
    data = root / "my_merge" / "data" / "bigger.jsonl"
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    original = data.read_text()
    try:
        data.write_text(original.replace('"answer": 1', '"answer": 0', 1))
        with pytest.raises(WorkdirError, match=r"files have changed since: \[.*bigger.jsonl'\]"):
            run_lib.run_hm3(config, str(copy))
    finally:
        data.write_text(original)
