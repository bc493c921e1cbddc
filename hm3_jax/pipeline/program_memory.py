"""The device programs of an HM3 run compiled with abstract inputs, and the bytes each needs
(`compiled.memory_analysis()` per device; see `memory_plan`, which puts them together into a plan).

    program bytes = arguments + outputs + temporaries - aliased (donated buffers counted once)

plus, on device 0, the run's resident arrays that are not the program's arguments (the sources and their pool,
`sources_device0_bytes`; beside a scored model `model_score_resident`) and the preferences' merged models it holds
(`held_preference_bytes`).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax import distributed, models
from hm3_jax.merging import traced
from hm3_jax.merging.groups import is_stacked, path_name
from hm3_jax.models.layers import accelerator_dots
from hm3_jax.paths.engine import DECODE_METRICS
from hm3_jax.pipeline.baseline_runs import JUNCTION_PATH_METHODS
from hm3_jax.pipeline.preference_models import resident_preferences
from hm3_jax.search.problem import make_engines, uses_parts


class ProgramMemory(NamedTuple):
    """Bytes of one compiled program (from `compiled.memory_analysis()`, per device) and where it runs.

    Attributes: name; devices: how many devices run it (each holds these bytes); mesh: "paths:2,data:1,model:4"
    or "device 0"; argument_bytes, output_bytes, temp_bytes, alias_bytes: per device; resident_bytes: what the
    run keeps on device 0 besides the program's arguments; compile_seconds: lowering + compilation time here.
    """

    name: str
    devices: int
    mesh: str
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    resident_bytes: int
    compile_seconds: float

    @property
    def program_bytes(self) -> int:
        """Per device: arguments + outputs + temporaries - aliased."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

    @property
    def device0_bytes(self) -> int:
        """On device 0: the program's bytes plus the run's resident arrays."""
        return self.program_bytes + self.resident_bytes


def abstract_params(config, dtype) -> dict:
    """ShapeDtypeStructs of a model's params (`models.init`'s tree) with every floating leaf in `dtype`."""
    tree = jax.eval_shape(lambda k: models.init(config, k), jax.random.PRNGKey(0))
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype),
        tree,
    )


def parted(params, num_experts: int) -> bool:
    """Whether the run's pools are parted (`problem.uses_parts` of K experts shaped like `params`)."""
    return uses_parts([params] * num_experts)


def abstract_pool(params, num_experts: int) -> dict | tuple:
    """The abstract pool of the K + 1 sources' blocks (`problem.pool_for`): `params["blocks"]` leaves
    `[L, ...]` -> `[(K + 1) L, ...]` ShapeDtypeStructs, or K + 1 parts `[L, ...]` when `parted`."""
    if parted(params, num_experts):
        return (params["blocks"],) * (num_experts + 1)
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(((num_experts + 1) * x.shape[0],) + x.shape[1:], x.dtype),
        params["blocks"],
    )


