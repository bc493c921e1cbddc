"""The stages of an HM3 run that any process may compute: after HM3's architecture level, the no-parameter-level
ablation and every baseline need only the preferences and their keys (the path baselines also HM3's evaluation
count, their budget). `run.run_hm3` computes them in the order given here; stage workers
(`pipeline.stage_workers`, `run.run_stage_worker`) take them in their own.
"""

from __future__ import annotations

from hm3_jax.pipeline import baseline_runs
from hm3_jax.pipeline.run_config import ablations
from hm3_jax.search import arch_level


def independent_stages(problem, config, wd, prefs, k_abl, param_keys, k_base, evaluator, budget_fn) -> list:
    """The stages after HM3 that need only the preferences and their keys: the no-parameter-level ablation (if
    configured), then every parameter baseline and every path baseline (at `budget_fn()` path evaluations, HM3's
    count unless configured), as `run_hm3` orders them: [(stage name, compute)]. Any process may compute any of
    them (`pipeline.stage_workers`)."""
    N, K = len(prefs), problem.num_tasks
    np_shell, np_pool = evaluator.shell, evaluator.pool
    out = []
    if "no_param_level" in ablations(config):
        out.append(
            (
                "hm3_no_param_level",
                lambda: arch_level.run_arch_level(
                    problem,
                    prefs,
                    [np_shell] * N,
                    [np_pool] * N,
                    problem.base["blocks"],
                    k_abl,
                    config.arch,
                    wd.subdir("arch", "no_param"),
                    "no_param",
                    K,
                    shared_pool_id=evaluator.pool_id,  # one model: a path is scored once for every preference
                ),
            )
        )
    for m in config.baselines.param_methods:
        out.append(
            (
                f"baseline_{m}",
                lambda m=m: baseline_runs.run_param_baseline(
                    problem,
                    m,
                    prefs,
                    param_keys[m],
                    tune=config.baselines.tune,
                    confirm_top=config.param_level.get("confirm_top", 0),
                ),
            )
        )
    path_keys = baseline_runs.baseline_keys(k_base, config.baselines.path_methods)
    for m in config.baselines.path_methods:
        out.append(
            (
                f"baseline_{m}",
                lambda m=m: baseline_runs.run_path_baseline(
                    problem,
                    m,
                    prefs,
                    path_keys[m],
                    evaluator,
                    config.arch.rl.t_max,
                    budget_fn(),
                    confirm_top=config.arch.get("confirm_top", 0),
                ),
            )
        )
    return out
