"""The end-to-end HM3 smoke run, continued: its exports in transformers, a resume after a kill, suggestions
(Theta(lambda) rebuilt at a run preference, the front, the policy) and the demo notebook.

Uses the session's one smoke run (tests/conftest.py: `smoke_run`, shared with tests/test_hm3_run.py); tests
that change the run directory work on a copy. A separate file from tests/test_hm3_run.py so that
`pytest -n 2 --dist loadfile` can run these on the other worker once the run exists (docs/testing.md). The
order matters for time only: the in-process tests after the resume reuse the programs it compiled.
"""

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from hm3_jax.io import atomic
from hm3_jax.pipeline import run as run_lib
from hm3_jax.pipeline import suggest as suggest_lib


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
    """A SIGKILL in the middle of PPO: the resumed run ends with the same report (points, paths and the FLOPs of
    the architecture level's cost accounting) and removes the half-written files the kill left."""
    config, workdir, report = smoke_run
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    # Simulate a kill during the architecture level: later stages, the report and the last RL checkpoint gone.
    removed = [n for n in os.listdir(os.path.join(resumed, "stages")) if n.endswith(".json")]
    removed = [n for n in removed if n not in ("preferences.json", "param_level.json")]
    for name in os.listdir(os.path.join(resumed, "stages")):
        if name not in ("preferences.json", "param_level.json"):
            os.remove(os.path.join(resumed, "stages", name))
    os.remove(os.path.join(resumed, "report.json"))
    ckpt = os.path.join(resumed, "arch", "hm3", "ckpt")
    steps = sorted(int(s) for s in os.listdir(ckpt) if s.isdigit())
    shutil.rmtree(os.path.join(ckpt, str(steps[-1])))
    shutil.rmtree(os.path.join(resumed, "exports"), ignore_errors=True)
    # ... and what the kill left half-written: a stage and the report (hm3_jax.io.atomic's names, a dead
    # process of this host), and the RL checkpoint orbax was saving.
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftovers = [os.path.join(resumed, "stages", atomic.temp_prefix(removed[0], pid=dead.pid) + "abc123"),
                 os.path.join(resumed, atomic.temp_prefix("report.json", pid=dead.pid) + "abc123"),
                 os.path.join(ckpt, f"{steps[-1]}.orbax-checkpoint-tmp-1234")]  # fmt: skip
    for path in leftovers:
        os.makedirs(path)
    again = run_lib.run_hm3(config, resumed, zoo_dir=smoke_zoo_dir)
    for name, m in report["methods"].items():
        np.testing.assert_allclose(again["methods"][name]["points"], m["points"], err_msg=name)
    assert again["methods"]["hm3"]["paths"] == report["methods"]["hm3"]["paths"]
    assert again["arch_level_summary"]["flops"] == report["arch_level_summary"]["flops"] > 0
    left = [os.path.join(d, n) for d, dirs, files in os.walk(resumed) for n in dirs + files
            if re.search(r"\.tmp-\d+@|orbax-checkpoint-tmp", n)]  # fmt: skip
    assert left == []


def test_suggest_rebuilds_the_runs_theta_at_a_front_preference(smoke_run):
    """At a preference of the run, the Theta(lambda) suggest builds is the run's (its held-out scores are the
    report's hm3_no_arch_level point)."""
    from hm3_jax.search.problem import score_params

    config, workdir, report = smoke_run
    _, _, problem = run_lib.setup(config, workdir)
    for i in range(len(report["methods"]["hm3_no_arch_level"]["points"])):
        pref = np.asarray(report["methods"]["hm3_no_arch_level"]["preferences"][i])
        theta, _ = suggest_lib._theta(workdir, config, problem, pref)
        got = score_params(problem.engines["heldout"], problem.experts, theta)
        np.testing.assert_allclose(got, report["methods"]["hm3_no_arch_level"]["points"][i], atol=1e-6)
    with pytest.raises(ValueError):
        suggest_lib.suggest(workdir, [0.5, 0.5])


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
    # A second suggestion reuses the loaded run (its engines outlive the call): its answer is the one a fresh
    # load gives (no score cached for the first Theta(lambda) is read for the second).
    warm = suggest_lib.suggest(workdir, [0.1, 0.3, 0.6], search=True)
    suggest_lib.clear_sessions()
    cold = suggest_lib.suggest(workdir, [0.1, 0.3, 0.6], search=True)
    for k in ("path", "decoded_path", "heldout", "search", "decision", "theta"):
        assert warm[k] == cold[k], k


def test_a_distilled_policy_decodes_the_front_and_serves_suggestions(smoke_run, tmp_path):
    """`suggest.distill` fits the run's policy onto its answers (on a copy of the run): its greedy decode at
    every front preference is that preference's answer, and `suggest(search=True)` decodes with it."""
    import shutil

    _, workdir, report = smoke_run
    run = str(tmp_path / "run")
    shutil.copytree(workdir, run, ignore=shutil.ignore_patterns("exports"))
    hm3 = report["methods"]["hm3"]
    before = suggest_lib.suggest(run, hm3["preferences"][1], search=True)
    out = suggest_lib.distill(run, steps=300)
    assert out["reproduced"] == out["num_preferences"] == len(hm3["paths"])
    assert out["decoded_paths"] == hm3["paths"]
    after = suggest_lib.suggest(run, hm3["preferences"][1], search=True)
    assert after["decoded_path"] == hm3["paths"][1]
    assert {k: before[k] for k in ("theta", "preference")} == {k: after[k] for k in ("theta", "preference")}
    with pytest.raises(ValueError, match="steps must be >= 1"):
        suggest_lib.distill(run, steps=0)


def test_demo_notebook_runs_end_to_end(smoke_run, smoke_zoo_dir, tmp_path):
    """notebooks/hm3_demo.ipynb executed with nbclient on the smoke config (on a copy of the session's run)."""
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
        # the matmul precision of the in-process tests (conftest), so the kernel's programs share their
        # persistent compilation cache entries instead of compiling again
        "os.environ['JAX_DEFAULT_MATMUL_PRECISION'] = 'highest'\n"
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
