"""HM3's lower level: the layer-path search for every preference, with one preference-conditioned policy.

For preference lambda_i the pool is `experts' blocks + Theta(lambda_i)'s blocks` (source K) and the shell is
Theta(lambda_i)'s (HM3_SPEC "Architecture space"). `PathScorer` is the host score function the RL calls: it
sends each path to the engine of its preference's pool (search split only), optionally with junction
alignment, and returns normalised scores `f_k / z*_k`. It remembers every scored (preference, path) in an
archive that is saved with the RL checkpoints, so a resumed run sees the same archive.

After training, the answer for preference i is the best path under the RL reward
`sum_k lambda_k f_k - beta1 T / T_max` on the search split among the policy's greedy decode for lambda_i,
every source's identity path (Theta(lambda_i) alone is one of them: the lower level starts from the upper
level's answer, as in HM3's hierarchy) and every path the search scored for lambda_i (the search's own
record, as an evolutionary baseline keeps its best individual). With `arch.neighbourhood_evaluations = B > 0`
that best path is then refined by a first-order local search (`neighbourhood_search`: best-improvement hill
climbing over single-step edits, at most B new path evaluations per preference, counted in the budget like every
other evaluation). Its moves are source swaps, deletions, repeats, insertions of another source's block (paths
longer than L, as depth up-scaling makes) and neighbouring layers (`arch.neighbourhood_kinds`), scored with the
kinds taking turns and each kind's moves spread over the depth (`arch.neighbourhood_order = "round_robin"`,
`order_moves`), so a budget far smaller than the neighbourhood (16 of 158 moves at L = 16) still tries every
kind of edit. With `arch.confirm_top = M > 0` and a capped search split (`engine.search_examples`), the M best
distinct candidates by search reward, plus Theta(lambda)'s identity path, are re-scored on the WHOLE search
split and the answer is the best of them there: choosing the maximum of hundreds of noisy scores on 100
examples per task is biased upward (the winner's curse; on tiny3 the chosen path's math score fell from 20 on
the 100 search examples to 12 held-out). Each such evaluation is charged `ceil(n_full / n_sub)` path
evaluations in the budget (the path baselines get the same total). With `arch.confirm_significance = c > 0`
a path other than Theta(lambda)'s identity path is answered only if it beats Theta on a fraction >= c of
paired bootstrap resamples of the whole search split (`significant_gain`): on tiny3 the paths that beat Theta
on all 700 search examples by a few exact-match points mostly lost to it held-out (differences within the
noise of 700 examples), so the upper level's answer stands unless the evidence is clear. Only the final path
is scored on the held-out split.

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
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax import merging, models
from hm3_jax.arch import descriptors as descriptors_lib
from hm3_jax.arch import loop as loop_lib
from hm3_jax.arch import ppo
from hm3_jax.arch.env import host_reward
from hm3_jax.io import atomic, json_files
from hm3_jax.paths.cache import canonicalize
from hm3_jax.search.problem import Problem, full_search_cost, pool_for


class PathScorer:
    """Host score function `(paths [N, T_max], preferences [N, K]) -> normalised scores [N, K]`.

    Args:
      problem: the Problem; split: "search" (what the RL sees) or "heldout" (reports only).
      preferences: [N, K] the preference vectors (rows of the episode preferences).
      shells, pools: per preference, the path model's shell and block pool.
      tag: cache namespace (keeps HM3 and its ablation apart in the engine cache).
      aligners: None or per preference an `hm3_jax.paths.alignment.Aligner`.
    """

    def __init__(self, problem: Problem, split: str, preferences, shells, pools, tag: str, aligners=None):
        self.problem = problem
        self.split = split
        self.preferences = np.asarray(preferences, np.float32)
        if len(shells) != len(pools) or len(pools) != len(self.preferences):
            raise ValueError(
                f"PathScorer: {len(self.preferences)} preferences, {len(shells)} shells, {len(pools)} pools"
            )
        self.shells, self.pools, self.tag = shells, pools, tag
        # Engines are made on first use: a `PreferenceModels` bank holds them with its preference's pool (and
        # drops both together); plain lists of shells and pools keep one engine per preference here.
        self._engines: dict[int, object] = {}
        self.aligners = aligners
        self.evaluations = 0
        self.flops = 0.0
        self.seconds = 0.0
        self.archive: dict[tuple[int, bytes], np.ndarray] = {}  # (preference, path bytes) -> scores [K]
        self.scored: dict[tuple[int, bytes], np.ndarray] = {}  # the same by canonical path (`__call__`)

    def engine(self, index: int):
        """The split's engine over preference `index`'s shell and pool (cache identity `scorer_pool_id`)."""
        base, pool_id = self.problem.engines[self.split], scorer_pool_id(self.tag, index)
        bank = getattr(self.pools, "bank", None)
        if bank is not None:
            return bank.engine(base, index, pool_id)
        if index not in self._engines:
            self._engines[index] = base.with_model(self.shells[index], self.pools[index], pool_id=pool_id)
        return self._engines[index]

    def preference_index(self, prefs: np.ndarray) -> np.ndarray:
        d = np.abs(np.asarray(prefs, np.float32)[:, None, :] - self.preferences[None]).sum(-1)
        idx = d.argmin(1)
        if np.any(d[np.arange(len(idx)), idx] > 1e-4):
            raise ValueError("PathScorer got a preference that is not one of its preference vectors")
        return idx

    def raw(self, index: int, paths: np.ndarray) -> np.ndarray:
        """Raw scores [N, K] of paths under preference `index`'s pool (cached by the engine)."""
        junction = None if self.aligners is None else self.aligners[index].junctions(paths)
        res = self.engine(index).evaluate(paths, junction)
        self.evaluations += res.cost.num_evaluations
        self.flops += res.cost.flops
        self.seconds += res.cost.seconds
        return res.scores

    def __call__(self, paths: np.ndarray, prefs: np.ndarray) -> np.ndarray:
        """Normalised scores [N, K] of `paths` [N, T_max] under `prefs` [N, K] (each one of the preferences).

        A path scored before under the same preference (padding placed anywhere: the engine's cache key) is
        answered from `scored` without the engine, as the engine's cache would answer it; `scored` is restored
        from the archive after a resume (`load_archive`), where the engine's cache is empty, so a resumed run
        spends (and counts) the FLOPs of the uninterrupted one.
        """
        paths = np.asarray(paths, np.int32)
        canonical = canonicalize(paths)[0]  # [N, T_max]
        idx = self.preference_index(prefs)
        out = np.zeros((len(paths), self.problem.num_tasks), np.float32)
        for i in np.unique(idx):
            rows = np.nonzero(idx == i)[0]
            new = [r for r in rows if (int(i), canonical[r].tobytes()) not in self.scored]
            if new:
                norm = self.problem.normalise(self.raw(int(i), paths[new]), self.split)
                for r, s in zip(new, norm, strict=True):
                    self.scored[(int(i), canonical[r].tobytes())] = s
            for r in rows:
                s = self.scored[(int(i), canonical[r].tobytes())]
                out[r] = s
                self.archive[(int(i), paths[r].tobytes())] = s
        return out

    # Archive persistence (saved beside the RL checkpoints).
    def save_archive(self, path: str, wall_seconds: float = 0.0) -> None:
        """Writes the archive with the cost so far (FLOPs, engine seconds, and `wall_seconds` of the caller), so
        that a resumed run's cost accounting includes the work before the kill."""
        if (
            not self.archive or jax.process_index() != 0
        ):  # multi-process: every process holds the same archive
            return
        keys = list(self.archive)
        idx = np.array([k[0] for k in keys], np.int32)
        paths = np.stack([np.frombuffer(k[1], np.int32) for k in keys])
        scores = np.stack([self.archive[k] for k in keys])
        cost = np.array([self.flops, self.seconds, wall_seconds], np.float64)  # [3]
        with atomic.atomic_file(path, "wb") as f:
            np.savez(f, index=idx, paths=paths, scores=scores, cost=cost)

    def load_archive(self, path: str) -> float:
        """Restores the archive and the cost of `save_archive`; returns the wall seconds it recorded (0 when
        there is no archive: a fresh run)."""
        if not os.path.exists(path):
            return 0.0
        with np.load(path) as z:
            for i, p, s in zip(z["index"], z["paths"], z["scores"], strict=True):
                self.archive[(int(i), np.asarray(p, np.int32).tobytes())] = s
                self.scored[(int(i), canonicalize(np.asarray(p, np.int32)[None])[0][0].tobytes())] = s
            flops, seconds, wall_seconds = z["cost"] if "cost" in z else (0.0, 0.0, 0.0)
        self.flops, self.seconds = float(flops), float(seconds)
        return float(wall_seconds)


