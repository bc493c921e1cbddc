"""A memory plan of an HM3 run before launch (issue 16): will it fit, on which device, at what batch size?

    plan = plan_run(config, mesh, device_memory_bytes=32 * GIB)    # nothing is loaded, nothing runs
    print(format_plan(plan)); plan.fits; plan.largest_batch
    check_fits(config, mesh, device_memory_bytes)                 # the same, PlanError when it does not fit

Reads only what a run reads besides the weights (`spec_zoo.load_tasks`: the spec, every config.json, the
base's tokenizer and the data files, so the batches have the run's exact shapes) and lowers and compiles the
run's device programs with abstract inputs (`jax.ShapeDtypeStruct`s placed as the run places them; on a CPU host
the mesh is made of simulated devices). Per program and per device, `compiled.memory_analysis()` gives

    program bytes = arguments + outputs + temporaries - aliased (donated buffers counted once)

and the device the run also keeps other arrays on (device 0, where `load_pretrained` puts every tensor) adds
the run's resident arrays that are not the program's arguments (`resident_bytes`). The programs:

* ``merge``: the tuned parameter level's merge (`merging.traced.dare_ties_traced`, tensor by tensor: the largest
  tensor's program, base and K experts' tensors in, the merged tensor out) on device 0, when the run tunes
  (`param_level.cmaes.enabled`; the paper's merge, `merging.hm3_merge`, runs eagerly leaf by leaf and is not
  planned); on a mesh each merged tensor goes to the host as it is made (`merging.host_leaves`);
* ``path_scores/<split>``: the path engine's program for one chunk of candidate paths over the pool of the
  K + 1 sources' blocks, for each engine the run makes ("search", capped to `engine.search_examples` rows per
  task when set, "search_full", the whole search split then, and "heldout"), on the run's mesh (strategy
  "shard": paths over "paths", examples over "data"; shell and pool placed by `PathEngine.model_shardings`),
  or on one device (plus the prefix tree's program, ``path_scores/<split>/tree``, when teacher-forced tasks
  run as a tree); generation tasks decode inside it. These are also the no-parameter-level ablation's and the
  path baselines' programs: their model (`arch_level.no_param_level_model`, the experts' averaged shell and the
  pool `experts + [expert 0]`) has the shapes of HM3's and their engines are the split engines' `with_model`
  copies. EA, MOEA and DE pass junction rows (their DFS scale genes), a program of its own: without
  `arch.alignment` it is planned as ``path_scores/<split>/junction`` (and ``.../tree/junction``;
  `program_memory.path_variants`);
* ``statistics/grams``, ``statistics/fisher``: the data-aware merges' per-expert statistics, when the run
  computes them (RegMean / Fisher merging in the upper level's menu or among the baselines;
  `statistics_memory`); all K experts' statistics then stay resident beside every other program;
* ``model_scores/<task>``: one model's score on a held-out task as the run computes it (`problem.score_params`,
  the held-out bootstrap: the model's identity path over the pool `experts + [model]` through the split's
  engine, on the run's mesh with the model's shell and own part placed like the pool), one per distinct shape.

The splits' programs differ only in how many batches they map over (outputs, the batches' ids as constants);
building an engine runs every objective once eagerly to record its batches (`make_engine`), which for a real vocabulary
and thousands of multiple-choice rows takes minutes on a CPU, so `splits` can restrict a plan to "search".
The RL actor-critic and PPO state (< 40 MB) are not planned.

Host bytes: the sources' checkpoint bytes in the spec's dtype, (K + 1) models (what the run loads), and on a
mesh the merged models the run holds as host arrays (`program_memory.host_merged_models`: one in one process).

The largest evaluation batch that fits is read off two compilations of ``path_scores/search`` (at the spec's
`eval_batch_size` B and at 2 B; device bytes are affine in B: activations and the KV cache scale with it,
weights do not), rounded down to a multiple of the mesh's "data" axis.

Numbers compiled on CPU approximate an accelerator's: XLA:TPU pads arrays to its tiles and fuses differently,
so leave headroom (`memory_fraction`, default 0.9); on the accelerator itself (`simulate=False` in
experiments/plan.py) the figures are the target compiler's.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax.pipeline import statistics_memory as stats_memory
from hm3_jax.pipeline.program_memory import (
    SPLITS,
    ProgramMemory,
    abstract_params,
    add_held,
    engine_programs,
    host_merged_models,
    merge_program,
    model_score_programs,
    tree_bytes,
)
from hm3_jax.tasks import spec as spec_lib
from hm3_jax.tasks import spec_objectives, spec_zoo

GIB = 1 << 30
# The kinds of programs a plan compiles (see the module docstring).
PROGRAMS = ("merge", "path_scores", "model_scores", "statistics")
# XLA:CPU flags of a simulated plan. The programs are compiled, never run: the backend's (LLVM) optimisations
# change only the machine code, not the buffers (measured: the same bytes on the tiny settings), so they are
# off. XLA:CPU has no bfloat16 matmul: it converts bf16 weights to f32 around every dot, and its loop-invariant
# code motion then hoists those converts out of the path loops, making an f32 copy of the whole pool (Llama-2-7B,
# GSM8K's decode alone: 133 GiB of temporaries per device, 36 GiB without it); TPUs and GPUs multiply bf16
# natively and make no such copy, so that pass is off too (docs/scaling.md). They must be set before JAX starts
# its backend (experiments/plan.py does with --simulate).
CPU_PLAN_XLA_FLAGS = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    " --xla_disable_hlo_passes=while-loop-invariant-code-motion"
)
DEFAULT_MEMORY_FRACTION = 0.9  # of a device's memory a plan may use (XLA's own buffers, fragmentation)


class PlanError(ValueError):
    """The run would not fit: the message names the program, the device and the bytes."""


class Plan(NamedTuple):
    """A run's memory plan (see the module docstring); bytes are per device unless named host.

    Attributes: programs; host_bytes: the sources' checkpoint bytes and the merged models held on the host
    (`host_merged` of them); model_bytes: one model in the spec's dtype;
    usable_bytes: the device memory a program may use (None: not checked); device: the device kind compiled for;
    eval_batch_size: the spec's B; largest_batch: the largest B for which ``path_scores/search`` fits on device 0
    (None: not searched or not limited by B; 0: not even B = data axis size fits); largest_batch_elsewhere: the
    same on the mesh's other devices, which hold no resident arrays (None without a mesh).
    """

    programs: tuple
    host_bytes: int
    model_bytes: int
    usable_bytes: int | None
    device: str
    eval_batch_size: int
    largest_batch: int | None
    largest_batch_elsewhere: int | None = None
    host_merged: int = 0

    def failures(self) -> list[ProgramMemory]:
        """Programs whose device-0 bytes exceed `usable_bytes` (none when it is None)."""
        if self.usable_bytes is None:
            return []
        return [p for p in self.programs if p.device0_bytes > self.usable_bytes]

    @property
    def fits(self) -> bool:
        return not self.failures()

    def error_message(self) -> str:
        """One line naming the first program that does not fit, its device and the bytes ('' when it fits)."""
        bad = self.failures()
        if not bad:
            return ""
        p = max(bad, key=lambda q: q.device0_bytes)
        others = f"; also {', '.join(q.name for q in bad if q is not p)}" if len(bad) > 1 else ""
        where = "device 0" if p.mesh == "device 0" else f"device 0 of mesh {p.mesh}"
        return (
            f"the run does not fit: program {p.name} needs {_gib(p.device0_bytes)} on {where} "
            f"({self.device}; {_gib(p.program_bytes)} per device for the program, {_gib(p.resident_bytes)} "
            f"resident) but {_gib(self.usable_bytes)} are usable{others}"
        )


def _gib(n) -> str:
    """Bytes in GiB (MiB, KiB below one)."""
    if n is None:
        return "-"
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 1024:.1f} KiB"


def usable_memory(
    device_memory_bytes: int | None, memory_fraction: float = DEFAULT_MEMORY_FRACTION
) -> int | None:
    """Bytes a plan may use per device: `memory_fraction` of `device_memory_bytes`, or of the first device's
    `memory_stats()["bytes_limit"]` when not given (None on a backend without memory stats, e.g. CPU). The first
    device of this process: another process's devices have no stats here (a multi-process run)."""
    if device_memory_bytes is None:
        stats = jax.local_devices()[0].memory_stats() or {}
        device_memory_bytes = stats.get("bytes_limit")
    return None if device_memory_bytes is None else int(device_memory_bytes * memory_fraction)


