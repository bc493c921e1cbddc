"""Answers a user's preference from a finished run, without retraining (HM3's "offline sampling of weight
vectors, online optimisation").

* `suggest(run_dir, preference)`: the front model whose preference is closest (L1) to the one asked for.
* `suggest(run_dir, preference, search=True)`: builds Theta(lambda) for exactly this preference with the
  run's parameter level (the tuned hyperparameters of the nearest front preference, weights = lambda, its merge
  key; the paper's DARE-TIES when the run's pool model is the paper's), decodes a path for it greedily with the
  trained preference-conditioned policy (restored from the run's checkpoint; no training), and answers with
  the run's own selection rule: the decoded path replaces Theta(lambda)'s identity path only if it has the
  higher RL reward on the search split and, when the run confirms on the whole search split
  (`arch.confirm_top`, `arch.confirm_significance`), beats it there on enough paired bootstrap resamples.
  Both candidates and the decision are returned; the answer is scored on held-out. Optionally
  `refine_iterations` PPO iterations for this lambda first.
* `distill(run_dir, steps)`: fits the trained policy onto the run's answers (behaviour cloning) and saves it;
  later `search=True` suggestions decode with it (as with a run made with `arch.distill_steps`).
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hm3_jax import models, moo
from hm3_jax.arch import descriptors as descriptors_lib
from hm3_jax.arch import env as env_lib
from hm3_jax.arch import loop as loop_lib
from hm3_jax.arch import ppo, scoring
from hm3_jax.pipeline import run as run_lib
from hm3_jax.pipeline import workdir as workdir_lib
from hm3_jax.pipeline.workdir import WorkdirError
from hm3_jax.search import arch_level, param_level, path_confirmation
from hm3_jax.search import path_scorer as path_scorer_lib
from hm3_jax.search.problem import pool_for


def _load(run_dir: str):
    """(config, report) of the finished run in `run_dir`; a WorkdirError naming the directory or file when it
    holds no run, an unfinished one, or a run.json / report.json that is not what run_hm3 writes."""
    meta_path = os.path.join(run_dir, "run.json")
    if not os.path.isfile(meta_path):
        raise WorkdirError(f"{run_dir} holds no HM3 run (no run.json); give the --workdir of a run_hm3 run")
    report_path = os.path.join(run_dir, "report.json")
    if not os.path.exists(report_path):
        raise WorkdirError(f"{run_dir} has no report.json: the run has not finished (re-run it to resume)")
    meta, report = _read_json(meta_path, "config"), _read_json(report_path, "methods")
    return ml_collections.ConfigDict(meta["config"]), report


def _read_json(path: str, key: str) -> dict:
    """The JSON object in `path`, which must hold `key` (WorkdirError naming the file otherwise)."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise WorkdirError(f"{path}: not readable as JSON ({e})") from None
    if not isinstance(obj, dict) or key not in obj:
        raise WorkdirError(f"{path}: not written by run_hm3 (no {key!r})")
    return obj


def suggest(
    run_dir: str,
    preference,
    search: bool = False,
    refine_iterations: int = 0,
    seed: int = 0,
    normalize: bool = False,
) -> dict:
    """The merged model for `preference` ([K] on the simplex; with `normalize`, any non-negative [K] with a
    positive sum, divided by its sum: `[3, 1, 1]` is `[0.6, 0.2, 0.2]`).

    Returns: dict with `preference`, `path`, `heldout` (raw scores in task order), `source` ("front" or
      "policy"), and for front answers `front_index`, `front_preference` and the export directory.
    """
    config, report = _load(run_dir)
    K = len(report["tasks"])
    pref = moo.validate_preference(np.asarray(preference, np.float64), K, normalize=normalize)
    hm3 = report["methods"]["hm3"]
    if not search:
        prefs = np.asarray(hm3["preferences"])
        i = int(np.abs(prefs - pref).sum(1).argmin())
        export_dir = os.path.join(run_dir, "exports", f"pref_{i}")
        return {
            "source": "front",
            "preference": pref.tolist(),
            "front_index": i,
            "front_preference": prefs[i].tolist(),
            "path": hm3["paths"][i],
            "heldout": hm3["points"][i],
            "normalised_heldout": hm3["normalised_points"][i],
            "export": export_dir if os.path.isdir(export_dir) else None,
        }
    return _search(run_dir, config, report, pref, refine_iterations, seed)


# run directory -> (run.json's stat, session {"zoo", "problem", "policy"}): a process that asks several
# suggestions of one run loads its models, builds its engines (compiled programs, score caches) and restores its
# policy once. `clear_sessions()` frees them.
_SESSIONS: dict[str, tuple] = {}


