"""Junction alignment on tiny3, measured: none vs moment vs learned on the same paths; prints one JSON object.

    .venv/bin/python benchmarks/alignment.py --zoo=runs/tiny3/zoo    # after `make demo-full` (runs/tiny3)
    .venv/bin/python benchmarks/alignment.py --zoo=ZOO --run=RUN --smoke   # seconds, for the tests

Pool: the K = 3 tiny3 experts plus the balanced preference's parameter-merged model Theta (source K; a real
run's stages/param_level.json when `--run` has one, else task arithmetic with scale 0.7, see
benchmarks/path_eval.py), Theta's shell. Paths: (1) the policy's real paths, the first `--num_policy_paths`
distinct rows of a run's score archive (in order of first evaluation); (2) cross-source paths built by hand:
Theta's blocks 0..L-2 then expert k's block L-1, expert k's blocks 0..L-2 then Theta's block L-1, expert k's
first half then Theta's second half and the reverse (k = every expert); (3) every source's identity path.

Alignment (hm3_jax/paths/alignment.py), fitted on the search split only: calibration inputs are the first
`--calib_rows_per_task` rows of each task's search split (teacher-forced rows prompt+target of math and code,
the left-padded prompts of translation), padded to one length, mask = non-pad tokens; `native_stats` of every
pool block from its own source on those inputs; `moment` = closed-form per-dimension moment matching;
`learned` = the junction MLP fitted with CORAL + mean loss (`fit_learned`, `--learned_steps` Adam steps,
PRNGKey(`--seed`)) on the evaluated paths plus `--learned_random_paths` random pool paths. The same junctions
(a fixed function of the path) are used on both splits.

Scores: raw task scores from the path engine on the search split and on the held-out split; normalised by the
ideal point z*_k of that split (the best identity-path score of any source on task k, HM3_SPEC); weighted
score of a path for a preference lambda: sum_k lambda_k f_k / z*_k. Preferences: the run's
stages/preferences.json when present, else 15 Dirichlet(1) draws (PRNGKey(`--seed`)), plus the balanced one.

Keys (per split "search" / "heldout"): mean_weighted_score[mode] (mean over paths and preferences, also per
path group), mean_normalised_score[mode] per task, best_mode_per_path (how many paths each mode wins on the
preference-averaged weighted score; exact ties counted under "tie"), best_mode_per_path_preference (the same
over every (path, preference) pair), winner (highest mean weighted score); fit costs; load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import path_eval  # noqa: E402

from hm3_jax import models  # noqa: E402
from hm3_jax.paths import alignment, make_engine  # noqa: E402
from hm3_jax.paths.engine import DECODE_METRICS  # noqa: E402

MODES = ("none", "moment", "learned")


def calibration(setup, rows_per_task: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, S] calibration ids and mask from the first rows of every task's search split."""
    pieces = []
    for o in setup.objectives["search"]:
        tree = o.arrays.tree
        if o.metric in DECODE_METRICS:
            ids = np.asarray(tree["prompt_ids"]).reshape(-1, tree["prompt_ids"].shape[-1])
        else:
            ids = np.asarray(tree["input_ids"][0]).reshape(-1, tree["input_ids"][0].shape[-1])
        pieces.append(ids[:rows_per_task])
    width = max(p.shape[1] for p in pieces)
    ids = np.concatenate(
        [np.pad(p, ((0, 0), (0, width - p.shape[1])), constant_values=pad_id) for p in pieces]
    )
    return ids.astype(np.int32), (ids != pad_id).astype(np.float32)


def cross_source_paths(num_experts: int, num_layers: int, t_max: int) -> tuple[np.ndarray, list[str]]:
    """Hand-built stitched paths (see module docstring) and their names."""
    merged, L = num_experts, num_layers
    half = L // 2
    rows, names = [], []
    for k in range(num_experts):
        for name, pairs in (
            (f"theta 0-{L - 2} + expert{k} {L - 1}", [(merged, l) for l in range(L - 1)] + [(k, L - 1)]),
            (f"expert{k} 0-{L - 2} + theta {L - 1}", [(k, l) for l in range(L - 1)] + [(merged, L - 1)]),
            (f"expert{k} 0-{half - 1} + theta {half}-{L - 1}", [(k, l) if l < half else (merged, l) for l in range(L)]),
            (f"theta 0-{half - 1} + expert{k} {half}-{L - 1}", [(merged, l) if l < half else (k, l) for l in range(L)]),
        ):  # fmt: skip
            rows.append(models.path_from_pairs(pairs, L, t_max))
            names.append(name)
    return np.stack(rows), names