def plan_run(
    run_config,
    mesh=None,
    device_memory_bytes: int | None = None,
    memory_fraction: float = DEFAULT_MEMORY_FRACTION,
    *,
    spec_path: str | None = None,
    search_batch: bool = True,
    programs: tuple = PROGRAMS,
    splits=SPLITS,
) -> Plan:
    """The memory plan of `run_config` (an `experiments/configs` config with `spec`, or `spec_path`) on `mesh`
    (None: one device, as the run without --mesh).

    Args:
      device_memory_bytes: per device (None: the device's own limit when the backend reports one).
      memory_fraction: the fraction of it a plan may use.
      search_batch: also find the largest evaluation batch that fits (two more compilations).
      programs, splits: plan only these kinds of programs (PROGRAMS) and these splits' path engines (a run
        needs them all; tests plan fewer).
    Raises: SpecError (the spec, a config.json, the tokenizer or the data), never PlanError (see `check_fits`).
    """
    tasks = spec_zoo.load_tasks(spec_path or run_config.spec, run_config.get("spec_split_seed", 0))
    config, spec = tasks.base_config, tasks.spec
    dtype = jnp.bfloat16 if spec.dtype == "bfloat16" else jnp.float32
    num_experts = len(spec.experts)
    objectives = tuple(spec.experts)
    groups = tuple(objectives.index(spec.tasks[t].objective) for t in spec.tasks)
    usable = usable_memory(device_memory_bytes, memory_fraction)
    search_examples = int(run_config.engine.get("search_examples") or 0)
    split_objs = split_objectives(tasks, spec.eval_batch_size, search_examples)
    unknown = set(programs) - set(PROGRAMS)
    if unknown:
        raise ValueError(f"unknown program kind(s) {sorted(unknown)}; known: {PROGRAMS}")
    tuned = run_config.param_level.cmaes.enabled  # else only the paper's merge runs (eager, leaf by leaf)
    planned = [merge_program(config, num_experts, dtype, mesh)] if "merge" in programs and tuned else []
    if "path_scores" in programs:
        planned += engine_programs(config, num_experts, dtype, split_objs, run_config, mesh, groups, splits)
    if "model_scores" in programs:
        planned += model_score_programs(config, num_experts, dtype, split_objs["heldout"], run_config, mesh)
    model_bytes = tree_bytes(abstract_params(config, dtype))
    planned = add_held(planned, run_config, config, num_experts, dtype, mesh)
    # the data-aware merges' Grams and Fishers, resident beside every program once computed (traced once)
    traced = stats_memory.traced_statistics(config, num_experts, dtype, split_objs["search"], groups, objectives, run_config)  # fmt: skip
    stats_bytes = stats_memory.statistics_bytes(num_experts, traced)
    planned = stats_memory.add_statistics(planned, stats_bytes)
    if "statistics" in programs:
        planned += stats_memory.statistics_programs(config, num_experts, dtype, traced, mesh)
    largest = (None, None)
    if search_batch and usable is not None and "path_scores" in programs and "search" in splits:
        largest = largest_batch(tasks, run_config, mesh, groups, dtype, usable, planned, stats_bytes)
    device = jax.devices()[0].device_kind
    host_merged = host_merged_models(run_config, mesh)
    return Plan(
        tuple(planned),
        (num_experts + 1 + host_merged) * model_bytes,
        model_bytes,
        usable,
        device,
        spec.eval_batch_size,
        largest[0],
        largest[1] if mesh is not None else None,
        host_merged,
    )