def tree_bytes(tree) -> int:
    """Sum of the leaves' bytes (arrays or ShapeDtypeStructs)."""
    return int(
        sum(np.prod(x.shape, dtype=np.int64) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
    )


def pool_copy_bytes(params, num_experts: int, sharded: bool) -> int:
    """Bytes a pool of the K + 1 sources' blocks adds to the sources on device 0: the stacked copy, or nothing for
    a parted pool (its parts are the sources' own blocks; each distinct part counted once) unless a mesh
    places copies of them (then the caller counts the placed shards)."""
    if parted(params, num_experts) and not sharded:
        return 0
    return (num_experts + 1) * tree_bytes(params["blocks"])


def sources_device0_bytes(params, num_experts: int, mesh=None) -> tuple[int, int]:
    """(sources, sources' pool) bytes the run keeps on device 0 besides a program's arguments.

    One device: the K + 1 sources as `load_pretrained` placed them and the pool's copy of their blocks
    (`pool_copy_bytes`: none when parted). On a mesh (`run.setup` loads the sources as host arrays,
    `spec_zoo.load(on_host=True)`): no sources, and the shards of the sources' shell and pool that
    `make_problem` placed (`placed_bytes`; a parted pool's parts are placed copies of the host blocks too).
    """
    if mesh is None:
        return (num_experts + 1) * tree_bytes(params), pool_copy_bytes(params, num_experts, sharded=False)
    return 0, placed_bytes(models.shell_of(params), abstract_pool(params, num_experts), mesh)


def held_preferences(run_config) -> int:
    """How many preferences' merged models a run holds at once: `memory.resident_preferences`, 0 = all
    (`preferences.num`); hm3_jax/pipeline/preference_models.py."""
    num, resident = int(run_config.preferences.num), resident_preferences(run_config)
    return min(resident, num) if resident > 0 else num


def host_merged_models(run_config, mesh=None) -> int:
    """How many merged models a run holds as host arrays at once, beside its K + 1 sources (which a run on a mesh
    loads as host arrays). One device: none (its merges are device arrays, counted on device 0). On a mesh every
    merge returns host arrays (`merging.host_leaves`); in one process the model being merged and scored, one:
    the parameter level's (one at a time), a preference's model until `PreferenceModels` has placed its shards
    and dropped it (the held preferences are those shards), the bootstrap's re-run, an export. On several
    processes the held preferences' pools stay host arrays (read locally by alignment and export), so they count
    too (`held_preferences`, built while all are held)."""
    if mesh is None:
        return 0
    return 1 if jax.process_count() == 1 else held_preferences(run_config) + 1


def held_preference_bytes(program: str, run_config, config, num_experts: int, dtype, mesh=None) -> int:
    """Device-0 bytes of the preferences' merged models (`preference_models.PreferenceModels`: per held preference
    a shell and a pool of the K + 1 sources' blocks) that `program` does not take as its argument.

    During the architecture level a path program's argument is one preference's shell and pool: the other held
    ones (`held_preferences - 1`) and the sources' own shell and pool (the split engines', which the program then
    does not read) are resident beside it. The held-out bootstrap's model programs and the merges run while all
    held preferences are kept. On a mesh in one process each held preference's shell and pool are placed
    sharded like the engine's (`preference_models`): per device its share of them (`placed_bytes`), and a parted
    preference pool's expert parts are the sources' placed parts, so beside it are only the sources' shell and
    base part; on several processes they stay whole on device 0.
    """
    params = abstract_params(config, dtype)
    shell = models.shell_of(params)
    pool = abstract_pool(params, num_experts)
    is_parted = parted(params, num_experts)
    # A parted pool adds Theta's own blocks only: its expert parts are the sources' (on a mesh, their placed parts).
    own = (params["blocks"],) if is_parted else pool
    if mesh is not None and jax.process_count() == 1:
        one = placed_bytes(shell, own, mesh)
        sources_pool = placed_bytes(shell, (params["blocks"],) if is_parted else pool, mesh)
    elif mesh is not None:
        one, sources_pool = tree_bytes(shell) + tree_bytes(own), placed_bytes(shell, pool, mesh)
    elif is_parted:  # the sources' pool is their own arrays (counted with the sources)
        one, sources_pool = tree_bytes(shell) + tree_bytes(own), 0
    else:
        one, sources_pool = tree_bytes(pool) + tree_bytes(shell), tree_bytes(pool)
    held = held_preferences(run_config)
    if program.startswith("path_scores"):
        return (held - 1) * one + sources_pool
    return held * one


def placed_bytes(shell, pool, mesh) -> int:
    """Bytes per device of (shell, pool) placed as strategy "shard" places them (`engine.place_model`: tensor
    parallel over "model"): each leaf's shard shape under `distributed.model_sharding`."""
    shardings = distributed.model_sharding(shell, pool, mesh)
    return sum(
        int(np.prod(sh.shard_shape(tuple(x.shape)))) * np.dtype(x.dtype).itemsize
        for x, sh in zip(jax.tree.leaves((shell, pool)), jax.tree.leaves(shardings), strict=True)
    )


def add_held(programs, run_config, config, num_experts: int, dtype, mesh) -> list[ProgramMemory]:
    """`programs` with the preferences' merged models added to their resident bytes (`held_preference_bytes`)."""
    return [
        p._replace(
            resident_bytes=p.resident_bytes
            + held_preference_bytes(p.name, run_config, config, num_experts, dtype, mesh)
        )
        for p in programs
    ]


def compile_memory(name, lowered_fn, devices: int, mesh: str, resident: int) -> ProgramMemory:
    """Compiles `lowered_fn()` (a `jax.stages.Lowered`) and reads its memory analysis; traced with
    `layers.accelerator_dots` (bf16 dots as on a TPU/GPU, not XLA:CPU's f32 copies of the weights)."""
    start = time.perf_counter()
    with accelerator_dots():  # bf16 dots as an accelerator runs them (XLA:CPU would widen the weights to f32)
        stats = lowered_fn().compile().memory_analysis()
    return ProgramMemory(
        name,
        devices,
        mesh,
        int(stats.argument_size_in_bytes),
        int(stats.output_size_in_bytes),
        int(stats.temp_size_in_bytes),
        int(stats.alias_size_in_bytes),
        int(resident),
        time.perf_counter() - start,
    )


def mesh_name(mesh) -> str:
    if mesh is None:
        return "device 0"
    return ",".join(f"{a}:{n}" for a, n in dict(mesh.shape).items())


SPLITS = ("search", "search_full", "heldout")  # the path engines of a run (problem.make_problem)


def engine_programs(
    config, num_experts: int, dtype, objectives: dict, run_config, mesh, groups, splits=SPLITS
) -> list[ProgramMemory]:
    """``path_scores/<split>`` (and ``.../tree``; for the path baselines' junction rows ``.../junction``,
    `path_variants`) of the engines `problem.make_engines` builds over the K + 1 sources' pool, compiled with
    abstract inputs."""
    params = abstract_params(config, dtype)
    shell = models.shell_of(params)
    pool = abstract_pool(params, num_experts)
    eng = run_config.engine
    planned = {s: objectives[s] for s in splits if s in objectives}  # "search_full" only with a capped search
    engines = make_engines(
        config,
        shell,
        pool,
        planned,
        eng.strategy,
        eng.chunk_size,
        eng.prefix_sharing,
        mesh,
        groups,
        pool_id="plan",
    )
    t_max = int(run_config.arch.rl.t_max)
    sharded = mesh is not None
    sources = sources_device0_bytes(params, num_experts, mesh)[0]  # 0 on a mesh: host arrays
    if parted(params, num_experts) and not sharded:  # the argument's expert parts are the sources' blocks
        sources -= num_experts * tree_bytes(params["blocks"])
    resident = sources  # beside it the sources' pool and the held preferences (`held_preference_bytes`)
    devices = mesh.size if sharded else 1
    out = []
    for split, engine in engines.items():
        for suffix, junction in path_variants(run_config):
            out.append(
                compile_memory(
                    f"path_scores/{split}{suffix}",
                    lambda e=engine, j=junction: e.lower_plain(t_max, j),
                    devices,
                    mesh_name(mesh),
                    resident,
                )
            )
            if engine.lower_tree(t_max) is not None:
                out.append(
                    compile_memory(
                        f"path_scores/{split}/tree{suffix}",
                        lambda e=engine, j=junction: e.lower_tree(t_max, j),
                        1,
                        "device 0",
                        resident,
                    )
                )
    return out


def path_variants(run_config) -> list[tuple[str, bool]]:
    """(name suffix, with junction rows) of the path programs a run compiles per split: HM3's architecture level
    and the no-parameter-level ablation pass junction rows only with `arch.alignment` ("moment"), and the
    ablation's engines are the split engines `with_model` of a shell and pool shaped as HM3's
    (`arch_level.no_param_level_model`: the experts' averaged shell, expert 0 again in the last source slot), so
    its programs are HM3's (tests/test_plan_rows.py). The path baselines run on that model too, but EA, MOEA and
    DE (`baseline_runs.JUNCTION_PATH_METHODS`) always pass junction rows (their DFS scale genes): without
    alignment that program is another row, ``path_scores/<split>/junction``."""
    hm3 = run_config.arch.alignment != "none"
    methods = (run_config.get("baselines") or {}).get("path_methods", ())
    baseline = any(m in JUNCTION_PATH_METHODS for m in methods)
    return [("", hm3)] + ([("/junction", True)] if baseline and not hm3 else [])


def merge_program(config, num_experts: int, dtype, mesh=None) -> ProgramMemory:
    """``merge``: the tuned parameter level's merge (`merging.traced.dare_ties_traced`) on device 0. It streams tensor
    by tensor (shell leaves, and stacked leaves block by block; `merging.traced.dare_ties_leaf`): planned is the
    largest tensor's program, with the rest of the sources (on one device; on a mesh they are host arrays), the
    sources' pool (on a mesh device 0's shard of it, `sources_device0_bytes`) and, on one device, the merged model
    being assembled (at most one model) resident. On a mesh each merged tensor goes to the host as it is made
    (`merging.host_leaves`: the sources are host arrays) and is placed sharded where it is scored, so no merged
    model is resident."""
    params = abstract_params(config, dtype)
    tensors = [  # what dare_ties_leaf is called on: shell leaves whole, stacked leaves one block at a time
        jax.ShapeDtypeStruct(x.shape[1:], x.dtype) if is_stacked(path_name(p)) else x
        for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
    ]
    leaf = max(tensors, key=lambda x: int(np.prod(x.shape)) * x.dtype.itemsize)
    f32 = jax.ShapeDtypeStruct((), jnp.float32)
    args = (
        False,
        jax.ShapeDtypeStruct((2,), jnp.uint32),
        leaf,
        [leaf] * num_experts,
        jax.ShapeDtypeStruct((num_experts,), jnp.float32),
        f32,
        f32,
        f32,
        f32,
    )
    model = tree_bytes(params) if mesh is None else 0  # on a mesh the merged tensors are on the host
    leaf_args = (num_experts + 1) * tree_bytes(leaf)
    sources, pool = sources_device0_bytes(params, num_experts, mesh)
    resident = max(sources - leaf_args, 0) + pool + model  # on a mesh the leaves come from the host
    return compile_memory("merge", lambda: traced.dare_ties_leaf.lower(*args), 1, "device 0", resident)


def model_score_resident(params, num_experts: int, mesh=None) -> int:
    """Device-0 bytes beside a scored model's program (`model_score_programs`; the held preferences apart,
    `held_preference_bytes`). The argument is the model's shell and the pool `experts + [model]`.

    One device: the K + 1 sources as loaded, less the K expert parts of a parted pool (the argument's own), plus
    the sources' stacked pool and, beside a stacked pool's copy of them, the model's own blocks. A mesh (sources
    and merged models on the host): the sources' placed shell and base part (a parted pool's expert parts are
    the argument's), or, stacked, the sources' whole placed shell and pool and the scored pool's copy, which
    `models.make_pool` makes on device 0 before it is placed.
    """
    shell, blocks, pool = models.shell_of(params), params["blocks"], abstract_pool(params, num_experts)
    is_parted = parted(params, num_experts)
    if mesh is not None:
        return (
            placed_bytes(shell, (blocks,), mesh)
            if is_parted
            else placed_bytes(shell, pool, mesh) + tree_bytes(pool)
        )
    sources = (num_experts + 1) * tree_bytes(params)
    if is_parted:
        return sources - num_experts * tree_bytes(blocks)
    return sources + tree_bytes(pool) + tree_bytes(blocks)


def model_score_programs(
    config, num_experts: int, dtype, objectives: list, run_config, mesh=None
) -> list[ProgramMemory]:
    """``model_scores/<task>``: one model's score as the run computes it (`problem.score_params`, the held-out
    bootstrap: the identity path of source K, T = L steps, over the pool `experts + [model]` through the split's
    engine; on a mesh strategy "shard", the model's shell and own part placed with the engine's shardings by
    `problem.place_own_part`, so its matrices are split over "model" like the pool's), per distinct objective
    shape: the engine's program for one chunk of paths (`PathEngine.lower_plain`, or `lower_tree` for the
    teacher-forced objectives of a one-device prefix tree) over that objective alone. The run scores every task
    of a split in one program, whose temporaries are its largest task's (XLA reuses them across the objectives'
    sequential maps). Resident: `model_score_resident`."""
    params = abstract_params(config, dtype)
    shell, pool = models.shell_of(params), abstract_pool(params, num_experts)
    eng, L = run_config.engine, config.num_layers
    resident = model_score_resident(params, num_experts, mesh)
    seen, out = set(), []
    for obj in objectives:
        kind = "decode" if obj.metric in DECODE_METRICS else obj.metric  # one program for every decode metric
        shapes = (kind, obj.kernel, str(jax.tree.map(np.shape, obj.arrays.tree)))
        if shapes in seen:
            continue
        seen.add(shapes)
        engine = make_engines(
            config, shell, pool, {"heldout": [obj]}, eng.strategy, eng.chunk_size, eng.prefix_sharing, mesh,
            pool_id="plan",
        )["heldout"]  # fmt: skip
        tree = engine.lower_tree(L)
        task = obj.name.rsplit("/", 1)[0]
        out.append(
            compile_memory(
                f"model_scores/{task}",
                (lambda t=tree: t) if tree is not None else (lambda e=engine: e.lower_plain(L)),
                mesh.size if mesh is not None else 1,
                mesh_name(mesh),
                resident,
            )
        )
    return out