def identity_rows(num_sources: int, num_layers: int, t_max: int) -> np.ndarray:
    return np.stack([models.identity_path(num_layers, t_max, source=m) for m in range(num_sources)])


def preferences(run_dir: str | None, num_tasks: int, key) -> np.ndarray:
    stage = os.path.join(run_dir or "", "stages", "preferences.json")
    if run_dir and os.path.exists(stage):
        with open(stage) as f:
            prefs = np.asarray(json.load(f), np.float64)
    else:
        prefs = np.asarray(jax.random.dirichlet(key, np.ones(num_tasks), (15,)), np.float64)
    balanced = np.full((1, num_tasks), 1.0 / num_tasks)
    if not np.any(np.all(np.isclose(prefs, balanced), axis=1)):
        prefs = np.concatenate([balanced, prefs])
    return prefs


def summarise(scores: dict, ideal: np.ndarray, prefs: np.ndarray, groups: dict, tasks: list) -> dict:
    """scores[mode] raw [n, K] -> the per-split summary described in the module docstring."""
    norm = {m: s / ideal for m, s in scores.items()}
    weighted = {m: n @ prefs.T for m, n in norm.items()}  # [n, num_prefs]
    mean_by_path = np.stack([weighted[m].mean(axis=1) for m in MODES])  # [modes, n]
    per_pair = np.stack([weighted[m] for m in MODES])  # [modes, n, num_prefs]

    def wins(values):  # values [modes, ...] -> counts of the best mode, exact ties apart
        best = values.max(axis=0)
        is_best = values == best
        ties = is_best.sum(axis=0) > 1
        out = {m: int((is_best[i] & ~ties).sum()) for i, m in enumerate(MODES)}
        out["tie"] = int(ties.sum())
        return out

    means = {m: float(weighted[m].mean()) for m in MODES}
    return {
        "mean_weighted_score": means,
        "mean_weighted_score_by_group": {
            g: {m: float(weighted[m][idx].mean()) for m in MODES} for g, idx in groups.items()
        },
        "mean_normalised_score": {
            m: dict(zip(tasks, norm[m].mean(axis=0).round(4).tolist(), strict=True)) for m in MODES
        },
        "best_mode_per_path": wins(mean_by_path),
        "best_mode_per_path_preference": wins(per_pair),
        "winner": max(means, key=means.get),
    }


