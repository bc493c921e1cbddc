"""The end-to-end HM3 run (issue 6): zoo -> preferences -> parameter level -> architecture level ->
ablations -> baselines at an equal budget -> held-out report, plots and exports.

Every step is a stage of `Workdir` (stored as JSON under `DIR/stages/`), and the RL keeps orbax checkpoints,
so a killed run re-run with the same command resumes and ends with the same report. A workdir made by a
different config is refused (`WorkdirError`).

Scale-out (issue 7): `mesh` (from `hm3_jax.distributed.make_mesh`, e.g. `--mesh=paths:4,data:2` of
experiments/run_hm3.py) goes to the path engines (candidate paths over "paths", batch examples over "data");
None keeps the single-device engine of `config.engine.strategy`. In a multi-process run (`jax.distributed`)
every process runs this same function on the same values (RL, CMA-ES and merges are replicated, small next to
path evaluation; path evaluation is one SPMD computation over the mesh), and only process 0 writes: stages
(`Workdir`), the report and plots, exports; the others wait at a barrier and read what process 0 wrote.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import logging

from hm3_jax import distributed
from hm3_jax.pipeline import baseline_runs, export, memory_plan, method_table, stage_plan, stage_workers
from hm3_jax.pipeline import progress as progress_lib
from hm3_jax.pipeline import report as report_lib
from hm3_jax.pipeline.preference_models import PreferenceModels, resident_preferences
from hm3_jax.pipeline.run_config import ablations, check_config, check_t_max, make_preferences
from hm3_jax.pipeline.workdir import Workdir, WorkdirError, config_diff, stage_file
from hm3_jax.search import arch_level, heldout_bootstrap, param_level
from hm3_jax.search.problem import Problem, make_problem
from hm3_jax.tasks import spec as spec_lib
from hm3_jax.tasks import spec_zoo
from hm3_jax.tasks import zoo as zoo_lib


def calibration_inputs(problem: Problem, zoo, rows: int = 32):
    """Calibration inputs [B, S] for moment alignment: prompts+targets of the search split (first tasks' rows)."""
    tree = problem.objectives["search"][-1].arrays.tree
    if "prompt_ids" in tree:  # a generation objective: its left-padded prompts and their mask
        ids, mask = (np.asarray(tree[k]) for k in ("prompt_ids", "prompt_mask"))
        return ids.reshape(-1, ids.shape[-1])[:rows], mask.reshape(-1, ids.shape[-1])[:rows].astype(
            np.float32
        )
    ids = np.asarray(tree["input_ids"])
    ids = ids.reshape(-1, ids.shape[-1])[:rows]
    return ids, (ids != zoo.tokenizer.pad_token_id).astype(np.float32)


def setup(config, workdir: str, zoo_dir: str | None = None, mesh=None):
    """Workdir, zoo and Problem of a run (shared by `run_hm3` and `suggest`); `mesh`: see the module docstring.

    Every run reads a spec (`hm3_jax.tasks.spec`): the user's (`config.spec`), or the one a built-in zoo writes of
    itself (`config.zoo`: tiny3 / tiny8 is built or checked first, by process 0 in a multi-process run, the others
    wait at a barrier). A workdir that already holds a run reads the spec that run recorded (so `suggest` and
    resumes never build anything), unless `zoo_dir` names another zoo.
    """
    # The whole config, the spec, its data and its checkpoints are checked (and loaded) before the workdir is
    # bound to the config (run.json): a mistake fixed and re-run into the same --workdir is not refused as
    # another run. Only a built-in zoo is written first (into its own directory, under its own fingerprint).
    check_config(config)
    recorded = _recorded_spec(workdir)  # a run already in the workdir: its spec and files, else {}
    spec_path = config.get("spec") or (None if zoo_dir else recorded.get("spec", {}).get("path"))
    if not spec_path:
        spec_path = _builtin_zoo(config, workdir, zoo_dir)
    check_memory(config, mesh, spec_path)  # before any checkpoint is loaded
    spec = spec_lib.load_spec(spec_path)
    # On a mesh the sources stay host arrays: only their pool's shards are placed (make_problem), not every
    # tensor whole on device 0 (docs/scaling.md, "Session 12: device 0 holds shards only").
    zoo = spec_zoo.load(spec, config.get("spec_split_seed", 0), on_host=mesh is not None)
    check_t_max(config, zoo.base.config.num_layers)
    hashes = spec_lib.file_hashes(spec, recorded.get("files"))
    wd = Workdir(workdir, config.to_dict())
    _check_spec_files(wd, hashes)
    wd.stage("spec", lambda: {"spec": spec_lib.as_dict(spec), "files": hashes, **spec_zoo.describe(zoo)})
    # The sources' scores on every split (the ideal point) are a stage: computed once per run (12 model
    # evaluations on tiny3, most of a suggestion's time), then read back by resumes and by `suggest`.
    stored = wd.load_stage("source_scores") if wd.has_stage("source_scores") else None
    problem = make_problem(
        zoo,
        config.engine.strategy,
        config.engine.chunk_size,
        config.engine.prefix_sharing,
        search_examples=config.engine.get("search_examples") or None,
        mesh=mesh,
        source_scores=stored,
        single_path_chunks=config.engine.get("single_path_chunks", True),
    )
    wd.stage("source_scores", lambda: {k: v.tolist() for k, v in problem.source_scores.items()})
    return wd, zoo, problem


def check_memory(config, mesh, spec_path: str) -> None:
    """The memory plan's check (`memory_plan.check_fits`) before anything is loaded: a run that would not fit
    its devices is refused with `memory_plan.PlanError`, naming the program and the device. Runs where the
    backend reports a memory limit (accelerators) or `config.memory.device_memory_gb` is set; skipped with
    `config.memory.check_fits = False` (it compiles the run's programs once with abstract inputs; of the path
    engines only the search split's, as the other splits' programs differ only in how many batches they map)."""
    memory = config.get("memory")
    if memory is None or not memory.get("check_fits", True):
        return
    gb = memory.get("device_memory_gb")
    memory_plan.check_fits(
        config, mesh, None if gb is None else int(float(gb) * 2**30), spec_path=spec_path, splits=("search",)
    )


def _builtin_zoo(config, workdir: str, zoo_dir: str | None) -> str:
    """The spec path of a built-in zoo (config.zoo: tiny3 / tiny8; default directory WORKDIR/zoo), built by
    process 0 if needed and made a spec by `zoo.write_spec`."""
    zoo_dir = zoo_dir or os.path.join(os.path.abspath(workdir), "zoo")
    if distributed.is_main_process():
        try:  # a directory that cannot hold a zoo is a ZooError from zoo.check_buildable, before anything is written
            zoo_lib.ensure_built(config.zoo, zoo_dir, on_mismatch="error")
        except zoo_lib.ZooMismatchError as e:
            differ = config_diff({"zoo": e.built_config}, {"zoo": config.zoo.to_dict()})
            raise WorkdirError(
                f"{zoo_dir} holds a zoo built from another config.zoo ({'; '.join(differ) or 'format'}); pass "
                f"another --zoo_dir or --workdir, or delete {zoo_dir} to have it rebuilt"
            ) from None
        zoo_lib.write_spec(zoo_dir)
    distributed.barrier("hm3:zoo")
    return os.path.join(zoo_dir, zoo_lib.SPEC)


def _recorded_spec(workdir: str) -> dict:
    """The "spec" stage a run in `workdir` recorded (its spec, file hashes, splits), or {}."""
    path = stage_file(workdir, "spec")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _check_spec_files(wd: Workdir, hashes: dict) -> None:
    """A workdir's cached stages were computed from the spec's files as they were: a changed checkpoint, data or
    spec file (by content hash) is an error naming the files, never mixed into the cached stages."""
    if not wd.has_stage("spec"):
        return
    changed = spec_lib.changed_files(wd.load_stage("spec")["files"], hashes)
    if changed:
        raise WorkdirError(
            f"{wd.path} holds a run of this spec whose files have changed since: {changed}; use a new --workdir "
            "(or restore the files)"
        )


def preference_models(problem: Problem, param: list[dict], variant: str, config=None) -> PreferenceModels:
    """Theta(lambda) per preference as a `PreferenceModels` bank (`config.memory.resident_preferences` of them
    held at once; 0 or no config: all)."""
    return PreferenceModels(problem, param, variant, resident=resident_preferences(config))


def run_keys(config) -> tuple:
    """The run's PRNG keys from `config.seed`: (preferences, parameter level, architecture level, ablation,
    baselines); the main process and stage workers derive them alike."""
    return tuple(jax.random.split(jax.random.PRNGKey(config.seed), 5))


def path_budget(config, hm3: dict) -> int:
    """The path baselines' budget in path evaluations: `config.baselines.budget`, or HM3's count (`hm3` stage)."""
    return int(config.baselines.budget if config.baselines.budget > 0 else hm3["evaluations"])


def run_hm3(config, workdir: str, zoo_dir: str | None = None, mesh=None) -> dict:
    """Runs (or resumes) the whole job; returns the report dict (also written to DIR/report.json).

    `mesh`: None (one device, `config.engine.strategy`) or a ("paths", "data", "model") Mesh for the path
    engines; the report is the same either way (wall seconds aside). Every process of a multi-process run
    calls this and gets the report; process 0 writes it.
    """
    t0 = time.perf_counter()
    wd, zoo, problem = setup(config, workdir, zoo_dir, mesh)
    K, L = problem.num_tasks, problem.config.num_layers
    k_pref, k_param, k_arch, k_abl, k_base = run_keys(config)
    prefs = np.asarray(
        wd.stage("preferences", lambda: make_preferences(config.preferences, K, k_pref)), np.float32
    )
    N = len(prefs)
    logging.info("HM3: %d tasks %s, %d preferences, L=%d", K, problem.tasks, N, L)
    progress = progress_lib.RunProgress(
        progress_lib.plan_stages(config, K, N, ablations(config), L), start=t0
    )

    # Parameter level.
    param = progress.stage(
        wd, "param_level", lambda: param_level.run_param_level(problem, prefs, k_param, config.param_level)
    )
    variant = config.param_level.pool_model if config.param_level.cmaes.enabled else "paper"
    bank = preference_models(problem, param, variant, config)  # Theta(lambda_i) built when needed
    shells, pools = bank.shells, bank.pools
    base_blocks = problem.base["blocks"]

    aligners = {"search": None, "heldout": None}
    if config.arch.alignment == "moment":
        ids, mask = calibration_inputs(problem, zoo)
        aligners["search"] = arch_level.make_aligners(
            problem, "moment", shells, pools, ids, mask, shell_source=K
        )
        aligners["heldout"] = aligners["search"]  # junctions are fitted on search data and then fixed

    hm3 = progress.stage(
        wd,
        "hm3",
        lambda: arch_level.run_arch_level(
            problem,
            prefs,
            shells,
            pools,
            base_blocks,
            k_arch,
            config.arch,
            wd.subdir("arch", "hm3"),
            "hm3",
            K + 1,
            aligners["search"],
            aligners["heldout"],
        ),
    )

    np_shell, np_pool = arch_level.no_param_level_model(problem)
    evaluator = baseline_runs.ExpertPathEvaluator(problem, np_shell, np_pool)
    budget = path_budget(config, hm3)
    for m in config.baselines.path_methods:
        progress.set_count(f"baseline_{m}", budget)
    param_keys = baseline_runs.baseline_keys(k_base, config.baselines.param_methods)
    stages = stage_plan.independent_stages(
        problem, config, wd, prefs, k_abl, param_keys, k_base, evaluator, lambda: budget
    )
    done = stage_workers.run_stages(wd, progress, stages, wait=True)  # stage workers took some (if any)
    no_param = done.get("hm3_no_param_level")
    methods = method_table.reference_methods(problem)
    for m in (*config.baselines.param_methods, *config.baselines.path_methods):
        methods[m] = done[f"baseline_{m}"]
    methods.update(method_table.hm3_methods(prefs, param, variant, hm3, no_param, ablations(config)))
    method_table.set_balanced_indices(problem, methods)
    extra = method_table.report_extra(
        problem, methods, param, hm3, budget, config.arch.alignment, wd.fingerprint
    )
    rep = report_lib.build_report(
        problem.tasks, problem.ideal["heldout"], methods, config.report.fixed_reference, extra
    )
    if config.report.get("bootstrap_samples", 0) > 0 and "hm3" in rep["methods"]:
        stage_workers.load_kept_stats(problem.engines["heldout"], wd.path)  # what stage workers scored
        specs = method_table.method_specs(
            problem, config, methods, param_keys, bank, np_shell, np_pool, hm3, no_param, evaluator
        )
        bs = progress.stage(
            wd,
            "bootstrap",
            lambda: heldout_bootstrap.run_bootstrap(
                problem,
                specs,
                {n: rep["methods"][n]["points"] for n in specs},
                rep["reference_point"],
                config.report.bootstrap_samples,
                config.seed,
                [heldout_bootstrap.params_spec(problem, p) for p in [problem.base, *problem.experts]],
            ),
        )
        rep = report_lib.add_bootstrap(rep, bs)
    curves = {"hm3": hm3["reward_curve"]}
    if no_param is not None:
        curves["hm3_no_param_level"] = no_param["reward_curve"]
    if distributed.is_main_process():
        title = (
            f"HM3 on {os.path.basename(config.spec) if config.get('spec') else zoo_lib.zoo_kind(config.zoo)}"
        )
        paths = report_lib.write_report(rep, wd.path, curves, title=title)
        logging.info("report written: %s", paths)
    distributed.barrier("hm3:report")

    if config.export:  # host-side only (no collectives): process 0 writes, the others read its stage
        progress.stage(
            wd, "exports", lambda: _export_all(wd, zoo, problem, param, variant, bank, hm3), main_only=True
        )
    logging.info("HM3 run done in %.1f s", time.perf_counter() - t0)
    return rep


def run_stage_worker(
    config, workdir: str, zoo_dir: str | None = None, index: int = 1, nice: int = stage_workers.WORKER_NICE
) -> None:
    """A stage worker's part of a `run_hm3 --stage_workers=N` run (`pipeline.stage_workers`): once the main
    process has written the preferences, the independent stages nobody has taken yet, the ablation and the
    parameter baselines in reverse order (the main process takes them in order after HM3), then, once HM3's
    stage is written, the path baselines in reverse order, at `nice` lower CPU priority than the main process.
    Writes stages only (no report)."""
    os.nice(nice)  # the main process's parameter level and HM3 go first
    stage_workers.wait_for_stage(workdir, "preferences")
    wd, _, problem = setup(config, workdir, zoo_dir)
    prefs = np.asarray(wd.load_stage("preferences"), np.float32)
    _, _, _, k_abl, k_base = run_keys(config)
    K, N, L = problem.num_tasks, len(prefs), problem.config.num_layers
    progress = progress_lib.RunProgress(progress_lib.plan_stages(config, K, N, ablations(config), L))
    evaluator = baseline_runs.ExpertPathEvaluator(problem, *arch_level.no_param_level_model(problem))

    def budget() -> int:
        return path_budget(config, wd.load_stage("hm3"))

    param_keys = baseline_runs.baseline_keys(k_base, config.baselines.param_methods)
    stages = stage_plan.independent_stages(
        problem, config, wd, prefs, k_abl, param_keys, k_base, evaluator, budget
    )
    stats = os.path.join(wd.path, stage_workers.WORKER_STATS.format(index=index))  # for the main's bootstrap
    stages = [(n, stage_workers.saving_kept_stats(f, problem.engines["heldout"], stats)) for n, f in stages]
    num_path = len(config.baselines.path_methods)
    before_hm3, after_hm3 = stages[: len(stages) - num_path], stages[len(stages) - num_path :]
    ablation = [s for s in before_hm3 if s[0] == "hm3_no_param_level"]
    stage_workers.run_stages(
        wd, progress, ablation + [s for s in before_hm3[::-1] if s not in ablation], False
    )
    if after_hm3:
        stage_workers.wait_for_stage(workdir, "hm3")
        for m in config.baselines.path_methods:  # their real budget, as the main process counts it
            progress.set_count(f"baseline_{m}", budget())
        stage_workers.run_stages(wd, progress, after_hm3[::-1], wait=False)
    logging.info("stage worker done in %.1f s", time.perf_counter() - progress.start)


def _export_all(wd, zoo, problem, param, variant, bank, hm3) -> dict:
    m = zoo.manifest["paths"]
    zoo_dirs = {
        "base": os.path.join(zoo.workdir, m["base"]),
        "experts": [os.path.join(zoo.workdir, m["experts"][t]) for t in problem.tasks],
    }
    tok = os.path.join(zoo.workdir, m["tokenizer"])
    out = {}
    for i, (e, r) in enumerate(zip(param, hm3["per_preference"], strict=True)):
        mg, pool = bank.merged(i), bank.pools[i]
        hp = e.get(variant, e["paper"])["hparams"] if variant in e else e["paper"]["hparams"]
        junction = None
        if "junction" in r:
            junction = {k: np.asarray(v) for k, v in r["junction"].items()}
        out[f"pref_{i}"] = export.export_preference(
            os.path.join(wd.path, "exports", f"pref_{i}"),
            problem.config,
            mg,
            pool,
            r["path"],
            e["preference"],
            zoo_dirs,
            hp,
            junction,
            tok,
            zoo.spec.tokenizer_source,
        )
    return out