def split_objectives(tasks: spec_zoo.SpecTasks, batch_size: int, search_examples: int = 0) -> dict:
    """{split: [Objective]} in the spec's task order at `batch_size` rows per batch, as `make_problem` makes
    them: with `search_examples` > 0 "search" holds each task's first `search_examples` search rows (batches of
    min(batch_size, search_examples) rows, generations as long as on the whole split: the lines of
    `SpecZoo.capped_search_objectives`) and "search_full" the whole search split."""
    spec = tasks.spec._replace(eval_batch_size=batch_size)
    objs = tasks.objectives
    if batch_size != tasks.spec.eval_batch_size:
        objs = spec_objectives.make_objectives(
            spec,
            tasks.data,
            tasks.tokenizer,
            tasks.base_config,
            tasks.eos_ids,
            tasks.images,
            harness=tasks.harness,
        )
    out = {split: list(objs[split].values()) for split in spec_lib.SPLITS}
    if search_examples:
        data = {t: {"search": d["search"][:search_examples]} for t, d in tasks.data.items()}
        capped = spec._replace(eval_batch_size=min(batch_size, search_examples))
        objs = spec_objectives.make_objectives(
            capped,
            data,
            tasks.tokenizer,
            tasks.base_config,
            tasks.eos_ids,
            tasks.images,
            ("search",),
            shapes_from=tasks.data,
            harness=tasks.harness,
        )
        out["search_full"], out["search"] = out["search"], list(objs["search"].values())
    return out