def clear_sessions() -> None:
    """Forgets the runs `suggest` has loaded in this process (their models, engines and caches)."""
    _SESSIONS.clear()


def _session(run_dir: str, config):
    """The session of the run in `run_dir`, loaded once per process (again when its run.json changes)."""
    st = os.stat(os.path.join(run_dir, "run.json"))
    stamp, where = (st.st_mtime_ns, st.st_size), os.path.realpath(run_dir)
    if where in _SESSIONS and _SESSIONS[where][0] == stamp:
        return _SESSIONS[where][1]
    workdir_lib.use_compilation_cache(run_dir)  # a fresh process loads the run's compiled programs
    _, zoo, problem = run_lib.setup(config, run_dir)
    session = {"zoo": zoo, "problem": problem, "policy": None}
    _SESSIONS[where] = (stamp, session)
    return session


def _policy(session: dict, run_dir: str, trainer, key):
    """(the run's trained policy parameters, its jitted greedy decode), restored once per session: the policy
    distilled onto the run's answers when the run made one (`arch.distill_steps`), else the trained one."""
    if session["policy"] is None:
        ckpt = os.path.join(run_dir, "arch", "hm3", "distilled")
        runner = _restore(
            ckpt if os.path.isdir(ckpt) else os.path.join(run_dir, "arch", "hm3", "ckpt"), trainer, key
        )
        session["policy"] = (runner.params, jax.jit(trainer.decode))  # decode(params, preference, phi)
    return session["policy"]


def _restore(ckpt: str, trainer, key):
    """The RL runner saved under `ckpt` (FileNotFoundError naming it when there is none); `trainer.init(key)` is
    only traced for its shapes (no warm start run)."""
    runner = loop_lib.restore_latest(loop_lib.make_checkpoint_manager(ckpt), lambda: trainer.init(key))
    if runner is None:
        raise FileNotFoundError(f"no policy checkpoint under {ckpt}")
    return runner


def _search(run_dir, config, report, pref, refine_iterations, seed) -> dict:
    start = time.perf_counter()
    session = _session(run_dir, config)
    zoo, problem = session["zoo"], session["problem"]
    K, L = problem.num_tasks, problem.config.num_layers
    key = jax.random.PRNGKey(seed)
    merged, theta_from = _theta(run_dir, config, problem, pref)
    shell, pool = models.shell_of(merged), pool_for(problem, merged)
    pref32 = jnp.asarray(pref, jnp.float32)
    aligners = None  # junctions as the run fits them (fitted on search data, then fixed for every split)
    if config.arch.alignment == "moment":
        ids, mask = run_lib.calibration_inputs(problem, zoo)
        aligners = arch_level.make_aligners(problem, "moment", [shell], [pool], ids, mask, shell_source=K)
    # The engines' cache identity of this Theta(lambda) (the engines outlive the call): what determines it.
    tag = "suggest/" + workdir_lib.fingerprint(
        {"theta": theta_from, "preference": np.asarray(pref32).tolist()}
    )

    def path_scorer(split):
        return path_scorer_lib.PathScorer(problem, split, pref32[None], [shell], [pool], tag, aligners)

    acfg = arch_level.arch_config(config.arch, K + 1, L, K)
    phi = descriptors_lib.block_descriptors(pool, problem.base["blocks"], K + 1)
    scorer = path_scorer("search")
    trainer = ppo.make_trainer(acfg, scoring.host_score_fn(scorer, K), phi, pref32[None])
    params, decode = _policy(session, run_dir, trainer, key)
    if refine_iterations:
        params = trainer.refine(key, params, pref32, phi, refine_iterations)
    decoded, _ = decode(params, pref32, phi)
    decoded = np.asarray(decoded, np.int32)
    theta = path_confirmation.identity_paths(K + 1, L, acfg.t_max)[K]
    cands = np.stack([decoded, theta])
    judge = path_scorer("search")  # its archive holds just these two candidates (not refine's paths)
    norm = judge(cands, np.repeat(pref32[None], 2, 0))  # normalised search scores
    rewards = env_lib.host_reward(norm, pref, (cands >= 0).sum(-1), acfg.beta1, acfg.t_max)
    decision = {"search_rewards": rewards.tolist()}
    chosen = 0 if rewards[0] > rewards[1] else 1
    confirm = chosen == 0 and not np.array_equal(decoded, theta) and "search_full" in problem.engines
    if confirm and config.arch.get("confirm_top", 0) > 0:  # the run's confirmation rule, on these two paths
        c = path_confirmation.confirm_candidates(
            problem,
            path_scorer("search_full"),
            0,
            pref32,
            judge,
            K + 1,
            L,
            acfg,
            top=1,
            significance=float(config.arch.get("confirm_significance", 0.0)),
            spec_fn=lambda path: path_confirmation.model_spec(
                shell, pool, path, None if aligners is None else aligners[0]
            ),
            num_samples=int(config.arch.get("confirm_bootstrap_samples", 1000)),
            seed=seed,
        )
        decision["full_search_rewards"] = c["full_rewards"]  # [decoded, Theta]
        if "significance" in c:
            decision["p_gain_over_theta"] = c["significance"]["p_gain_over_theta"]
        chosen = 0 if np.array_equal(c["paths"][c["chosen"]], decoded) else 1
    path = cands[chosen]
    heldout = path_scorer("heldout").raw(0, path[None])[0]
    return {
        "source": "policy",
        "preference": pref.tolist(),
        "path": path.tolist(),
        "decoded_path": decoded.tolist(),
        "answer": "decoded path" if chosen == 0 else "Theta(lambda) (the decoded path did not beat it)",
        "decision": decision,
        "theta": theta_from,
        "search": (norm[chosen] * problem.ideal["search"]).tolist(),
        "heldout": heldout.tolist(),
        "normalised_heldout": (heldout / np.asarray(report["ideal"])).tolist(),
        "seconds": time.perf_counter() - start,
    }


