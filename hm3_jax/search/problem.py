"""The merging problem HM3 solves: a base model, K experts, task objectives on two splits, the ideal point.

A `Problem` is what every stage of the end-to-end run (HM3, its ablations and every baseline) sees, so all
methods merge the same models and are scored on the same data:

* `objectives["search"]` (70% of each task) is all any search may look at;
* `objectives["heldout"]` (the other 30%) is used only for reported numbers.

Scores are raw task scores in [0, 100], maximised. They are normalised per task by the ideal point
z*_k = the best score any source model (base or expert) reaches on task k on the same split (HM3_SPEC,
"Objectives and preferences"), so that f_k / z*_k is about 1 for the expert of task k.

Path evaluation goes through one `hm3_jax.paths` engine per split; a merged model's pool holds
`[expert_1 blocks, ..., expert_K blocks, merged blocks]` (`pool_for`: pool index m * L + l, m = K the merged
model; stacked for small models, the models' own parts above `SCORE_POOL_COPY_MAX_BYTES`) and its shell (embeddings, final norm, head) is the merged model's, as in HM3_SPEC.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging

from hm3_jax import models
from hm3_jax.paths import engine as engine_lib
from hm3_jax.tasks import tiny3_zoo

SPLITS = ("search", "heldout")
# Splits whose engines keep per-example statistics of every model they score (`PathEngine.keep_example_stats`):
# the held-out bootstrap and the confirmation's significance test on the whole search split resample them.
KEEP_EXAMPLE_STATS = ("heldout", "search_full")
# Floor of the ideal point (scores are in [0, 100]): a task no source solves at all is normalised by this.
MIN_IDEAL = 1.0


class Problem(NamedTuple):
    """Everything a merging method may use.

    Attributes:
      config: the shared ModelConfig.
      tasks: objective names (K of them; expert k is fine-tuned for objective k). On the built-in zoos every
        objective is one task; a spec's objective is the mean of its tasks' scores (`task_names`, `groups`).
      base: base params.
      experts: K expert params (expert k fine-tuned on task k).
      objectives: {split: [Objective] * T}, one per task (T = K on the built-in zoos).
      source_scores: {split: [K + 1, K]} raw scores of the base (row 0) and experts (rows 1..K).
      ideal: {split: [K]} best source score per task (the normalisation constants).
      engines: {split: PathEngine} (shared compiled code and caches).
      task_names: the T task names of `objectives` (None: the same as `tasks`).
      groups: per task the index of its objective in `tasks` (None: task k is objective k); the engines
        return objective scores (means over each objective's tasks).
      eos_ids: the language model's end-of-sequence ids (() for image zoos or when unknown).
    """

    config: Any
    tasks: tuple[str, ...]
    base: dict
    experts: list
    objectives: dict
    source_scores: dict
    ideal: dict
    engines: dict
    task_names: tuple | None = None
    groups: tuple | None = None
    eos_ids: tuple = ()

    @property
    def num_tasks(self) -> int:
        """K, the number of objectives (score columns)."""
        return len(self.tasks)

    def task_weights(self, objective_weights) -> np.ndarray:
        """[T] per-task weights w = G v (G the engines' averaging matrix `group_matrix`: w_t = v_g / |tasks of g|
        for g the task's objective), so that `sum_t w_t score_t = sum_g v_g * mean of g's task scores`."""
        v = np.asarray(objective_weights, np.float64)
        return v if self.groups is None else engine_lib.group_matrix(self.groups, len(self.groups)) @ v

    @property
    def num_sources(self) -> int:
        """K experts + 1 merged model."""
        return len(self.experts) + 1

    def objective_scores(self, task_scores) -> np.ndarray:
        """Task scores [..., T] -> objective scores [..., K] (each objective the mean of its tasks' scores)."""
        x = np.asarray(task_scores, np.float64)
        if self.groups is None:
            return x
        return x @ engine_lib.group_matrix(self.groups, len(self.groups))

    def normalise(self, scores, split: str) -> np.ndarray:
        """Raw scores [..., K] -> scores divided by the ideal point of `split`."""
        return np.asarray(scores, np.float64) / self.ideal[split]


def full_search_cost(problem: Problem) -> int:
    """Path evaluations charged for scoring one path on the whole search split ("search_full") instead of the
    capped one: ceil(examples of the whole split / examples of the capped split), over all tasks."""
    n_full = sum(o.num_examples for o in problem.objectives["search_full"])
    n_sub = sum(o.num_examples for o in problem.objectives["search"])
    return int(-(-n_full // n_sub))


def confirm_params(problem: Problem, candidates, top: int, rebuild, score_full, fitness) -> dict | None:
    """The `top` best distinct parameter-space candidates by their search-subset fitness, re-scored on the
    WHOLE search split; the best there is the answer (as `arch.confirm_top` does for paths: choosing the
    maximum of many noisy scores on a capped split is biased upward, the winner's curse).

    Args:
      candidates: [(subset_fitness, key, payload)]: higher fitness is better; `key` (a string) identifies a
        candidate (its first, best-fitness occurrence is kept); `payload` is returned for the chosen one.
      top: M, candidates re-scored; rebuild: payload -> params (a pure function: the same params each call);
        score_full: params -> raw scores [K] on the whole search split; fitness: normalised whole-split scores
        [K] -> fitness (higher is better).
    Returns: None when the search split is not capped (no "search_full" engine), top < 1 or no candidates;
      else {"payload", "params" (the chosen candidate's, as rebuilt: one candidate is held at a time, so a chosen
      one that was not re-scored last is rebuilt once more at the end), "chosen" (index into the re-scored
      ones), "subset_fitness", "full_fitness", "full_scores" (raw), "charged_evaluations" (re-scored x
      `full_search_cost`)}.
    """
    if top < 1 or not candidates or "search_full" not in problem.engines:
        return None
    order = sorted(range(len(candidates)), key=lambda i: -float(candidates[i][0]))  # stable: earlier first
    chosen_rows, seen = [], set()
    for i in order:
        if candidates[i][1] not in seen:
            seen.add(candidates[i][1])
            chosen_rows.append(i)
        if len(chosen_rows) == top:
            break
    full, full_fit, best, params = [], [], 0, None
    for r, i in enumerate(chosen_rows):
        params = None  # the last candidate goes before the next is built: one model held at a time
        params = rebuild(candidates[i][2])
        full.append(np.asarray(score_full(params), np.float64))
        full_fit.append(float(fitness(problem.normalise(full[-1], "search_full"))))
        if full_fit[-1] > full_fit[best]:  # the first of equal ones, as argmax
            best = r
    if best != len(chosen_rows) - 1:  # the chosen one was released: built again (a merge is a pure function)
        params = None
        params = rebuild(candidates[chosen_rows[best]][2])
    return {
        "payload": candidates[chosen_rows[best]][2],
        "params": params,
        "chosen": best,
        "subset_fitness": [float(candidates[i][0]) for i in chosen_rows],
        "full_fitness": full_fit,
        "full_scores": [f.tolist() for f in full],
        "charged_evaluations": int(len(chosen_rows) * full_search_cost(problem)),
    }


def uses_parts(experts: list) -> bool:
    """Whether pools over these experts are parted (`models.make_parted_pool`: the sources' own blocks, no copy)
    rather than stacked copies: when the experts' blocks take more than `SCORE_POOL_COPY_MAX_BYTES`. Small
    models (every tiny run and test) keep stacked pools and the programs compiled for them."""
    leaves = [x for e in experts for x in jax.tree.leaves(e["blocks"])]  # arrays or ShapeDtypeStructs (plans)
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves) > SCORE_POOL_COPY_MAX_BYTES


def pool_for(problem_or_experts, merged: dict | None) -> dict | tuple:
    """Block pool of the experts, plus the merged model's blocks as source K when given: stacked (a copy) for
    small models, parted (the models' own block arrays, no copy) when `uses_parts`."""
    experts = problem_or_experts.experts if isinstance(problem_or_experts, Problem) else problem_or_experts
    blocks = [e["blocks"] for e in experts] + ([] if merged is None else [merged["blocks"]])
    return models.make_parted_pool(blocks) if uses_parts(experts) else models.make_pool(blocks)


def make_problem(
    zoo,
    engine_strategy: str = "map",
    chunk_size: int = 8,
    prefix_sharing: bool = True,
    search_examples: int | None = None,
    mesh=None,
    source_scores: dict | None = None,
    single_path_chunks: bool = True,
) -> Problem:
    """Builds the Problem of a loaded zoo (`hm3_jax.tasks.zoo.Zoo`).

    `search_examples` caps the examples per task that searches are scored on (the first ones of the zoo's
    shuffled search split; None = all of it); the whole search split is then kept as split "search_full"
    (objectives, engine, source scores, ideal), for confirming a search's final candidates. Path evaluation
    is the inner loop of every search and costs in proportion to it; the held-out split is always used whole.

    Source scores are computed with the path engine on each source's identity path, so the numbers every
    method is compared with come from the same code path as the searched paths.

    `mesh` (a `hm3_jax.distributed.make_mesh` Mesh, or None): when given, both engines use strategy "shard" on
    it (paths over "paths", the examples of each batch over "data"; see hm3_jax/paths/sharded.py) instead of
    `engine_strategy`; the scores are the same as without a mesh.

    `source_scores`: {split: [K + 1, K]} the sources' scores computed earlier for this zoo and these settings
    (a run stores them as a stage), used instead of re-scoring the sources; every split must be given.

    `single_path_chunks`: `PathEngine.use_single_path_chunks` of every engine (the same scores either way).
    """
    config = zoo.base.config
    tasks = tuple(zoo.tasks)
    base = zoo.base.params
    experts = [zoo.experts[t].params for t in tasks]
    # A spec zoo scores tasks and groups them into objectives; a built-in zoo's tasks are its objectives.
    task_groups = getattr(zoo, "groups", None)
    task_names = tuple(task_groups) if task_groups is not None else tasks
    groups = None if task_groups is None else tuple(tasks.index(task_groups[t]) for t in task_names)
    objectives = {split: [zoo.objectives[split][t] for t in task_names] for split in SPLITS}
    if search_examples:
        objectives["search"] = capped_search_objectives(zoo, task_names, search_examples)
        # The whole search split too: a search may confirm its few best candidates on it (arch.confirm_top).
        objectives["search_full"] = [zoo.objectives["search"][t] for t in task_names]
    pool = pool_for(experts, base)  # experts then base: every source is one identity path over this pool
    shell = models.shell_of(base)
    if mesh is not None:  # placed once, shared by every split's engine; the unplaced pool is dropped
        shell, pool = engine_lib.place_model(shell, pool, mesh)
    engines = make_engines(
        config, shell, pool, objectives, engine_strategy, chunk_size, prefix_sharing, mesh, groups
    )
    for split in KEEP_EXAMPLE_STATS:  # what paired bootstraps resample, kept when scored (never re-run)
        if split in engines:
            engines[split].keep_example_stats()
    for engine in engines.values():
        engine.use_single_path_chunks(single_path_chunks)
    if source_scores is not None:
        given = {k: np.asarray(v, np.float64) for k, v in source_scores.items()}
        shape = (len(experts) + 1, len(tasks))
        if set(given) != set(objectives) or any(v.shape != shape for v in given.values()):
            raise ValueError(
                f"source_scores must give a {shape} array for each split {sorted(objectives)}, got "
                f"{ {k: v.shape for k, v in given.items()} }"
            )
        source_scores = {split: given[split] for split in objectives}
    else:
        source_scores = {
            split: np.stack([score_params(engines[split], experts, p) for p in [base, *experts]])
            for split in objectives
        }
    ideal = {}
    for split in objectives:
        best = source_scores[split].max(axis=0)
        if np.any(best < MIN_IDEAL):
            bad = [t for t, b in zip(tasks, best, strict=True) if b < MIN_IDEAL]
            logging.warning(
                "no source model reaches %.1f on task(s) %s (%s split); normalising those by %.1f",
                MIN_IDEAL,
                bad,
                split,
                MIN_IDEAL,
            )
        ideal[split] = np.maximum(best, MIN_IDEAL)
    return Problem(
        config,
        tasks,
        base,
        experts,
        objectives,
        source_scores,
        ideal,
        engines,
        task_names,
        groups,
        _eos_ids(zoo),
    )


def _eos_ids(zoo) -> tuple:
    """A spec zoo's `eos_ids`, else its tokenizer's EOS id, else ()."""
    if getattr(zoo, "eos_ids", None):
        return tuple(int(e) for e in zoo.eos_ids)
    eos = getattr(getattr(zoo, "tokenizer", None), "eos_token_id", None)
    return () if eos is None else (int(eos),)


def make_engines(
    config,
    shell,
    pool,
    objectives: dict,
    engine_strategy: str = "map",
    chunk_size: int = 8,
    prefix_sharing: bool = True,
    mesh=None,
    groups=None,
    pool_id: str = "sources",
) -> dict:
    """{split: PathEngine} over one shell and pool for `objectives` ({split: [Objective]}): strategy "shard" on
    `mesh` when one is given, else `engine_strategy` (see `make_problem`); `groups` as `Problem.groups`. The
    shell and pool may be abstract (`jax.ShapeDtypeStruct`s) for a memory plan (`memory_plan`)."""
    return {
        split: engine_lib.make_engine(
            config,
            shell,
            pool,
            objs,
            strategy="shard" if mesh is not None else engine_strategy,
            chunk_size=chunk_size,
            prefix_sharing=prefix_sharing,
            pool_id=pool_id,
            mesh=mesh,
            groups=groups,
        )
        for split, objs in objectives.items()
    }


def capped_search_objectives(zoo, tasks, search_examples: int) -> list:
    """Per task (in `tasks` order) the objective of the first `search_examples` examples of the zoo's shuffled
    search split, batch min(eval_batch_size, search_examples): the "search" split of a capped Problem."""
    if search_examples < 1:
        raise ValueError(f"search_examples must be >= 1, got {search_examples}")
    if hasattr(zoo, "capped_search_objectives"):  # a spec zoo: its own tokenisation and shapes
        objs = zoo.capped_search_objectives(search_examples)
        return [objs[t] for t in tasks]
    if zoo.manifest.get("kind", "tiny3") != "tiny3":
        raise ValueError(
            f"engine.search_examples={search_examples} is supported for the text zoo (tiny3) only; this zoo "
            f"is {zoo.manifest.get('kind')!r}: set engine.search_examples = 0 (the whole search split)"
        )
    subset = {t: {"search": zoo.data[t]["search"][:search_examples]} for t in tasks}
    cfg = zoo.manifest["config"]
    objs = tiny3_zoo.make_objectives(
        subset,
        zoo.tokenizer,
        min(cfg["eval_batch_size"], search_examples),
        cfg["seq_len"],
        splits=("search",),
    )
    return [objs["search"][t] for t in tasks]


def place_own_part(engine, shell: dict, pool: tuple, num_experts: int) -> tuple[dict, tuple]:
    """(shell, pool) of a parted pool `experts + [model]` placed on `engine`'s mesh, reusing the experts' parts
    `engine.pool` already holds placed (the sources' pool that `make_problem` placed: its first K parts) and
    placing only the shell and the model's own part."""
    shell, own = engine_lib.place_model(shell, pool[num_experts:], engine.mesh)
    return shell, tuple(engine.pool[:num_experts]) + tuple(own)


def reuse_placed_parts(engine, shell: dict, pool, num_experts: int) -> tuple:
    """(shell, pool) for `engine.with_model`: on a mesh (strategy "shard", `engine`'s pool parted, its first K parts
    the experts' placed ones) a parted pool `experts + [model]` reads those placed parts, and only its shell and
    own part are placed (`place_own_part`), not a placed copy of every part (K more parts' shards on every
    device); anything else unchanged (the engine places it when it first runs on a mesh)."""
    if models.is_parted(pool) and engine.strategy == "shard" and models.is_parted(engine.pool):
        return place_own_part(engine, shell, pool, num_experts)
    return shell, pool


# Above this many bytes of the experts' blocks, pools are parted (`uses_parts`): the sources' own block arrays
# instead of a stacked copy (a module constant: tests lower it to run parted pools on tiny models).
SCORE_POOL_COPY_MAX_BYTES = 2**28


def score_params(engine, experts: list, params: dict) -> np.ndarray:
    """Raw scores [K] of one parameter-space model through `engine`: its identity path with its own shell.

    The path `K * L + arange(L)` over the pool `experts + [params]` (`pool_for`: source K is the model). For
    large models that pool is parted, the experts' and the model's own block arrays (no K + 1-model copy per
    call: 2.7 GiB at Qwen2.5-0.5B's shapes), and has the shapes of the sources' parted pool, so the engine's
    programs compiled for it serve. On a mesh ("shard") with a parted pool, `engine`'s first K parts must be the
    experts' (placed): every engine `make_problem` builds (`reuse_placed_parts`). `params` may be host arrays (a
    run on a mesh: the merges return host arrays there), placed sharded here, never whole on device 0. The engine caches by a hash of the shell and pool bytes.
    """
    K, L = len(experts), models.pool_size(params["blocks"])
    shell, pool = reuse_placed_parts(engine, models.shell_of(params), pool_for(experts, params), K)
    eng = engine.with_model(shell, pool)
    return eng.evaluate((K * L + np.arange(L, dtype=np.int32))[None]).scores[0]