def main(argv=None) -> dict:
    """Parses `argv` (default sys.argv), runs, prints one JSON object and returns it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", default="runs/tiny3/zoo")
    parser.add_argument("--run", default="runs/tiny3_v2", help="HM3 run dir (param_level.json, preferences)")
    parser.add_argument("--archive", default="", help="score_archive.npz (default: RUN's, else runs/tiny3's)")
    parser.add_argument("--num_policy_paths", type=int, default=24)
    parser.add_argument("--t_max", type=int, default=0, help="the archive's paths' T_max (default: theirs)")
    parser.add_argument("--calib_rows_per_task", type=int, default=16)
    parser.add_argument("--learned_steps", type=int, default=150)
    parser.add_argument("--learned_random_paths", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tests: 4 paths of each kind, 2 fit steps")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_policy_paths, args.calib_rows_per_task, args.learned_steps, args.learned_random_paths = (
            4,
            4,
            2,
            4,
        )
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    run_dir = args.run if os.path.isdir(args.run) else None
    setup = path_eval.zoo_setup(args.zoo, run_dir, None)  # None: the whole search split
    config, K, L = setup.config, len(setup.experts), setup.config.num_layers
    pool_size = models.pool_size(setup.pool)
    key_pref, key_fit, key_rand = jax.random.split(jax.random.PRNGKey(args.seed), 3)

    archive = args.archive or path_eval.find_archive(run_dir)
    if not archive:
        raise FileNotFoundError("no score archive found: pass --archive (a run's arch/hm3/score_archive.npz)")
    policy = path_eval.archive_paths(archive, pool_size)[: args.num_policy_paths]
    args.t_max = args.t_max or policy.shape[1]
    if policy.shape[1] != args.t_max:
        raise ValueError(f"archive paths have T_max={policy.shape[1]}, --t_max={args.t_max}")
    cross, cross_names = cross_source_paths(K, L, args.t_max)
    ident = identity_rows(K + 1, L, args.t_max)
    paths = np.concatenate([policy, cross, ident])
    n_p, n_c = len(policy), len(cross)
    groups = {
        "policy": np.arange(n_p),
        "cross_source": np.arange(n_p, n_p + n_c),
        "identity": np.arange(n_p + n_c, len(paths)),
    }

    # alignment, fitted on the search split only
    ids, mask = calibration(setup, args.calib_rows_per_task, setup.tokenizer.pad_token_id)
    source_shells = [models.shell_of(e) for e in setup.experts] + [setup.shell]
    t0 = time.perf_counter()
    stats = alignment.native_stats(config, source_shells, setup.pool, ids, mask)
    stats_s = time.perf_counter() - t0
    rand = np.asarray(jax.random.randint(key_rand, (args.learned_random_paths, args.t_max), -1, pool_size))
    train_paths = np.concatenate([paths, rand]).astype(np.int32)
    t0 = time.perf_counter()
    learned, losses = alignment.fit_learned(
        key_fit, config, setup.shell, setup.pool, stats, ids, train_paths, mask, shell_source=K,
        num_steps=args.learned_steps, batch_paths=8,
    )  # fmt: skip
    fit_s = time.perf_counter() - t0
    aligners = {
        mode: alignment.make_aligner(
            mode,
            config,
            setup.shell,
            setup.pool,
            stats=stats,
            calib_ids=ids,
            calib_mask=mask,
            shell_source=K,
            learned_params=learned,
        )  # fmt: skip
        for mode in MODES
    }
    t0 = time.perf_counter()
    junctions = {mode: a.junctions(paths) for mode, a in aligners.items()}
    junction_s = time.perf_counter() - t0

    prefs = preferences(run_dir, K, key_pref)
    out_splits = {}
    eval_s = {}
    for split in ("search", "heldout"):
        engine = make_engine(
            config, setup.shell, setup.pool, setup.objectives[split], strategy="map", pool_id=split
        )
        t0 = time.perf_counter()
        scores = {m: engine.evaluate(paths, junctions[m]).scores for m in MODES}
        eval_s[split] = time.perf_counter() - t0
        ident_scores = scores["none"][groups["identity"]]  # [K + 1, K]: the sources themselves
        ideal = np.maximum(ident_scores.max(axis=0), 1e-9)
        summary = summarise(scores, ideal, prefs, groups, setup.tasks)
        summary["ideal_point"] = dict(zip(setup.tasks, ideal.round(4).tolist(), strict=True))
        summary["raw_scores_cross_source"] = {
            name: {m: scores[m][n_p + i].round(3).tolist() for m in MODES}
            for i, name in enumerate(cross_names)
        }
        out_splits[split] = summary

    out = {
        "data": setup.source,
        "merged_model": setup.merged_source,
        "archive": archive,
        "num_paths": {g: int(len(i)) for g, i in groups.items()},
        "num_preferences": int(len(prefs)),
        "calibration": {"rows": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "split": "search"},
        "learned_fit": {
            "steps": args.learned_steps,
            "train_paths": int(len(train_paths)),
            "loss_first": float(losses[0]),
            "loss_last": float(losses[-1]),
            "seconds": fit_s,
        },  # fmt: skip
        "seconds": {
            "native_stats": stats_s,
            "learned_fit": fit_s,
            "junctions": junction_s,
            "evaluate": eval_s,
            "total": time.perf_counter() - start,
        },  # fmt: skip
        "search": out_splits["search"],
        "heldout": out_splits["heldout"],
        "winner_heldout": out_splits["heldout"]["winner"],
        "winner_search": out_splits["search"]["winner"],
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