def scorer_pool_id(tag: str, index: int) -> str:
    """The engine cache identity of a PathScorer's model for preference `index` (the same on every split: each
    split's engine keeps its own cache); a `model_spec` with this id reads the statistics kept when it scored."""
    return f"{tag}/pref{index}"


def arch_config(cfg, num_sources: int, num_layers: int, num_tasks: int) -> ppo.ArchConfig:
    """`config.arch.rl` (ml_collections) -> the static ArchConfig of this pool.

    With a parameter-level model in the pool (`num_sources == K + 1`, source K) the policy is warm-started on
    its identity path (`ppo.warm_start`, `rl.warm_start_steps` steps): the lower level starts from the upper
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
    return ppo.ArchConfig.from_mapping(
        {**rl, "num_sources": num_sources, "num_layers": num_layers, "num_tasks": num_tasks,
         "warm_start_source": merged_source if warm else -1}
    )  # fmt: skip


def no_param_level_model(problem: Problem) -> tuple[dict, list[dict]]:
    """Shell (plain average of the experts' shells) and padded pool of the 'no parameter level' ablation."""
    shell = merging.merge("linear", None, [models.shell_of(e) for e in problem.experts])
    pool = pool_for(problem.experts, problem.experts[0])  # last source slot never selectable
    return shell, pool


def make_aligners(problem: Problem, mode: str, shells, pools, calib_ids, calib_mask, shell_source):
    """One `Aligner` per preference (None for mode "none")."""
    if mode == "none":
        return None
    from hm3_jax.paths import alignment

    if mode != "moment":
        raise ValueError(f"the end-to-end run supports alignment 'none' or 'moment', got {mode!r}")
    out = []
    for shell, pool in zip(shells, pools, strict=True):
        source_shells = [models.shell_of(e) for e in problem.experts] + [shell]
        stats = alignment.native_stats(problem.config, source_shells, pool, calib_ids, calib_mask)
        out.append(alignment.make_aligner("moment", problem.config, shell, pool, stats=stats, calib_ids=calib_ids,
                                          calib_mask=calib_mask, shell_source=shell_source))  # fmt: skip
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


def run_arch_level(problem: Problem, preferences, shells, pools, base_blocks, key, cfg, workdir: str,
                   tag: str, num_sources: int, aligners_search=None, aligners_heldout=None) -> dict:  # fmt: skip
    """Trains the preference-conditioned policy and returns the chosen path per preference.

    Args:
      problem, preferences [N, K]; shells / pools per preference (the pool's first `num_sources` sources are
        searchable); base_blocks: the base model's blocks (descriptors); key: PRNG key; cfg: `config.arch`;
      workdir: where RL checkpoints, the score archive and metrics go (resumable); tag: cache namespace.
    Returns: JSON-able dict with per-preference paths, search/heldout scores, rewards, curves and costs.
    """
    start = time.perf_counter()
    K, L = problem.num_tasks, problem.config.num_layers
    acfg = arch_config(cfg, num_sources, L, K)
    scorer = PathScorer(problem, "search", preferences, shells, pools, tag, aligners_search)
    archive_path = os.path.join(workdir, "score_archive.npz")
    wall_before = scorer.load_archive(archive_path)  # the cost spent before a resume (0 on a fresh run)
    phi = jnp.stack([
        descriptors_lib.block_descriptors(jax.tree.map(lambda x: x[: num_sources * L], p), base_blocks, num_sources)
        for p in pools
    ])  # fmt: skip  # [N, P, d]
    trainer = ppo.make_trainer(acfg, ppo.host_score_fn(scorer, K), phi, jnp.asarray(preferences, jnp.float32))
    curve: list[float] = []
    metrics_path = os.path.join(workdir, "metrics.jsonl")

    def on_metrics(iteration: int, row: dict) -> None:
        curve.append(row.get("episode_return", float("nan")))
        if iteration % cfg.checkpoint_every == 0 or iteration == acfg.num_iterations:
            scorer.save_archive(archive_path, wall_before + time.perf_counter() - start)

    mode = score_mode_for(problem.engines["search"], cfg.get("score_mode", "auto"))
    runner = loop_lib.run_training(trainer, key, acfg.num_iterations, checkpoint_dir=os.path.join(workdir, "ckpt"),
                                   checkpoint_every=cfg.checkpoint_every, metrics_fn=on_metrics, score_mode=mode,
                                   host_fn=scorer if mode == "split" else None)  # fmt: skip
    scorer.save_archive(archive_path, wall_before + time.perf_counter() - start)
    # The reward curve of the whole run (also the iterations before a resume) is rebuilt from metrics.jsonl.
    _append_curve(metrics_path, curve, start_iteration=acfg.num_iterations - len(curve))
    decode = jax.jit(trainer.decode)
    seeds = identity_paths(num_sources, L, acfg.t_max)  # [num_sources, T_max]
    full_scorer = None
    if cfg.get("confirm_top", 0) > 0 and "search_full" in problem.engines:
        full_scorer = PathScorer(problem, "search_full", preferences, shells, pools, tag, aligners_search)
    results = []
    for i, pref in enumerate(np.asarray(preferences, np.float32)):
        path, length = decode(runner.params, jnp.asarray(pref), phi[i])
        greedy = np.asarray(path, np.int32)
        # The greedy decode and every source's own identity path (Theta(lambda) alone among them, so the
        # architecture level never answers worse than the parameter level on the search split) join the
        # candidates the search scored; all are scored into the archive and counted as evaluations.
        scorer(np.concatenate([greedy[None], seeds]), np.repeat(pref[None], 1 + len(seeds), 0))
        cands = [(np.frombuffer(k[1], np.int32), s) for k, s in scorer.archive.items() if k[0] == i]
        lengths = np.array([(p >= 0).sum() for p, _ in cands])
        rewards = host_reward(np.stack([s for _, s in cands]), pref, lengths, acfg.beta1, acfg.t_max)
        best = int(np.argmax(rewards))
        best_path = cands[best][0]
        g_key = greedy.tobytes()
        g_reward = float(rewards[[p.tobytes() for p, _ in cands].index(g_key)])
        start_reward, refined, num_candidates, ls = float(rewards[best]), 0, len(cands), None
        if cfg.get("neighbourhood_evaluations", 0) > 0:
            ls = neighbourhood_search(
                lambda paths, pref=pref: scorer(paths, np.repeat(pref[None], len(paths), 0)),
                best_path,
                pref,
                num_sources=num_sources,
                num_layers=L,
                t_min=acfg.t_min,
                t_max=acfg.t_max,
                beta1=acfg.beta1,
                budget=int(cfg.neighbourhood_evaluations),
                known={p.tobytes(): s for p, s in cands},
                kinds=tuple(cfg.get("neighbourhood_kinds", MOVE_KINDS)),
                order=cfg.get("neighbourhood_order", "round_robin"),
                key=jax.random.fold_in(jax.random.fold_in(key, NEIGHBOURHOOD_STREAM), i),
            )
            best_path, refined, num_candidates = (
                ls["path"],
                ls["evaluations"],
                num_candidates + ls["evaluations"],
            )
            cands = [(best_path, ls["scores"])]
            rewards, best = np.asarray([ls["reward"]]), 0
        confirm = None
        if full_scorer is not None:
            aligner = None if aligners_search is None else aligners_search[i]
            confirm = confirm_candidates(
                problem, full_scorer, i, pref, scorer, num_sources, L, acfg, int(cfg.confirm_top),
                significance=float(cfg.get("confirm_significance", 0.0)),
                spec_fn=lambda path, i=i, a=aligner: model_spec(shells[i], pools[i], path, a, scorer_pool_id(tag, i)),
                num_samples=int(cfg.get("confirm_bootstrap_samples", 1000)), seed=int(cfg.get("confirm_seed", 0)) + i,
                sources=bool(cfg.get("confirm_sources", False)),
            )  # fmt: skip
            best_path = np.asarray(confirm["paths"][confirm["chosen"]], np.int32)
            cands = [(best_path, scorer.archive[(i, best_path.tobytes())])]
            rewards, best = (
                np.asarray([host_reward(cands[0][1], pref, (best_path >= 0).sum(), acfg.beta1, acfg.t_max)]),
                0,
            )
        results.append({
            "preference": pref.tolist(),
            "greedy_path": greedy.tolist(),
            "greedy_reward": g_reward,
            "path": best_path.tolist(),
            "search_reward": float(rewards[best]),
            "search": (np.asarray(cands[best][1]) * problem.ideal["search"]).tolist(),
            "num_candidates": num_candidates,
            "pre_refinement_reward": start_reward,
            "neighbourhood_evaluations": refined,
            **({"neighbourhood": {"moves": ls["moves"], "evaluated": ls["evaluated"]}} if ls is not None else {}),
            **({"confirm": confirm} if confirm is not None else {}),
        })  # fmt: skip
    heldout = PathScorer(problem, "heldout", preferences, shells, pools, tag, aligners_heldout)
    for i, r in enumerate(results):
        r["heldout"] = heldout.raw(i, np.asarray([r["path"]], np.int32))[0].tolist()
        if aligners_heldout is not None:
            r["junction"] = {k: v.tolist() for k, v in path_junction(aligners_heldout[i], r["path"]).items()}
    with open(metrics_path) as f:
        full_curve = [float(line) for line in f if line.strip()]
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


def path_junction(aligner, path) -> dict | None:
    """The junction parameters of one path [T_max] under `aligner` (None: no alignment)."""
    if aligner is None:
        return None
    return {k: v[0] for k, v in aligner.junctions(np.asarray(path, np.int32)[None]).items()}


def model_spec(shell, pool, path, aligner=None, model_id: str | None = None):
    """One path model as a `heldout_bootstrap.ModelSpec` `(shell, pool, path, junction, model_id)`."""
    from hm3_jax.search.heldout_bootstrap import ModelSpec

    path = np.asarray(path, np.int32)
    return ModelSpec(shell, pool, path, path_junction(aligner, path), model_id)


def confirm_candidates(problem: Problem, full_scorer, index: int, pref, scorer, num_sources: int, num_layers: int, acfg,
             top: int, significance: float = 0.0, spec_fn=None, num_samples: int = 1000, seed: int = 0,
             sources: bool = False) -> dict:  # fmt: skip
    """Re-scores the `top` best candidates of preference `index` (and Theta's identity path) on the whole
    search split; returns the candidates, both rewards and the chosen index (best on the whole split).

    With `sources`, every source's own model (its identity path: each expert's, and Theta(lambda)'s) joins the
    shortlist too, scored first on the capped split if the search never scored it (counted by `scorer`): the
    shortlist of the best capped-split rewards can miss them although they are the pool's plainest candidates
    (on the deep tiny3 the code expert alone beat HM3's answer held-out at two preferences, docs/headroom.md).

    With `significance` = c > 0 and `spec_fn(path) -> ModelSpec` (`heldout_bootstrap` semantics), a candidate
    that beats Theta(lambda)'s identity path on the whole split replaces it only when it does so on a
    fraction >= c of `num_samples` paired bootstrap resamples of the split's examples (`significant_gain`):
    the upper level's answer stands unless the data say the architecture level improves on it. The
    per-example statistics come from one re-run of the two models (scores checked against the engine's).
    """
    own = identity_paths(num_sources, num_layers, acfg.t_max)
    if sources:  # archived under this preference (answered from the scorer's cache when scored before)
        scorer(own, np.repeat(np.asarray(pref, np.float32)[None], num_sources, 0))
    cands = [(np.frombuffer(k[1], np.int32), s) for k, s in scorer.archive.items() if k[0] == index]
    paths = np.stack([p for p, _ in cands])
    r_sub = host_reward(np.stack([s for _, s in cands]), pref, (paths >= 0).sum(-1), acfg.beta1, acfg.t_max)
    order = list(np.argsort(-r_sub, kind="stable")[:top])
    if sources:
        for m in range(num_sources):
            k = next(k for k, p in enumerate(paths) if np.array_equal(p, own[m]))
            if k not in order:
                order.append(k)
    j = []  # where Theta(lambda)'s identity path, the upper level's own answer, is among the candidates
    if num_sources > problem.num_tasks:
        j = [k for k, p in enumerate(paths) if np.array_equal(p, own[num_sources - 1])]
        if j and j[0] not in order:
            order.append(j[0])
    chosen_paths = paths[order]
    full = full_scorer(chosen_paths, np.repeat(np.asarray(pref)[None], len(order), 0))
    r_full = host_reward(full, pref, (chosen_paths >= 0).sum(-1), acfg.beta1, acfg.t_max)
    chosen = int(np.argmax(r_full))
    out = {
        "paths": chosen_paths.tolist(),
        "subset_rewards": r_sub[order].tolist(),
        "full_rewards": r_full.tolist(),
        "full_search": (np.asarray(full) * problem.ideal["search_full"]).tolist(),
        "chosen": chosen,
        "charged_evaluations": int(len(order) * full_search_cost(problem)),
    }
    if significance > 0 and spec_fn is not None and j and chosen != order.index(j[0]):
        t = order.index(j[0])
        p_gain = significant_gain(problem, "search_full", spec_fn(chosen_paths[chosen]), spec_fn(chosen_paths[t]),
                                  pref, acfg, num_samples, seed, expected=(full[chosen], full[t]))  # fmt: skip
        accepted = p_gain >= significance
        out["significance"] = {"level": float(significance), "p_gain_over_theta": p_gain, "accepted": accepted,
                               "best_on_full": chosen, "num_samples": int(num_samples)}  # fmt: skip
        out["chosen"] = chosen if accepted else t
    return out


def significant_gain(problem: Problem, split: str, spec_a, spec_b, pref, acfg, num_samples: int, seed: int,
                     expected=None, tol: float = 1e-3) -> float:  # fmt: skip
    """P(reward(a) > reward(b)) over paired bootstrap resamples of `split`'s examples.

    The reward difference on a resample is `sum_k lambda_k (f_k(a) - f_k(b)) / z*_k - beta1 (T_a - T_b) / T_max`
    (the RL reward, `reward`), both models scored on the same resampled examples (per-example 0/1 for exact
    match, sentence statistics for chrF: `hm3_jax.moo.bootstrap`). `expected`: the engine's normalised scores
    of a and b on the split; the re-run must reproduce them (else RuntimeError).
    Args: spec_a, spec_b: (shell, pool, path [T], junction or None). Returns a probability in [0, 1].
    """
    from hm3_jax.moo import bootstrap
    from hm3_jax.search import heldout_bootstrap

    stats, scores = [], []
    for spec in (spec_a, spec_b):
        st, sc = heldout_bootstrap.example_stats(problem, spec, split)
        stats.append(st)
        scores.append(problem.normalise(problem.objective_scores(sc), split))
    ideal = np.asarray(problem.ideal[split], np.float64)
    if expected is not None and np.max(np.abs(np.asarray(scores) - np.asarray(expected)) * ideal) > tol:
        raise RuntimeError(
            f"significant_gain: re-running on {split} gives {scores}, the engine gave {expected}"
        )
    objs = problem.objectives[split]
    idx = bootstrap.resample_indices(seed, [o.num_examples for o in objs], num_samples)
    weights = problem.task_weights(np.asarray(pref, np.float64) / ideal)  # per task: lambda_g / (z*_g |g|)
    diff = bootstrap.paired_difference_samples(stats[0], stats[1], [o.metric for o in objs], weights, idx)
    t_a, t_b = (int((np.asarray(heldout_bootstrap.ModelSpec(*s).path) >= 0).sum()) for s in (spec_a, spec_b))
    diff = diff - acfg.beta1 * (t_a - t_b) / acfg.t_max
    return float(np.mean(diff > 0))


# The single-step edits of a path, by kind (`config.arch.neighbourhood_kinds` names them).
MOVE_KINDS = ("swap", "delete", "repeat", "insert", "layer")
# The neighbourhood before issue 20 (no insertions), listed kind by kind: `benchmarks/arch_headroom.py`'s one-edit
# set, so its published tables reproduce.
KINDS_WITHOUT_INSERTION = ("swap", "delete", "repeat", "layer")
NEIGHBOURHOOD_ORDERS = ("round_robin", "by_kind")
# `run_arch_level` draws the neighbourhood orders from `fold_in(key, NEIGHBOURHOOD_STREAM)`, a stream of the arch
# level's key that the PPO loop never draws from.
NEIGHBOURHOOD_STREAM = 0x6E62


class Moves(NamedTuple):
    """Every path one edit away from a path, listed kind by kind (`kinds` order), then step by step.

    paths: [M, T_max] int32 pool indices m * L + l, -1 padded; kind: [M] index into the `kinds` they were made
    for; step: [M] the step t the edit is at (the step replaced, deleted, repeated, or inserted after).
    """

    paths: np.ndarray  # [M, T_max]
    kind: np.ndarray  # [M]
    step: np.ndarray  # [M]
    num_steps: int  # T, the steps of the path the moves edit


def check_neighbourhood(kinds, order: str) -> None:
    """ValueError naming the setting unless `kinds` (a non-empty subset of MOVE_KINDS, no repeats) and `order`
    (one of NEIGHBOURHOOD_ORDERS) are usable (`config.arch.neighbourhood_kinds` / `neighbourhood_order`)."""
    kinds = tuple(kinds)
    if not kinds or len(set(kinds)) != len(kinds) or any(k not in MOVE_KINDS for k in kinds):
        raise ValueError(f"arch.neighbourhood_kinds must be distinct names from {MOVE_KINDS}, got {kinds!r}")
    if order not in NEIGHBOURHOOD_ORDERS:
        raise ValueError(f"arch.neighbourhood_order must be one of {NEIGHBOURHOOD_ORDERS}, got {order!r}")


def neighbour_moves(
    path, num_sources: int, num_layers: int, t_min: int, t_max: int, kinds=MOVE_KINDS
) -> Moves:
    """Every path one edit away from `path` [T_max] (T steps, step t = block (m_t, l_t)), without `path` itself.

    Kinds (HM3_SPEC "Architecture space": blocks may be swapped between sources, repeated or skipped):
      swap: step t replaced by another source's block of the same layer, (m', l_t) with m' != m_t: the stitch
        that mixes experts' skills (num_sources - 1 per step);
      delete: step t removed (if T > t_min);
      repeat: step t run twice (if T < t_max);
      insert: another source's block of the same layer, (m', l_t) with m' != m_t, run after step t (if
        T < t_max): a path longer than the models, as depth up-scaling inserts blocks (docs/headroom.md: at
        16 blocks the best one-edit paths of the balanced Theta(lambda) are one more block at layer 10-11).
        With m' = m_t it would be the repeat; other layers are left to the search's next steps (with `layer`),
        so the neighbourhood stays linear in T (num_sources - 1 per step);
      layer: step t replaced by the same source's neighbouring layer (m_t, l_t +- 1).
    Within a kind, moves are listed step by step (t ascending), then by source / layer ascending. A path that
    two kinds make (e.g. inserting (m', l) after a step that is followed by (m', l) repeats that block) is
    listed under the first of `kinds` only, and once.
    Returns: Moves (paths [M, T_max], kind [M], step [M], num_steps T).
    """
    check_neighbourhood(kinds, "by_kind")
    steps = [int(a) for a in np.asarray(path, np.int32) if a >= 0]
    T, L = len(steps), num_layers
    made: dict[str, list[tuple[int, list[int]]]] = {k: [] for k in MOVE_KINDS}  # kind -> [(step, path)]
    for t, a in enumerate(steps):
        m, l = divmod(a, L)
        others = [m2 * L + l for m2 in range(num_sources) if m2 != m]
        made["swap"] += [(t, steps[:t] + [b] + steps[t + 1 :]) for b in others]
        if T > t_min:
            made["delete"].append((t, steps[:t] + steps[t + 1 :]))
        if T < t_max:
            made["repeat"].append((t, steps[: t + 1] + [a] + steps[t + 1 :]))
            made["insert"] += [(t, steps[: t + 1] + [b] + steps[t + 1 :]) for b in others]
        made["layer"] += [
            (t, steps[:t] + [m * L + l2] + steps[t + 1 :]) for l2 in (l - 1, l + 1) if 0 <= l2 < L
        ]
    seen, rows, kind, step = {tuple(steps)}, [], [], []
    for k, name in enumerate(kinds):
        for t, cand in made[name]:
            if tuple(cand) not in seen:
                seen.add(tuple(cand))
                rows.append(cand + [-1] * (t_max - len(cand)))
                kind.append(k)
                step.append(t)
    rows = np.asarray(rows, np.int32).reshape(-1, t_max)
    return Moves(rows, np.asarray(kind, np.int32), np.asarray(step, np.int32), T)


def spread_order(n: int) -> list[int]:
    """0..n-1 in van der Corput (bit-reversal) order, e.g. n = 8: 0 4 2 6 1 5 3 7: every prefix is spread over
    the range (the first 2^j are 2^-j of the range apart), so a search that stops early has looked everywhere."""
    bits = max(1, (n - 1).bit_length())
    return sorted(range(n), key=lambda i: int(format(i, f"0{bits}b")[::-1], 2))


def order_moves(moves: Moves, order: str = "round_robin", key=None) -> np.ndarray:
    """[M] the order (indices into `moves`) in which a budgeted search scores the moves.

    "by_kind": as listed (kind by kind, step by step): the order before issue 20. At L = 16 it puts 48 source
    swaps before the first deletion, so a budget of 16 (the full config's) never left the swaps, and on the
    deep tiny3 the depth edits that pay were out of reach (docs/headroom.md).
    "round_robin" (default): the kinds take turns (one swap, one deletion, one repeat, one insertion, one
    neighbouring layer, then the next of each; a kind that has run out is skipped), so the first B moves hold
    min(floor(B / kinds), M_kind) of every kind: no prior says which kind pays (on tiny3 none did; on the deep
    tiny3 the edits over 2 SE were repeats, insertions and a deletion, no swap), so a small budget is shared
    evenly. Within a kind the
    steps are visited in `spread_order` rotated by an offset, and a step's moves (which source, which
    neighbouring layer) are taken one per step per pass, so a kind's first moves are spread over the whole
    depth instead of crowding its first layers; with a `key` the offset and each step's move order are drawn
    from it (host-side numpy Generator seeded by the key's data), so each preference (its own key) looks at
    other layers and the preferences together cover the depth; with `key=None` the offset is 0 and moves are
    taken in listed order (deterministic).
    """
    if order not in NEIGHBOURHOOD_ORDERS:
        raise ValueError(f"arch.neighbourhood_order must be one of {NEIGHBOURHOOD_ORDERS}, got {order!r}")
    M = len(moves.kind)
    if order == "by_kind" or M == 0:
        return np.arange(M)
    rng = (
        None if key is None else np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    )
    T = moves.num_steps
    queues = []
    for k in np.unique(moves.kind):  # ascending = `kinds` order
        offset = 0 if rng is None else int(rng.integers(T))
        by_step = []
        for v in spread_order(T):
            idx = np.nonzero((moves.kind == k) & (moves.step == (v + offset) % T))[0]
            by_step.append(idx if rng is None else rng.permutation(idx))
        # pass p takes the p-th move of every step, in the steps' spread order
        queues.append([int(g[p]) for p in range(max(len(g) for g in by_step)) for g in by_step if p < len(g)])
    out = [q[i] for i in range(max(len(q) for q in queues)) for q in queues if i < len(q)]
    return np.asarray(out, np.int64)


def neighbours(path, num_sources: int, num_layers: int, t_min: int, t_max: int, *, kinds=MOVE_KINDS,
               order: str = "round_robin", key=None) -> np.ndarray:  # fmt: skip
    """[M, T_max] every path one edit away from `path` (`neighbour_moves`: int32 pool indices m * L + l, -1
    padded, no repeats, not `path` itself) in the order a budgeted search scores them (`order_moves`).

    `kinds=KINDS_WITHOUT_INSERTION, order="by_kind"` is the neighbourhood before issue 20, in its order.
    """
    moves = neighbour_moves(path, num_sources, num_layers, t_min, t_max, kinds)
    return moves.paths[order_moves(moves, order, key)]


def neighbourhood_search(score_fn, path, preference, *, num_sources: int, num_layers: int, t_min: int,
                         t_max: int, beta1: float, budget: int, known: dict | None = None, kinds=MOVE_KINDS,
                         order: str = "round_robin", key=None) -> dict:  # fmt: skip
    """Best-improvement hill climbing over `neighbours` under the RL reward, at most `budget` new evaluations.

    Args:
      score_fn: `paths [M, T_max] -> normalised search scores [M, K]` (e.g. a PathScorer for one preference).
      path: the start [T_max]; preference [K]; known: {path bytes: normalised scores} already scored (free).
      kinds, order: the moves and the order they are scored in (`neighbour_moves`, `order_moves`); key: None or
        a PRNG key; round r orders its moves with `fold_in(key, r)`.
    Returns: {"path", "scores", "reward", "evaluations" (new ones), "steps" (accepted moves), "moves" (the kind
    of each accepted move), "evaluated" ({kind: new evaluations})}.
    Each round scores the unscored neighbours of the current path in `order` (truncated to the remaining budget,
    so the order decides which moves a small budget sees) and moves to the best scored neighbour if it raises
    the reward; it stops at a local optimum or when the budget is spent.
    """
    check_neighbourhood(kinds, order)
    kinds = tuple(kinds)
    known = dict(known or {})
    cur = np.asarray(path, np.int32)
    lengths = lambda ps: (np.asarray(ps) >= 0).sum(-1)
    evaluations, accepted, evaluated = 0, [], dict.fromkeys(kinds, 0)
    if cur.tobytes() not in known:
        known[cur.tobytes()] = np.asarray(score_fn(cur[None]))[0]
        evaluations += 1
    cur_r = float(host_reward(known[cur.tobytes()], preference, lengths(cur), beta1, t_max))
    while evaluations < budget:
        moves = neighbour_moves(cur, num_sources, num_layers, t_min, t_max, kinds)
        round_key = None if key is None else jax.random.fold_in(key, len(accepted))
        ordered = order_moves(moves, order, round_key)
        nb, nb_kind = moves.paths[ordered], moves.kind[ordered]
        fresh = np.asarray([p.tobytes() not in known for p in nb], bool)
        take = np.nonzero(fresh)[0][: budget - evaluations]
        if len(take):
            for p, sc in zip(nb[take], np.asarray(score_fn(nb[take])), strict=True):
                known[p.tobytes()] = sc
            evaluations += len(take)
            for k in nb_kind[take]:
                evaluated[kinds[k]] += 1
        scored = np.asarray([p.tobytes() in known for p in nb], bool)
        nb, nb_kind = nb[scored], nb_kind[scored]
        if not len(nb):
            break
        r = host_reward(np.stack([known[p.tobytes()] for p in nb]), preference, lengths(nb), beta1, t_max)
        j = int(np.argmax(r))
        if r[j] <= cur_r + 1e-9:
            break
        cur, cur_r = nb[j], float(r[j])
        accepted.append(kinds[nb_kind[j]])
    return {"path": cur, "scores": known[cur.tobytes()], "reward": cur_r, "evaluations": evaluations,
            "steps": len(accepted), "moves": accepted, "evaluated": evaluated}  # fmt: skip


def identity_paths(num_sources: int, num_layers: int, t_max: int) -> np.ndarray:
    """[num_sources, T_max]: source m's own blocks in order (pool indices m * L + l), -1 padded."""
    out = np.full((num_sources, t_max), -1, np.int32)
    n = min(num_layers, t_max)
    for m in range(num_sources):
        out[m, :n] = m * num_layers + np.arange(n)
    return out


def _append_curve(path: str, curve: list[float], start_iteration: int) -> None:
    """Keeps metrics.jsonl's first `start_iteration` lines (from before a resume) and appends `curve`."""
    old = []
    if os.path.exists(path):
        with open(path) as f:
            old = [line.strip() for line in f if line.strip()][:start_iteration]
    json_files.write_text(path, "\n".join(old + [repr(float(c)) for c in curve]) + "\n")