def distill(run_dir: str, steps: int, learning_rate: float = 0.0, seed: int = 0) -> dict:
    """Fits a finished run's trained policy onto its answers and saves it where `suggest(search=True)` then
    restores it from (`WORKDIR/arch/hm3/distilled`): what `arch.distill_steps` does inside a run
    (`warm_start.distill`: `steps` Adam steps at `learning_rate`, 0: the warm start's cloning rate, on the policy's
    proto-action mean at every decision of each front preference's path, with that preference's Theta(lambda)
    pool descriptors). Returns how many front preferences the distilled policy decodes to their own answer.
    """
    if int(steps) < 1:
        raise ValueError(f"distill: steps must be >= 1, got {steps}")
    start = time.perf_counter()
    config, report = _load(run_dir)
    session = _session(run_dir, config)
    problem = session["problem"]
    K, L = problem.num_tasks, problem.config.num_layers
    hm3 = report["methods"]["hm3"]
    prefs = np.asarray(hm3["preferences"], np.float32)
    phi = jnp.stack(  # each front preference's pool descriptors, as the run trained with them
        [
            descriptors_lib.block_descriptors(
                pool_for(problem, _theta(run_dir, config, problem, p)[0]), problem.base["blocks"], K + 1
            )
            for p in prefs
        ]
    )
    acfg = arch_level.arch_config(config.arch, K + 1, L, K)
    unused = scoring.host_score_fn(lambda paths, p, i: np.zeros((len(paths), K), np.float32), K)
    trainer = ppo.make_trainer(acfg, unused, phi, jnp.asarray(prefs))
    runner = _restore(os.path.join(run_dir, "arch", "hm3", "ckpt"), trainer, jax.random.PRNGKey(seed))
    paths = np.asarray(hm3["paths"], np.int32)
    params = trainer.distill(runner.params, paths, int(steps), learning_rate)
    loop_lib.save_runner(os.path.join(run_dir, "arch", "hm3", "distilled"), runner.replace(params=params))
    session["policy"] = None  # the next suggestion restores the distilled policy
    decode = jax.jit(trainer.decode)
    decoded = [np.asarray(decode(params, jnp.asarray(p), phi[i])[0]) for i, p in enumerate(prefs)]
    same = [bool(np.array_equal(d, p)) for d, p in zip(decoded, paths, strict=True)]
    return {
        "reproduced": int(sum(same)),
        "num_preferences": len(prefs),
        "decoded_paths": [d.tolist() for d in decoded],
        "seconds": time.perf_counter() - start,
    }


def _theta(run_dir: str, config, problem, pref: np.ndarray) -> tuple[dict, dict]:
    """Theta(lambda) for a new preference, made as the run made its pool models: the hyperparameters and merge
    key of the nearest (L1) preference of the run's parameter level, with weights = `pref` (at a front
    preference this is exactly the run's Theta). Returns (params, description)."""
    with open(os.path.join(run_dir, "stages", "param_level.json")) as f:
        entries = json.load(f)
    prefs = np.asarray([e["preference"] for e in entries], np.float64)
    i = int(np.abs(prefs - pref).sum(1).argmin())
    variant = config.param_level.pool_model if config.param_level.cmaes.enabled else "paper"
    variant = variant if variant in entries[i] else "paper"
    merged = param_level.merged_for(problem, {**entries[i], "preference": np.asarray(pref).tolist()}, variant)
    return merged, {
        "variant": variant,
        "hparams": entries[i][variant]["hparams"],
        "from_preference": prefs[i].tolist(),
    }
