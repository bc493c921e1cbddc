"""Every script in benchmarks/ runs to its JSON in a tiny mode (issue 18: benchmarks must not rot).

Each script's `main(argv)` is called in-process with the tiny flags its docstring gives (a subprocess would pay
~5 s of jax import; scaling.py spawns its one subprocess itself). Benchmarks that need a zoo or a finished run
get the session's smoke zoo and smoke HM3 run (tests/conftest.py), which they only read. The numbers are
meaningless at these sizes; what is checked is that the script runs and returns what it promises.

`make test` runs all but two: 31 s once the smoke run exists (a session that made it, as the suite does; load
1.5): path_eval.py 16 s, most of it compiling the PPO policy for its random pool; the run-based ones reuse the
smoke run's programs and stored scores (arch_headroom.py 4 + 4 s, search_split_check.py 1 s); scaling.py's
subprocess 4 s; lm_eval_speed.py ~5 s (11 s alone at load 6: transformers' tokenizer import, the path engine's
eager recording of its objectives), its hf side only with `HM3_SLOW_BENCHMARK_SMOKE=1` and torch + lm-eval[hf] in
this venv or in `HM3_HF_PYTHON`'s. Two compile more than their tiny mode can avoid and run with
`HM3_SLOW_BENCHMARK_SMOKE=1` only (measured at load 3-6): alignment.py (~23 s: a learned junction fit, engines with junctions on both splits)
and multitask_bound.py (~19 s: multi-task training, per-example re-scoring); so does time_to_front.py, whose
tiny mode is a whole smoke run of its own (zoo reused; 167 s), in a subprocess because it points jax's compilation
cache at its run directory, and memory.py (two small HM3 runs in child processes, ~3 min).
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "benchmarks")
SMOKE_CONFIG = "--config=experiments/configs/tiny3.py:smoke"
slow = pytest.mark.skipif(
    not os.environ.get("HM3_SLOW_BENCHMARK_SMOKE"),
    reason="slow smoke (module docstring): HM3_SLOW_BENCHMARK_SMOKE=1",
)


def _benchmark(name: str):
    """benchmarks/<name>.py as a module (the directory is not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Relative paths a benchmark falls back to (runs/tiny3's archive, runs/... outputs) resolve in a temp dir."""
    monkeypatch.chdir(tmp_path)


def test_every_benchmark_has_a_smoke_test():
    """Each script is run here (a test named test_<script>[__<variant>]) or by another test file that names it
    (`benchmarks/<script>.py` or `benchmarks.<script>`), so a new benchmark cannot arrive untested."""
    scripts = {f[: -len(".py")] for f in os.listdir(BENCHMARKS) if f.endswith(".py")}
    here = {name[len("test_") :].split("__")[0] for name in globals() if name.startswith("test_")}
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    elsewhere = set()
    for f in os.listdir(tests_dir):
        if f.endswith(".py") and f != os.path.basename(__file__):
            with open(os.path.join(tests_dir, f)) as fh:
                text = fh.read()
            elsewhere |= {s for s in scripts if f"benchmarks/{s}.py" in text or f"benchmarks.{s}" in text}
    assert scripts <= here | elsewhere, (
        f"benchmarks without a smoke test: {sorted(scripts - here - elsewhere)}"
    )


def test_hypervolume():
    out = _benchmark("hypervolume").main(["--smoke"])
    for size in out["sizes"].values():
        assert size["max_relative_difference"] <= 1e-9 and size["speedup"] > 0
    assert out["bootstrap"]["moocore_seconds_per_resample"] > 0


def test_host_blas():
    out = _benchmark("host_blas").main(["--smoke"])
    for workload in ("svd", "tsv_merge"):
        assert (
            out["idle"][workload]["default_seconds"] > 0
            and out["idle"][workload]["single_thread_seconds"] > 0
        )
    assert out["busy_processes"] == 0 and "busy" not in out


def test_pool_parts():
    out = _benchmark("pool_parts").main(["--smoke"])
    assert out["scores_equal"] and set(out["seconds"]) == {"map_plain", "vmap_plain", "map_tree"}
    assert all(t["stacked"] > 0 and t["parted"] > 0 for t in out["seconds"].values())


def test_forward_efficiency():
    out = _benchmark("forward_efficiency").main(["--smoke"])
    assert out["fraction_of_matmul_per_cpu_s"]["D=32"] > 0


def test_merge_throughput(tmp_path):
    out = _benchmark("merge_throughput").main(["--smoke", f"--workdir={tmp_path}"])
    assert out["ties_gbps"] > 0 and out["dare_ties_gbps"] > 0 and out["num_layers"] == 1
    assert os.listdir(tmp_path) == []  # the synthetic pool is deleted


def test_lm_eval_speed():
    """The adapter, the token engine and the path engine on the same 6 requests (no hf side: torch is no
    dependency; `test_lm_eval_speed__hf_side` runs it)."""
    out = _benchmark("lm_eval_speed").main(["--smoke"])
    assert out["requests"]["all"] == 6
    assert set(out["requests_per_s"]) == {"adapter", "token_engine", "path_engine"}
    assert all(r > 0 for rates in out["requests_per_s"].values() for r in rates.values())
    assert out["adapter_vs_path_engine"]["all"] > 0 and "hf_vs_adapter" not in out


@slow
def test_lm_eval_speed__hf_side():
    """The hf side (`HF_SIDE`) in $HM3_HF_PYTHON (a venv with torch and lm-eval[hf], the benchmark's docstring),
    else in this interpreter if it has them: the same answers as the adapter's."""
    python = os.environ.get("HM3_HF_PYTHON", sys.executable)
    if python == sys.executable and not all(importlib.util.find_spec(m) for m in ("torch", "accelerate")):
        pytest.skip("lm-eval's hf backend needs torch and accelerate: set HM3_HF_PYTHON")
    out = _benchmark("lm_eval_speed").main(["--smoke", f"--hf_python={python}"])
    assert out["hf_vs_adapter"]["all"] > 0 and out["agreement_vs_hf"]["generations_equal"] == 1.0
    assert out["agreement_vs_hf"]["max_abs_loglikelihood_diff"] < 1e-4


def test_scaling():
    out = _benchmark("scaling").main(["--devices=1", "--num_paths=2", "--repeats=1"])
    assert out["throughput_ratio_vs_1_device"] == {1: 1.0}


def test_score_modes():
    """The callback and split loops on the planted problem, 2 timed iterations each."""
    out = _benchmark("score_modes").main(["--smoke"])
    assert out["same_params"] and out["iterations"] == 2
    assert out["callback_s_per_iteration"] > 0 and out["split_s_per_iteration"] > 0


def test_path_eval():
    """No --zoo: the random pool (no run either: the policy is tiny3's smoke config)."""
    out = _benchmark("path_eval").main(["--smoke"])
    assert out["zoo"] is False and out["policy_batch"] == "policy rollouts"
    assert out["rebuild_max_abs_score_diff_vs_engine"] < 1e-6 and out["engine_paths_per_s"] > 0


def test_path_eval__config_and_archive_of_a_run(smoke_run):
    """A run made by the current code: the policy's ArchConfig is built as the run builds it (its config.arch has
    keys such as warm_started_learning_rate that ArchConfig does not take), its score archive is read. The zoo
    mode's setup runs end to end in test_alignment (opt-in); the rest is test_path_eval's."""
    config, workdir, _ = smoke_run
    path_eval = _benchmark("path_eval")
    num_layers = config.zoo.model.num_layers
    setup = types.SimpleNamespace(experts=[None] * 3, config=types.SimpleNamespace(num_layers=num_layers))
    acfg = path_eval.rl_config(setup, workdir)
    rl = config.arch.rl
    assert (acfg.num_sources, acfg.warm_start_source, acfg.t_max) == (4, 3, rl.t_max)
    assert (acfg.learning_rate, acfg.warm_start_learning_rate) == (
        rl.warm_started_learning_rate,
        rl.learning_rate,
    )
    paths = path_eval.archive_paths(path_eval.find_archive(workdir), 4 * num_layers)
    assert paths.shape[1] == rl.t_max and len(np.unique(paths, axis=0)) == len(paths)


@slow
def test_alignment(smoke_zoo_dir, smoke_run):
    _, workdir, _ = smoke_run
    out = _benchmark("alignment").main(["--smoke", f"--zoo={smoke_zoo_dir}", f"--run={workdir}"])
    assert out["winner_heldout"] in ("none", "moment", "learned")
    assert out["num_paths"]["policy"] == 4


def test_arch_headroom(smoke_zoo_dir, smoke_run):
    _, workdir, _ = smoke_run
    out = _benchmark("arch_headroom").main(
        [f"--run={workdir}", f"--zoo={smoke_zoo_dir}", SMOKE_CONFIG, "--top=2"]
    )
    assert len(out["per_preference"]) == 3 and math.isfinite(out["mean_gain_heldout_of_that_path"])


def test_arch_headroom__neighbourhood(smoke_zoo_dir, smoke_run, tmp_path):
    _, workdir, _ = smoke_run
    plot = tmp_path / "neighbourhood.png"
    out = _benchmark("arch_headroom").main([
        f"--run={workdir}", f"--zoo={smoke_zoo_dir}", SMOKE_CONFIG, "--neighbourhood", "--preferences=0",
        "--bootstrap=10", f"--plot={plot}",
    ])  # fmt: skip
    assert out["per_preference"][0]["check_heldout_vs_report"] == "ok" and plot.exists()


@slow
def test_multitask_bound(smoke_zoo_dir, smoke_run, tmp_path):
    _, workdir, _ = smoke_run
    out = _benchmark("multitask_bound").main([
        f"--run={workdir}", f"--zoo={smoke_zoo_dir}", "--config=smoke", f"--out={tmp_path}", "--multipliers=1",
        "--bootstrap=10",
    ])  # fmt: skip
    assert "multitask_1x" in out["models"] and os.path.exists(out["plot"])


def test_search_split_check(smoke_run):
    _, workdir, _ = smoke_run
    out = _benchmark("search_split_check").main([f"--run={workdir}"])
    assert out["num_preferences"] == 3 and set(out["mean_weighted"]) == {"task_arithmetic", "hm3"}


def test_distilled_suggestions(smoke_run, tmp_path):
    _, workdir, _ = smoke_run

    def files():  # the run's files but its compilation cache (other tests' suggestions may add to it)
        walk = [(p, ns) for p, _, ns in os.walk(workdir) if "jax_cache" not in p]
        return sorted(
            (os.path.join(p, n), os.stat(os.path.join(p, n)).st_mtime_ns) for p, ns in walk for n in ns
        )

    before = files()
    out = _benchmark("distilled_suggestions").main(
        [f"--run={workdir}", f"--workdir={tmp_path / 'run'}", "--num_new=2", "--steps=300"]
    )
    assert out["front_reproduced"] == "3/3" and len(out["per_preference"]) == 2
    assert files() == before  # the run is not changed (the benchmark works on a copy)


@slow
def test_time_to_front(smoke_zoo_dir, tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.time_to_front", "--smoke", f"--zoo_dir={smoke_zoo_dir}",
           f"--workdir={tmp_path / 'run'}", "--no_fresh_process"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    out = json.loads(text[text.rfind("\n{") + 1 :] if "\n{" in text else text)
    assert out["run_seconds"] > 0 and len(out["warm_suggest_seconds"]) == 2


@slow
def test_memory():
    """Two whole HM3 runs in child processes (N = 1 and 2 preferences, one held at a time); ~3 min here."""
    out = _benchmark("memory").main(["--smoke"])
    assert [r["preferences"] for r in out["runs"]] == [1, 2]
    assert all(r["resident_preferences"] == 1 and r["peak_rss_gib"] > 0.1 for r in out["runs"])
    assert out["sources_bytes"] > 0 and set(out["peak_growth_gib_by_resident"]) == {"1"}


@slow
def test_data_aware_menu(smoke_zoo_dir, tmp_path):
    """The parameter level with and without the data-aware menu, one preference of the smoke zoo (an absl main:
    flags parsed here; slow: the menu's candidates are also rebuilt and scored held out)."""
    out = tmp_path / "menu.json"
    module = _benchmark("data_aware_menu")
    module.FLAGS(
        ["data_aware_menu", SMOKE_CONFIG, f"--zoo={smoke_zoo_dir}", "--preferences=1", f"--out={out}"]
    )
    module.main([])
    result = json.loads(out.read_text())
    assert {"with_menu", "without_menu", "regmean", "fisher", "tsv"} <= set(result["summary"])
    assert len(result["winners"]) == 1 and result["calibration_passes"]["forward_rows"] > 0


@slow
def test_adamerging_sweep(smoke_zoo_dir, tmp_path):
    """AdaMerging's settings at the balanced preference on the smoke zoo: task arithmetic rows and one AdaMerging
    row per setting, whose coefficients stay in [0, 1] (slow: every row is scored on both splits)."""
    out = tmp_path / "sweep.json"
    returned = _benchmark("adamerging_sweep").main([
        SMOKE_CONFIG, f"--zoo={smoke_zoo_dir}", "--settings=2:1e-2:4,3:1e-1:4", "--correlation_samples=2",
        "--correlation_rows=4", f"--out={out}",
    ])  # fmt: skip
    result = json.loads(out.read_text())
    assert result == json.loads(json.dumps(returned))
    corr = result["entropy_correlation"]  # 11 task-arithmetic scales + 2 random merges, one entropy per task
    assert np.shape(corr["entropies"]) == np.shape(corr["search_scores"]) == (13, len(result["own"]))
    assert -1.0 <= corr["spearman_mean"] <= 1.0 or np.isnan(corr["spearman_mean"])
    names = [r["name"] for r in result["results"]]
    assert names[:4] == [f"task_arithmetic scale {s}" for s in (0.3, 0.5, 0.7, 1.0)]
    ada = result["results"][4:]
    assert [r["name"] for r in ada] == ["adamerging 2x0.01 on 4", "adamerging 3x0.1 on 4"]
    for r in ada:
        assert 0.0 <= r["coefficient_range"][0] <= r["coefficient_range"][1] <= 1.0
        assert len(r["heldout"]) == len(result["own"]) and r["seconds"] > 0
        own = np.asarray(result["own"])
        pct = 100 * np.asarray(r["heldout"]) / np.where(own > 0, own, np.nan)  # a smoke expert can score 0
        got = [np.nan if p is None else p for p in r["percent_of_expert"]]
        np.testing.assert_allclose(got, pct, atol=0.01)


@slow
def test_tiny8_expert_sweep(capsys):
    """The tiny8 experts' learning-rate sweep on the smoke zoo's config: two tasks, one setting, a few steps."""
    module = _benchmark("tiny8_expert_sweep")
    module.FLAGS(["tiny8_expert_sweep", "--smoke", "--tasks=digits,letters", "--learning_rates=2e-3",
                  "--num_steps=4", "--scales=0.5", "--probe_l2s=1e-2"])  # fmt: skip
    module.main([])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert rows[0]["probe_l2"] == 1e-2 and set(rows[0]["base_search"]) >= {"digits", "letters"}
    last = rows[-1]
    assert (
        last["learning_rate"] == 2e-3 and last["num_steps"] == 4 and set(last["own"]) == {"digits", "letters"}
    )
    assert 0 <= last["task_arithmetic"]["0.5"]["mean"] <= 100