def largest_batch(
    tasks, run_config, mesh, groups, dtype, usable: int, programs, statistics: int = 0
) -> tuple:
    """(on device 0, on the other devices) the largest B at which ``path_scores/search`` (every row of it: plain,
    tree, junction) fits in `usable` bytes, from its bytes at two batch sizes (affine in B), rounded down to a
    multiple of the "data" axis (None: not limited by B): B0 (the spec's, in `programs`) and 2 B0. A capped search split whose batch
    cannot grow (`engine.search_examples` <= B0) is replaced by the whole search split for both. `statistics`:
    the data-aware merges' bytes resident beside it (`statistics_memory.statistics_bytes`)."""
    b0 = tasks.spec.eval_batch_size
    data = int(dict(mesh.shape).get("data", 1)) if mesh is not None else 1
    capped = int(run_config.engine.get("search_examples") or 0)
    num_experts = len(tasks.spec.experts)

    def search_bytes(progs):  # (on device 0, elsewhere)
        progs = [
            p for p in progs if p.name.split("/")[:2] == ["path_scores", "search"]
        ]  # also tree, junction
        return np.asarray(
            [max(p.device0_bytes for p in progs), max(p.program_bytes for p in progs)], np.float64
        )

    def plan_at(batch, cap):
        objs = split_objectives(tasks, batch, cap)
        progs = engine_programs(
            tasks.base_config, num_experts, dtype, objs, run_config, mesh, groups, ("search",)
        )
        return stats_memory.add_statistics(
            add_held(progs, run_config, tasks.base_config, num_experts, dtype, mesh), statistics
        )

    if capped and min(2 * b0, capped) == min(b0, capped):
        capped, at_b0 = 0, search_bytes(plan_at(b0, 0))
    else:
        at_b0 = search_bytes(programs)
    slope = (search_bytes(plan_at(2 * b0, capped)) - at_b0) / b0
    out = []
    for base, rate in zip(at_b0, slope, strict=True):
        b = int(b0 + (usable - base) // rate) if rate > 0 else None
        out.append(None if b is None else max(0, b // data * data))
    return tuple(out)


def check_fits(
    run_config,
    mesh=None,
    device_memory_bytes: int | None = None,
    memory_fraction: float = DEFAULT_MEMORY_FRACTION,
    *,
    spec_path: str | None = None,
    splits=SPLITS,
) -> Plan | None:
    """`plan_run` without the batch search, before a run loads anything: returns the plan, or raises PlanError
    naming the program and the device when the run does not fit (`splits`: see `plan_run`), at the first kind of
    program (PROGRAMS, in order) that does not, without compiling the rest. With no `device_memory_bytes` on a backend
    that reports no memory limit (CPU) nothing is compiled and None is returned (nothing to check against)."""
    if usable_memory(device_memory_bytes, memory_fraction) is None:
        return None
    plan = None
    for kind in PROGRAMS:  # one kind at a time: a run that does not fit is refused at its first such program
        part = plan_run(
            run_config,
            mesh,
            device_memory_bytes,
            memory_fraction,
            spec_path=spec_path,
            search_batch=False,
            programs=(kind,),
            splits=splits,
        )
        if not part.fits:
            raise PlanError(part.error_message())
        plan = part if plan is None else plan._replace(programs=plan.programs + part.programs)
    return plan


def format_plan(plan: Plan) -> str:
    """The plan as a text table (GiB per device; "program" = arguments + outputs + temporaries - aliased; device 0
    adds the run's resident arrays)."""
    rows = [
        (
            "program",
            "devices",
            "mesh",
            "arguments",
            "outputs",
            "temporaries",
            "program",
            "+resident",
            "device 0",
            "fits",
            "compile s",
        )
    ]
    for p in plan.programs:
        fits = "-" if plan.usable_bytes is None else ("yes" if p.device0_bytes <= plan.usable_bytes else "NO")
        rows.append(
            (
                p.name,
                str(p.devices),
                p.mesh,
                _gib(p.argument_bytes),
                _gib(p.output_bytes),
                _gib(p.temp_bytes),
                _gib(p.program_bytes),
                _gib(p.resident_bytes),
                _gib(p.device0_bytes),
                fits,
                f"{p.compile_seconds:.1f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(f"compiled for: {plan.device}; usable per device: {_gib(plan.usable_bytes)}")
    merged = f" and {plan.host_merged} merged model(s) on the host" if plan.host_merged else ""
    lines.append(
        f"host: {_gib(plan.host_bytes)}: the sources' checkpoints{merged} ({_gib(plan.model_bytes)} per model)"
    )
    if plan.usable_bytes is not None and (plan.largest_batch, plan.largest_batch_elsewhere) != (None, None):
        limit = lambda b: "not limited by the batch" if b is None else str(b)  # noqa: E731
        elsewhere = plan.largest_batch_elsewhere
        line = f"eval_batch_size: {plan.eval_batch_size}; largest that fits (path_scores/search): "
        line += limit(plan.largest_batch) + " on device 0"
        if elsewhere is not None:
            line += f", {limit(elsewhere)} on the other devices"
        lines.append(line)
    lines.append("fits" if plan.fits else f"DOES NOT FIT: {plan.error_message()}")
    return "\n".join(lines)
