"""HM3's lower level: the layer-path search for every preference, with one preference-conditioned policy.

For preference lambda_i the pool is `experts' blocks + Theta(lambda_i)'s blocks` (source K) and the shell is
Theta(lambda_i)'s (HM3_SPEC "Architecture space"). `PathScorer` is the host score function the RL calls: it
sends each path to the engine of its preference's pool (search split only), optionally with junction
alignment, and returns normalised scores `f_k / z*_k`. It remembers every scored (preference, path) in an
archive that is saved with the RL checkpoints, so a resumed run sees the same archive.

After training, the answer for preference i is the best path under the RL reward `sum_k lambda_k f_k - beta1 T /
T_max` on the search split among the policy's greedy decode for lambda_i, every source's identity path
(Theta(lambda_i) alone is one of them: the lower level starts from the upper level's answer, as in HM3's hierarchy)
and every path the search scored for lambda_i (the search's own record, as an evolutionary baseline keeps its best
individual). With `arch.neighbourhood_evaluations = B > 0` (or `arch.neighbourhood_evaluations_per_layer = b > 0`: B
= b L, `neighbourhood_budget`) that best path is then refined by a first-order local search (`neighbourhood_search`:
best-improvement hill climbing over single-step edits, at most B new path evaluations per preference, counted in the
budget like every other evaluation). Its moves are source swaps, deletions, repeats, insertions of another source's
block (paths longer than L, as depth up-scaling makes) and neighbouring layers (`arch.neighbourhood_kinds`), scored
with the kinds taking turns and each kind's moves spread over the depth (`arch.neighbourhood_order = "round_robin"`,
`order_moves`), so a budget far smaller than the neighbourhood (16 of 158 moves at L = 16) still tries every kind of
edit. The climb starts from that best path, or from Theta(lambda)'s identity path with `arch.neighbourhood_start =
"theta"` (`neighbourhood_start`). With `arch.confirm_top = M > 0` and a capped search split
(`engine.search_examples`), the M best distinct candidates by search reward, plus Theta(lambda)'s identity path, the
refinement's answer and (`arch.confirm_neighbours = k`) its k best other scored paths (`best_scored`), are re-scored
on the WHOLE search split and the answer is the best of them there: choosing the maximum of hundreds of noisy scores
on 100 examples per task is biased upward (the winner's curse; on tiny3 the chosen path's math score fell from 20 on
the 100 search examples to 12 held-out). Each such evaluation is charged `ceil(n_full / n_sub)` path evaluations in
the budget (the path baselines get the same total). With `arch.confirm_significance = c > 0` a path other than
Theta(lambda)'s identity path is answered only if it beats Theta on a fraction >= c of paired bootstrap resamples of
the whole search split (`significant_gain`): on tiny3 the paths that beat Theta on all 700 search examples by a few
exact-match points mostly lost to it held-out (differences within the noise of 700 examples), so the upper level's
answer stands unless the evidence is clear. Only the final path is scored on the held-out split.
`score_archive.npz` (saved with the RL checkpoints) holds the paths scored during training; `scored_paths.npz`
(search subset) and `scored_paths_full.npz` (whole search split) every path the level scored, the refinement's and
the confirmation's included. With
`arch.distill_steps = s > 0` the trained policy is then fitted onto every preference's answer (behaviour cloning,
`warm_start.distill`: s Adam steps at `arch.distill_learning_rate`, 0: the warm start's rate) and saved under
`workdir/distilled`; its greedy decode per preference is reported ("distilled_greedy_path") and
`pipeline.suggest` decodes new preferences with it.

Ablation "no parameter level": the pool holds the K experts only (the RL's `num_sources = K`); the engine pool
keeps its (K + 1) L shape with a copy of expert 0 in the unused last slot (never selectable), and the shell is
the plain average of the experts' shells (a path needs one embedding and head; we take the least informed one).

On a device mesh (issue 7) the PPO loop is the split one (`loop.run_training(score_mode="split")`: jitted
rollout -> `PathScorer` on the host -> jitted update) whenever the search engine's mesh has more than one device
(`score_mode_for`): the engine's SPMD program is then never launched from a `pure_callback` of the running PPO
chunk (which intermittently hangs in XLA's collective rendezvous on 8 CPU devices; docs/scaling.md). One device keeps
the faster callback loop; both give the same parameters for the same key.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax import distributed, merging, models
from hm3_jax.arch import descriptors as descriptors_lib
from hm3_jax.arch import loop as loop_lib
from hm3_jax.arch import ppo, scoring
from hm3_jax.arch.config import ArchConfig
from hm3_jax.arch.env import host_reward
from hm3_jax.io import atomic
from hm3_jax.paths import alignment
from hm3_jax.search.neighbourhood import (
    MOVE_KINDS,
    NEIGHBOURHOOD_STREAM,
    best_scored,
    neighbourhood_budget,
    neighbourhood_search,
    neighbourhood_start,
)
from hm3_jax.search.path_confirmation import confirm_candidates, identity_paths, model_spec, path_junction
from hm3_jax.search.path_scorer import PathScorer
from hm3_jax.search.problem import Problem, pool_for, reuse_placed_parts


def arch_config(cfg, num_sources: int, num_layers: int, num_tasks: int) -> ArchConfig:
    """`config.arch.rl` (ml_collections) -> the static ArchConfig of this pool.

    With a parameter-level model in the pool (`num_sources == K + 1`, source K) the policy is warm-started on
    its identity path (`warm_start.warm_start`, `rl.warm_start_steps` steps): the lower level starts from the upper
    level's answer. Without one (the no-parameter-level ablation, `num_sources == K`) there is nothing to
    start from and the policy starts from its random initialisation. `rl.warm_started_learning_rate` (0 = off):
    PPO's learning rate after a warm start (the cloning itself runs at `rl.learning_rate`), so PPO fine-tunes the
    warm-started policy instead of undoing it.
    """
    rl = dict(cfg.rl)
    merged_source = num_sources - 1 if num_sources > num_tasks else -1
    warm = merged_source >= 0 and rl.get("warm_start_steps", 0) > 0
    tuned_lr = rl.pop("warm_started_learning_rate", 0.0)
    if warm and tuned_lr:  # behaviour cloning at rl.learning_rate, then PPO at the smaller fine-tuning rate
        rl.update(warm_start_learning_rate=rl["learning_rate"], learning_rate=tuned_lr)
    return ArchConfig.from_mapping(
        {
            **rl,
            "num_sources": num_sources,
            "num_layers": num_layers,
            "num_tasks": num_tasks,
            "warm_start_source": merged_source if warm else -1,
        }
    )


# The engine cache identity of `no_param_level_model`: one model under every preference, scored by the
# no-parameter-level ablation and by the path baselines (`pipeline.baseline_runs.ExpertPathEvaluator`) alike.
EXPERT_PATHS_ID = "expert_paths"


def no_param_level_model(problem: Problem) -> tuple[dict, list[dict]]:
    """Shell (plain average of the experts' shells) and padded pool of the 'no parameter level' ablation (also the
    path baselines' model; its engine cache identity is `EXPERT_PATHS_ID`). On a one-process mesh with parted
    pools placed once, as its engines read it, reusing the sources' placed expert parts (`reuse_placed_parts`):
    every engine over it (one per preference, one per split) then reads these arrays instead of placing a copy
    of every part of its own."""
    shell = merging.merge("linear", None, [models.shell_of(e) for e in problem.experts])
    pool = pool_for(problem.experts, problem.experts[0])  # last source slot never selectable
    if jax.process_count() == 1:  # on several processes alignment and export read the pool as a local array
        shell, pool = reuse_placed_parts(problem.engines["search"], shell, pool, len(problem.experts))
    return shell, pool


def make_aligners(problem: Problem, mode: str, shells, pools, calib_ids, calib_mask, shell_source):
    """One `Aligner` per preference (None for mode "none")."""
    if mode == "none":
        return None
    if mode != "moment":
        raise ValueError(f"the end-to-end run supports alignment 'none' or 'moment', got {mode!r}")
    out = []
    for shell, pool in zip(shells, pools, strict=True):
        source_shells = [models.shell_of(e) for e in problem.experts] + [shell]
        stats = alignment.native_stats(problem.config, source_shells, pool, calib_ids, calib_mask)
        out.append(
            alignment.make_aligner(
                "moment",
                problem.config,
                shell,
                pool,
                stats=stats,
                calib_ids=calib_ids,
                calib_mask=calib_mask,
                shell_source=shell_source,
            )
        )
    return out


def score_mode_for(engine, requested: str = "auto") -> str:
    """`loop.run_training`'s `score_mode` for a PathScorer over `engine` (see the module docstring).

    `requested` (`config.arch.score_mode`, default "auto"): "auto" gives `"split"` when `engine` evaluates on a
    mesh of more than one device (or in several processes), else `"callback"`; "split" is always allowed (same
    results, slower on one device); "callback" on a multi-device engine is refused (it would abort in XLA).
    """
    if requested not in ("auto", "callback", "split"):
        raise ValueError(f"arch.score_mode must be 'auto', 'callback' or 'split', got {requested!r}")
    mesh = getattr(engine, "mesh", None)
    sharded = getattr(engine, "strategy", None) == "shard" and mesh is not None and mesh.size > 1
    multi = sharded or jax.process_count() > 1
    if requested == "callback" and multi:
        raise ValueError("arch.score_mode='callback' cannot drive a path engine on several devices/processes")
    if requested == "auto":
        return "split" if multi else "callback"
    return requested


def run_arch_level(
    problem: Problem,
    preferences,
    shells,
    pools,
    base_blocks,
    key,
    cfg,
    workdir: str,
    tag: str,
    num_sources: int,
    aligners_search=None,
    aligners_heldout=None,
    shared_pool_id: str | None = None,
) -> dict:
    """Trains the preference-conditioned policy and returns the chosen path per preference.

    Args:
      problem, preferences [N, K]; shells / pools per preference (the pool's first `num_sources` sources are
        searchable); base_blocks: the base model's blocks (descriptors); key: PRNG key; cfg: `config.arch`;
      workdir: where RL checkpoints, the score archive and metrics go (resumable); tag: cache namespace.
      shared_pool_id: None, or the engine cache identity of the one model every preference's shell and pool
        are (the no-parameter-level ablation): a path scored under one preference answers the others, charged
        to each (`PathScorer`); the same results with less work.
    Returns: JSON-able dict with per-preference paths, search/heldout scores, rewards, curves and costs.
    """
    start = time.perf_counter()
    K, L = problem.num_tasks, problem.config.num_layers
    acfg = arch_config(cfg, num_sources, L, K)
    scorer = PathScorer(problem, "search", preferences, shells, pools, tag, aligners_search, shared_pool_id)
    archive_path = os.path.join(workdir, "score_archive.npz")
    wall_before = scorer.load_archive(archive_path)  # the cost spent before a resume (0 on a fresh run)
    phi = jnp.stack(
        [
            descriptors_lib.block_descriptors(
                models.leading_blocks(p, num_sources * L), base_blocks, num_sources
            )
            for p in pools
        ]
    )  # [N, P, d]
    trainer = ppo.make_trainer(
        acfg, scoring.host_score_fn(scorer, K), phi, jnp.asarray(preferences, jnp.float32)
    )
    curve: list[float] = []
    metrics_path = os.path.join(workdir, "metrics.jsonl")

    def on_metrics(iteration: int, row: dict) -> None:
        curve.append(row.get("episode_return", float("nan")))
        if iteration % cfg.checkpoint_every == 0 or iteration == acfg.num_iterations:
            scorer.save_archive(archive_path, wall_before + time.perf_counter() - start)

    mode = score_mode_for(problem.engines["search"], cfg.get("score_mode", "auto"))
    runner = loop_lib.run_training(
        trainer,
        key,
        acfg.num_iterations,
        checkpoint_dir=os.path.join(workdir, "ckpt"),
        checkpoint_every=cfg.checkpoint_every,
        metrics_fn=on_metrics,
        score_mode=mode,
        host_fn=scorer if mode == "split" else None,
    )
    scorer.save_archive(archive_path, wall_before + time.perf_counter() - start)
    # The reward curve of the whole run (also the iterations before a resume) is rebuilt from metrics.jsonl.
    _append_curve(metrics_path, curve, start_iteration=acfg.num_iterations - len(curve))
    decode = jax.jit(trainer.decode)
    seeds = identity_paths(num_sources, L, acfg.t_max)  # [num_sources, T_max]
    full_scorer = None
    if cfg.get("confirm_top", 0) > 0 and "search_full" in problem.engines:
        full_scorer = PathScorer(
            problem, "search_full", preferences, shells, pools, tag, aligners_search, shared_pool_id
        )
    results = []
    for i, pref in enumerate(np.asarray(preferences, np.float32)):
        path, length = decode(runner.params, jnp.asarray(pref), phi[i])
        greedy = np.asarray(path, np.int32)
        # The greedy decode and every source's own identity path (Theta(lambda) alone among them, so the
        # architecture level never answers worse than the parameter level on the search split) join the
        # candidates the search scored; all are scored into the archive and counted as evaluations.
        scorer(
            np.concatenate([greedy[None], seeds]),
            np.repeat(pref[None], 1 + len(seeds), 0),
            [i] * (1 + len(seeds)),
        )
        cands = [(np.frombuffer(k[1], np.int32), s) for k, s in scorer.archive.items() if k[0] == i]
        lengths = np.array([(p >= 0).sum() for p, _ in cands])
        rewards = host_reward(np.stack([s for _, s in cands]), pref, lengths, acfg.beta1, acfg.t_max)
        best = int(np.argmax(rewards))
        best_path = cands[best][0]
        g_key = greedy.tobytes()
        g_reward = float(rewards[[p.tobytes() for p, _ in cands].index(g_key)])
        start_reward, refined, num_candidates, ls = float(rewards[best]), 0, len(cands), None
        # the refinement's answer (and its best neighbours): always in the confirmation's shortlist
        extra = None
        if neighbourhood_budget(cfg, L) > 0:
            climb_from = neighbourhood_start(cfg, best_path, seeds, num_sources, problem.num_tasks)
            ls = neighbourhood_search(
                lambda paths, pref=pref, i=i: scorer(
                    paths, np.repeat(pref[None], len(paths), 0), [i] * len(paths)
                ),
                climb_from,
                pref,
                num_sources=num_sources,
                num_layers=L,
                t_min=acfg.t_min,
                t_max=acfg.t_max,
                beta1=acfg.beta1,
                budget=neighbourhood_budget(cfg, L),
                known={p.tobytes(): s for p, s in cands},
                kinds=tuple(cfg.get("neighbourhood_kinds", MOVE_KINDS)),
                order=cfg.get("neighbourhood_order", "round_robin"),
                key=jax.random.fold_in(jax.random.fold_in(key, NEIGHBOURHOOD_STREAM), i),
            )
            refined, num_candidates = ls["evaluations"], num_candidates + ls["evaluations"]
            extra = best_scored(ls["scored"], pref, acfg, int(cfg.get("confirm_neighbours", 0)), ls["path"])
            # the better of the search's best and the climb's answer (the climb's when it climbed from the best)
            cands = [(best_path, scorer.archive[(i, best_path.tobytes())]), (ls["path"], ls["scores"])]
            rewards = np.asarray([start_reward, ls["reward"]])
            best = int(rewards[1] >= rewards[0])
            best_path = cands[best][0]
        confirm = None
        if full_scorer is not None:
            aligner = None if aligners_search is None else aligners_search[i]
            confirm = confirm_candidates(
                problem,
                full_scorer,
                i,
                pref,
                scorer,
                num_sources,
                L,
                acfg,
                int(cfg.confirm_top),
                significance=float(cfg.get("confirm_significance", 0.0)),
                spec_fn=lambda path, i=i, a=aligner: model_spec(
                    shells[i], pools[i], path, a, scorer.pool_id(i)
                ),
                num_samples=int(cfg.get("confirm_bootstrap_samples", 1000)),
                seed=int(cfg.get("confirm_seed", 0)) + i,
                sources=bool(cfg.get("confirm_sources", False)),
                extra=extra,
            )
            best_path = np.asarray(confirm["paths"][confirm["chosen"]], np.int32)
            cands = [(best_path, scorer.archive[(i, best_path.tobytes())])]
            rewards, best = (
                np.asarray([host_reward(cands[0][1], pref, (best_path >= 0).sum(), acfg.beta1, acfg.t_max)]),
                0,
            )
        results.append(
            {
                "preference": pref.tolist(),
                "greedy_path": greedy.tolist(),
                "greedy_reward": g_reward,
                "path": best_path.tolist(),
                "search_reward": float(rewards[best]),
                "search": (np.asarray(cands[best][1]) * problem.ideal["search"]).tolist(),
                "num_candidates": num_candidates,
                "pre_refinement_reward": start_reward,
                "neighbourhood_evaluations": refined,
                **(
                    {"neighbourhood": {"moves": ls["moves"], "evaluated": ls["evaluated"]}}
                    if ls is not None
                    else {}
                ),
                **({"confirm": confirm} if confirm is not None else {}),
            }
        )
    if int(cfg.get("distill_steps", 0)) > 0:
        _distill(trainer, runner, results, phi, cfg, os.path.join(workdir, "distilled"), decode)
    heldout = PathScorer(
        problem, "heldout", preferences, shells, pools, tag, aligners_heldout, shared_pool_id
    )
    for i, r in enumerate(results):
        r["heldout"] = heldout.raw(i, np.asarray([r["path"]], np.int32))[0].tolist()
        if aligners_heldout is not None:
            r["junction"] = {k: v.tolist() for k, v in path_junction(aligners_heldout[i], r["path"]).items()}
    with open(metrics_path) as f:
        full_curve = [float(line) for line in f if line.strip()]
    # Every path scored, the refinement's and the confirmation's too (score_archive.npz is the RL's, for a resume)
    wall = wall_before + time.perf_counter() - start
    scorer.save_archive(os.path.join(workdir, "scored_paths.npz"), wall)
    if full_scorer is not None:
        full_scorer.save_archive(os.path.join(workdir, "scored_paths_full.npz"), wall)
    confirm_units = sum(r["confirm"]["charged_evaluations"] for r in results if "confirm" in r)
    return {
        "per_preference": results,
        "reward_curve": full_curve,
        "evaluations": int(len(scorer.archive)) + int(confirm_units),
        "search_evaluations": int(len(scorer.archive)),
        "confirm_charged_evaluations": int(confirm_units),
        "engine_evaluations_this_process": scorer.evaluations,
        "flops": scorer.flops,
        "engine_seconds": scorer.seconds,
        "wall_seconds": wall_before + time.perf_counter() - start,
        "arch_config": {k: getattr(acfg, k) for k in acfg.__dataclass_fields__},
    }


def _distill(trainer, runner, results, phi, cfg, directory: str, decode) -> None:
    """The trained policy fitted onto each preference's chosen path (`Trainer.distill`, `arch.distill_steps` Adam
    steps at `arch.distill_learning_rate`, 0: the warm start's cloning rate), saved under `directory`
    (`pipeline.suggest` decodes new preferences with it); each result gets the distilled policy's greedy decode
    ("distilled_greedy_path")."""
    chosen = np.stack([np.asarray(r["path"], np.int32) for r in results])
    lr = float(cfg.get("distill_learning_rate", 0.0))  # 0: the warm start's rate (`Trainer.distill`)
    params = trainer.distill(runner.params, chosen, int(cfg.distill_steps), lr)
    loop_lib.save_runner(directory, runner.replace(params=params))
    for i, r in enumerate(results):
        path, _ = decode(params, jnp.asarray(r["preference"], jnp.float32), phi[i])
        r["distilled_greedy_path"] = np.asarray(path, np.int32).tolist()


def _append_curve(path: str, curve: list[float], start_iteration: int) -> None:
    """Keeps metrics.jsonl's first `start_iteration` lines (from before a resume) and appends `curve`."""
    old = []
    if os.path.exists(path):
        with open(path) as f:
            old = [line.strip() for line in f if line.strip()][:start_iteration]
    if distributed.is_main_process():  # every process trained the same policy; one writes its curve
        atomic.write_text(path, "\n".join(old + [repr(float(c)) for c in curve]) + "\n")
