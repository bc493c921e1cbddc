"""Does the architecture level have real headroom over Theta(lambda)? Re-scores a finished run's best paths.

For every preference of a finished HM3 run, the `--top` best paths of the RL's score archive (by the RL reward on
the capped search subset the search saw) are re-scored on the WHOLE search split and on the held-out split,
together with Theta(lambda)'s identity path. Prints one JSON object: per preference the reward of Theta and of
the best other archive path on the subset, on the whole search split and held-out, and the mean gains. A path that
beats Theta on the whole search split AND held-out is headroom a better search could find; a gain on the subset
only is the winner's curse.

    .venv/bin/python benchmarks/arch_headroom.py --run=runs/tiny3 --top=10     # after `make demo-full`
    .venv/bin/python benchmarks/arch_headroom.py --run=runs/tiny3_v5 --top=10  # the run docs/headroom.md reports

The run's zoo is `--zoo` (default RUN/zoo, where `make demo-full` builds it), its sources' scores the run's
own (stages/source_scores.json). A run that scores its searches on the whole search split (no
`engine.search_examples`, e.g. the smoke config) has no separate capped subset: "search_full" is its "search".

`--neighbourhood`: instead of the RL's archive, EVERY path one edit away from Theta(lambda)'s identity path
(`neighbourhood.neighbours(theta, K + 1, L, t_min, t_max)`: a block swapped for another source's block at the same
layer, a step deleted or repeated, a block replaced by its neighbouring layer of the same source) is scored on the
whole search split ("search_full") and on the held-out split, per preference, under the RL reward
`sum_k lambda_k f_k / z*_k - beta1 T / T_max` (`hm3_jax.arch.env.host_reward`, config.arch.rl's beta1 and t_max; z* the
split's ideal point). Scores come from per-example statistics computed with the engine's jitted kernels
(`scoring.path_device_scores`, then `Objective.example_fn`: 0/1 correctness or chrF sentence statistics), so the
same evaluation also gives the noise: the standard error of a path's reward difference to Theta, from
`--bootstrap` paired resamples of each split's examples (the same resampled examples for the path and Theta;
z* fixed). For the 0/1-mean tasks (`bootstrap.MEAN_METRICS`: exact match, generated exact match, multiple
choice, accuracy) it is checked against the closed form `100 sd(x_path - x_theta) / sqrt(n)`.
Checks: Theta's held-out scores equal report.json's hm3_no_arch_level points, and its whole-search-split
scores equal those the run's confirmation step recorded (stages/hm3.json) where it recorded them.
Writes `--plot` (gains on search_full vs held-out, with 2 SE) and prints one JSON object; the summary also gives
per edit type (source swap, deletion, repeat, neighbouring layer) the median gain and how many beat Theta.

    .venv/bin/python benchmarks/arch_headroom.py --run=runs/tiny3 --neighbourhood

`--alignment=moment` (with `--neighbourhood`): every path is scored with HM3's moment junction alignment
(`hm3_jax.paths.alignment`, closed-form per-dimension scale and shift before every junction between blocks that
are not native neighbours), whatever the run itself used. The aligners are built exactly as `pipeline.run.run_hm3`
builds them for `arch.alignment="moment"`: one per preference from `arch_level.make_aligners` over that
preference's shell and pool, calibrated on `run.calibration_inputs` (32 rows of the capped search split), shell
source K (Theta's embeddings), and the SAME aligner for search_full and held-out (junctions are fitted on search
data, then fixed). A path's junction is `aligner.junctions(paths)[row]` and the per-example evaluation runs with
it. Theta's identity path has no junction between different sources, so its junction must be the identity
(scale exactly 1, shift exactly 0; checked) and its per-example statistics must equal those without a junction
(checked, recorded as `theta_same_with_identity_junction`).

    .venv/bin/python benchmarks/arch_headroom.py --run=runs/tiny3_v5 --neighbourhood --alignment=moment

`--insertions` adds the paths of L + 1 steps that depth up-scaling makes: Theta's identity path with expert m's
block l inserted after Theta's block l (K L of them; edit type "insertion"). `--two_edit_sample=N` also scores,
per preference, N two-edit paths: the one-edit neighbours of the `--two_edit_top` one-edit paths best on
search_full (deduplicated, Theta and the one-edit set left out), N of them drawn uniformly (seed `--seed` +
preference index); reported under "two_edit" with the same gains, SEs and counts.

Without a run (`--run` a directory holding only `zoo/`, or `--zoo`): the preferences and Theta(lambda) are the
run's first two stages, computed here as `run.run_hm3` computes them (same keys, `param_level.run_param_level`)
and cached as RUN/headroom_param_level.json; the sources are scored by `make_problem`; the checks against
report.json and stages/hm3.json are skipped (recorded in "checks"). The deep tiny3 zoo (issue 20,
docs/headroom.md):

    .venv/bin/python -m experiments.build_zoo --config=experiments/configs/tiny3.py:deep --workdir=/tmp/deep3/zoo
    .venv/bin/python benchmarks/arch_headroom.py --run=/tmp/deep3 --config=experiments/configs/tiny3.py:deep \
        --neighbourhood --insertions --two_edit_sample=40 --preferences=0,1,2,3,4 \
        --plot=/tmp/deep3/headroom/neighbourhood.png --out=/tmp/deep3/headroom/neighbourhood.json
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def _setup(args):
    """The run's config, zoo, Problem, preferences, Theta(lambda) per preference, shells and pools.

    Builds the Problem with `make_problem` from the run's zoo (its fingerprint checked against the config) rather
    than through `run.setup`, which would also check the whole run config's fingerprint against the run's
    run.json: this script only reads the run, so later config additions outside the zoo (e.g. new `arch.*`
    settings) must not lock it out. Nothing is written into a run directory.

    A `--run` directory without a run (no stages/param_level.json: a zoo only, e.g. the deep tiny3 zoo) gets the
    run's first two stages computed here, exactly as `run.run_hm3` computes them (`_parameter_level`), and cached
    in the directory as headroom_param_level.json (reused when its zoo fingerprint and settings match).
    """
    from hm3_jax.pipeline import run as run_lib
    from hm3_jax.pipeline.workdir import stage_file
    from hm3_jax.search.problem import make_problem
    from hm3_jax.tasks import zoo as zoo_lib

    config = _config(args.config)
    zoo_dir = args.zoo or os.path.join(args.run, "zoo")
    zoo = zoo_lib.load_matching(config.zoo, zoo_dir)
    has_run = os.path.isfile(os.path.join(args.run, "stages", "param_level.json"))
    source_scores = None  # without a run: the sources scored by make_problem, with the run's engine
    if has_run:
        with open(stage_file(args.run, "source_scores")) as f:
            source_scores = json.load(f)  # the run's, computed by the same engine: not re-scored here
    problem = make_problem(
        zoo, config.engine.strategy, config.engine.chunk_size, config.engine.prefix_sharing,
        search_examples=config.engine.get("search_examples") or None, source_scores=source_scores,
    )  # fmt: skip
    if "search_full" not in problem.objectives:  # the run scores the whole search split: "search" is it
        problem = problem._replace(**{
            f: {**getattr(problem, f), "search_full": getattr(problem, f)["search"]}
            for f in ("objectives", "source_scores", "ideal", "engines")
        })  # fmt: skip
    if has_run:
        with open(os.path.join(args.run, "stages", "param_level.json")) as f:
            param = json.load(f)
    else:
        chosen = [int(i) for i in getattr(args, "preferences", "").split(",") if i.strip()]
        param = _parameter_level(args.run, config, zoo, problem, max(chosen) + 1 if chosen else None)
    prefs = np.asarray([e["preference"] for e in param], np.float32)
    variant = config.param_level.pool_model if config.param_level.cmaes.enabled else "paper"
    bank = run_lib.preference_models(problem, param, variant)
    shells, pools = bank.shells, bank.pools
    return config, zoo, problem, prefs, shells, pools, has_run


def _parameter_level(run_dir: str, config, zoo, problem, num: int | None = None) -> list[dict]:
    """Without a run: the preferences and the parameter level's entries as `run.run_hm3` makes them (the same
    keys: `PRNGKey(config.seed)` split in 5, the first for the preferences, the second for the parameter level),
    cached as RUN/headroom_param_level.json keyed by the zoo fingerprint and the preference / parameter-level
    settings. `num`: only the first `num` preferences (the parameter level costs about a minute per preference
    on tiny3's full config); `run_param_level` then splits its key in `num`, not N, so their merges' DARE draws
    differ from a run's with all N (same preferences, same settings). A cache of more preferences is reused."""
    import jax

    from hm3_jax.pipeline import run_config
    from hm3_jax.search import param_level

    want = {"zoo_fingerprint": zoo.manifest["fingerprint"], "seed": int(config.seed),
            "preferences": config.preferences.to_dict(), "param_level": config.param_level.to_dict(),
            "search_examples": config.engine.get("search_examples") or 0, "num": num}  # fmt: skip
    want = json.loads(json.dumps(want))  # tuples as lists, as read back
    path = os.path.join(run_dir, "headroom_param_level.json")
    if os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
        have = cached["settings"].pop("num")  # a cache of more preferences serves fewer (its first ones)
        if {**want, "num": None} == {**cached["settings"], "num": None} and (
            have is None or (num is not None and have >= num)
        ):
            return cached["entries"]
    k_pref, k_param, *_ = jax.random.split(jax.random.PRNGKey(config.seed), 5)
    prefs = run_config.make_preferences(config.preferences, problem.num_tasks, k_pref)[:num]
    entries = param_level.run_param_level(problem, prefs, k_param, config.param_level)
    os.makedirs(run_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"settings": want, "entries": entries}, f)
    os.replace(path + ".tmp", path)
    return entries


def _config(spec: str):
    """`path/to/config.py[:variant]` -> the ConfigDict (tiny3 only: the run's benchmark)."""
    from experiments.configs import tiny3

    path, _, variant = spec.partition(":")
    if os.path.basename(path) != "tiny3.py":
        raise ValueError(f"--config must be experiments/configs/tiny3.py[:variant], got {spec!r}")
    return tiny3.get_config(variant or None)


def _example_stats(problem, shell, pool, path, split: str, junction=None):
    """Per task the per-example statistics of one path on `split` (`Objective.example_fn`: [N] bool, or [N, S]
    chrF statistics) and the full-split scores [K] they give (the engine's kernels:
    `scoring.path_device_scores`); `junction` None or {"scale", "shift": [T_max, D]} (`models.apply_path`)."""
    import jax.numpy as jnp

    from hm3_jax.moo import bootstrap
    from hm3_jax.tasks import scoring

    stats, scores = [], []
    for obj in problem.objectives[split]:
        raw = np.asarray(
            scoring.path_device_scores(problem.config, shell, pool, jnp.asarray(path), junction, obj)
        )
        st = obj.example_fn(raw)
        stats.append(st)
        scores.append(bootstrap.full_score(st, obj.metric))
    return stats, np.asarray(scores, np.float64)


# `neighbourhood.neighbours` arguments for the one-edit set measured here: the neighbourhood before issue 20 (source
# swaps, deletions, repeats, neighbouring layers; `--insertions` adds `insertions`), kind by kind.
ONE_EDIT = {"kinds": ("swap", "delete", "repeat", "layer"), "order": "by_kind"}


def insertions(theta, num_experts: int, num_layers: int, t_max: int) -> np.ndarray:
    """[K L, T_max] Theta's identity path with one expert block inserted after Theta's block of the same layer
    (`theta` = [K L, ..., K L + L - 1]; expert m's block l goes in after step l), as depth up-scaling inserts
    blocks: paths of L + 1 steps that `neighbourhood.neighbours` (which only repeats Theta's own) does not make."""
    steps = [int(a) for a in theta if a >= 0]
    if len(steps) >= t_max:
        return np.zeros((0, t_max), np.int32)
    rows = [steps[: l + 1] + [m * num_layers + l] + steps[l + 1 :] for m in range(num_experts)
            for l in range(num_layers)]  # fmt: skip
    return np.asarray([r + [-1] * (t_max - len(r)) for r in rows], np.int32)


def two_edits(one_edit: np.ndarray, gains: np.ndarray, top: int, sample: int, seed: int, num_sources: int,
              num_layers: int, t_min: int, t_max: int, exclude: np.ndarray) -> np.ndarray:  # fmt: skip
    """[<= sample, T_max] two-edit paths: the one-edit neighbours (`neighbourhood.neighbours`) of the `top`
    one-edit paths with the highest `gains` (the two-edit paths a greedy search would see next), without the
    paths in `exclude` (Theta and the one-edit set), deduplicated, then `sample` of them drawn uniformly
    (numpy `default_rng(seed)`; all if fewer)."""
    from hm3_jax.search import neighbourhood as neighbourhood_lib

    seen = {tuple(int(x) for x in r) for r in exclude}
    rows = []
    for j in np.argsort(-gains, kind="stable")[:top]:
        for c in neighbourhood_lib.neighbours(one_edit[j], num_sources, num_layers, t_min, t_max, **ONE_EDIT):
            if tuple(int(x) for x in c) not in seen:
                seen.add(tuple(int(x) for x in c))
                rows.append(c)
    rows = np.asarray(rows, np.int32).reshape(-1, exclude.shape[1])
    if len(rows) > sample:
        rows = rows[np.sort(np.random.default_rng(seed).choice(len(rows), sample, replace=False))]
    return rows


def _score_paths(
    problem, shell, pool, cands, junc, pref, split: str, idx, metrics, rl, se_check, bar
) -> dict:
    """Rewards of `cands` [P, T_max] (row 0 = Theta) on `split`, and of rows 1: their gain over Theta with the
    SE of that gain from paired bootstrap resamples `idx` (z* fixed); `junc` None or {"scale", "shift": [P,
    T_max, D]}. Appends bootstrap / closed-form SE ratios of the 0/1-mean tasks to `se_check`."""
    from hm3_jax.arch import env as env_lib
    from hm3_jax.moo import bootstrap

    z = np.asarray(problem.ideal[split], np.float64)
    lengths = (cands >= 0).sum(-1)
    scores, res, extra = [], [], {}  # [P, K], [P, B, K]
    for c, path in enumerate(cands):
        j = None if junc is None else {"scale": junc["scale"][c], "shift": junc["shift"][c]}
        stats, sc = _example_stats(problem, shell, pool, path, split, j)
        if c == 0 and j is not None:  # the identity junction must not change Theta's outputs
            plain, _ = _example_stats(problem, shell, pool, path, split)
            extra["theta_same_with_identity_junction"] = all(
                np.array_equal(a, b) for a, b in zip(stats, plain, strict=True)
            )
        scores.append(sc)
        res.append(np.stack([bootstrap.resampled_scores(st, m, ix)
                             for st, m, ix in zip(stats, metrics, idx, strict=True)], -1))  # fmt: skip
        if c == 0:
            theta_stats = stats
        else:  # closed-form SE of the 0/1-mean score differences, against the bootstrap's
            for k, m in enumerate(metrics):
                if m in bootstrap.MEAN_METRICS:
                    d = stats[k].astype(np.float64) - theta_stats[k].astype(np.float64)
                    closed = 100 * d.std(ddof=1) / np.sqrt(len(d))
                    boot = float(np.std(res[-1][:, k] - res[0][:, k], ddof=1))
                    if closed > 0:
                        se_check.append(boot / closed)
        bar.update()
    scores, res = np.stack(scores), np.stack(res)
    reward = env_lib.host_reward(scores / z, pref, lengths, rl.beta1, rl.t_max)  # [P]
    gain = reward[1:] - reward[0]
    # paired resampled reward differences [M, B]; the length term is deterministic
    diff = ((res[1:] - res[:1]) / z) @ np.asarray(pref, np.float64)
    diff = env_lib.length_penalised(diff, lengths[1:, None] - lengths[0], rl.beta1, rl.t_max)
    se = diff.std(1, ddof=1)
    return {"theta_scores": scores[0].tolist(), "theta_reward": float(reward[0]),
            "gains": gain.tolist(), "se": se.tolist(),
            "num_beat_theta": int((gain > 0).sum()),
            "num_beat_by_2se": int((gain > 2 * se).sum()),
            "best_gain": float(gain.max()) if len(gain) else None,
            "best_path": cands[1 + int(gain.argmax())].tolist() if len(gain) else None,
            "median_se": float(np.median(se)) if len(se) else None, **extra}  # fmt: skip


def neighbourhood(args) -> dict:
    """`--neighbourhood` (see the module docstring): the one-edit neighbourhood of Theta(lambda) per preference,
    with `--insertions` and `--two_edit_sample` the longer paths and two-edit paths too."""
    from tqdm.auto import tqdm

    from hm3_jax.moo import bootstrap
    from hm3_jax.pipeline import run as run_lib
    from hm3_jax.search import arch_level, path_confirmation
    from hm3_jax.search import neighbourhood as neighbourhood_lib

    config, zoo, problem, prefs, shells, pools, has_run = _setup(args)
    K, L, rl = problem.num_tasks, problem.config.num_layers, config.arch.rl
    aligners = None  # as run.run_hm3 builds them; one per preference, for search_full and held-out alike
    if args.alignment == "moment":
        ids, mask = run_lib.calibration_inputs(problem, zoo)
        aligners = arch_level.make_aligners(problem, "moment", shells, pools, ids, mask, shell_source=K)
    no_arch = hm3_stage = None
    if has_run:
        with open(os.path.join(args.run, "report.json")) as f:
            no_arch = json.load(f)["methods"]["hm3_no_arch_level"]
        with open(os.path.join(args.run, "stages", "hm3.json")) as f:
            hm3_stage = json.load(f)["per_preference"]
    theta = path_confirmation.identity_paths(K + 1, L, rl.t_max)[K]
    # the neighbourhood before issue 20 (HM3's own now also inserts): the tables in docs/headroom.md
    neigh = neighbourhood_lib.neighbours(theta, K + 1, L, rl.t_min, rl.t_max, **ONE_EDIT)  # [M, T_max]
    edit_types = [_edit_type(theta, n, L) for n in neigh]
    if args.insertions:
        ins = insertions(theta, K, L, rl.t_max)
        neigh = np.concatenate([neigh, ins])
        edit_types += ["insertion"] * len(ins)
    cands = np.concatenate([theta[None], neigh])  # row 0 = Theta
    splits = ("search_full", "heldout")
    idx, metrics = {}, {}
    for s in splits:
        objs = problem.objectives[s]
        idx[s] = bootstrap.resample_indices(args.seed, [o.num_examples for o in objs], args.bootstrap)
        metrics[s] = [o.metric for o in objs]
    chosen = [int(i) for i in args.preferences.split(",") if i.strip()] or list(range(len(prefs)))
    if any(not 0 <= i < len(prefs) for i in chosen):
        raise ValueError(f"--preferences {args.preferences!r}: the run has {len(prefs)} preferences")
    rows, se_check = [], []
    per_pref = len(cands) + (1 + args.two_edit_sample if args.two_edit_sample else 0)
    bar = tqdm(total=len(chosen) * per_pref * len(splits), desc="neighbourhood paths", mininterval=5.0)
    for i in chosen:
        pref = prefs[i]
        out = {"index": i, "preference": pref.tolist(), "num_neighbours": int(len(neigh))}
        junc = (
            None if aligners is None else aligners[i].junctions(cands)
        )  # [P, T_max, D] each, fixed per path
        if junc is not None:
            # a junction step is one the aligner did not leave at the identity (scale 1, shift 0)
            active = (junc["scale"] != 1.0).any(-1) | (junc["shift"] != 0.0).any(-1)  # [P, T_max]
            out["num_junctions"] = active.sum(-1)[1:].tolist()
            if active[0].any():
                raise RuntimeError(
                    f"preference {i}: Theta's identity path got a non-identity junction at steps "
                    f"{np.nonzero(active[0])[0].tolist()} (it has no junction between different sources)"
                )
            out["theta_junction_max_abs_dev"] = [float(np.abs(junc["scale"][0] - 1).max()),
                                                 float(np.abs(junc["shift"][0]).max())]  # fmt: skip
        same = {}
        for s in splits:
            out[s] = _score_paths(problem, shells[i], pools[i], cands, junc, pref, s, idx[s], metrics[s], rl,
                                  se_check, bar)  # fmt: skip
            if "theta_same_with_identity_junction" in out[s]:
                same[s] = out[s].pop("theta_same_with_identity_junction")
        if same:
            out["theta_same_with_identity_junction"] = same
        if has_run:
            _check_theta(out, i, pref, no_arch, hm3_stage[i], theta)
        gf, gh = np.asarray(out["search_full"]["gains"]), np.asarray(out["heldout"]["gains"])
        sf, sh = np.asarray(out["search_full"]["se"]), np.asarray(out["heldout"]["se"])
        b = int(gf.argmax())  # select on the whole search split, test on held-out
        out.update({
            "num_beat_theta_on_both": int(((gf > 0) & (gh > 0)).sum()),
            "num_beat_by_2se_on_both": int(((gf > 2 * sf) & (gh > 2 * sh)).sum()),
            "selected_on_search_full": {"path": neigh[b].tolist(), "gain_search_full": float(gf[b]),
                                        "se_search_full": float(sf[b]), "gain_heldout": float(gh[b]),
                                        "se_heldout": float(sh[b]), "z_heldout": float(gh[b] / sh[b])},
        })  # fmt: skip
        if args.two_edit_sample:
            two = two_edits(neigh, gf, args.two_edit_top, args.two_edit_sample, args.seed + i, K + 1, L,
                            rl.t_min, rl.t_max, cands)  # fmt: skip
            tc = np.concatenate([theta[None], two])
            tj = None if aligners is None else aligners[i].junctions(tc)
            t_out = {"paths": two.tolist()}
            for s in splits:
                t_out[s] = _score_paths(problem, shells[i], pools[i], tc, tj, pref, s, idx[s], metrics[s], rl,
                                        se_check, bar)  # fmt: skip
                t_out[s].pop("theta_same_with_identity_junction", None)
            bar.update((args.two_edit_sample - len(two)) * len(splits))
            g2f, g2h = np.asarray(t_out["search_full"]["gains"]), np.asarray(t_out["heldout"]["gains"])
            s2f, s2h = np.asarray(t_out["search_full"]["se"]), np.asarray(t_out["heldout"]["se"])
            t_out["num_beat_theta_on_both"] = int(((g2f > 0) & (g2h > 0)).sum())
            t_out["num_beat_by_2se_on_both"] = int(((g2f > 2 * s2f) & (g2h > 2 * s2h)).sum())
            if len(two):
                b2 = int(g2f.argmax())
                t_out["selected_on_search_full"] = {
                    "path": two[b2].tolist(), "gain_search_full": float(g2f[b2]), "se_search_full": float(s2f[b2]),
                    "gain_heldout": float(g2h[b2]), "se_heldout": float(s2h[b2])}  # fmt: skip
            out["two_edit"] = t_out
        rows.append(out)
    bar.close()

    def mean(f):
        return float(np.mean([f(r) for r in rows]))

    sel = [r["selected_on_search_full"] for r in rows]
    summary = {
        "num_neighbours": mean(lambda r: r["num_neighbours"]),
        "num_beat_theta_search_full": mean(lambda r: r["search_full"]["num_beat_theta"]),
        "num_beat_theta_heldout": mean(lambda r: r["heldout"]["num_beat_theta"]),
        "num_beat_theta_both": mean(lambda r: r["num_beat_theta_on_both"]),
        "num_beat_by_2se_search_full": mean(lambda r: r["search_full"]["num_beat_by_2se"]),
        "num_beat_by_2se_heldout": mean(lambda r: r["heldout"]["num_beat_by_2se"]),
        "num_beat_by_2se_both": mean(lambda r: r["num_beat_by_2se_on_both"]),
        "best_gain_search_full": mean(lambda r: r["search_full"]["best_gain"]),
        "best_gain_heldout": mean(lambda r: r["heldout"]["best_gain"]),
        "selected_gain_search_full": float(np.mean([s["gain_search_full"] for s in sel])),
        "selected_gain_heldout": float(np.mean([s["gain_heldout"] for s in sel])),
        "selected_positive_on_heldout": int(sum(s["gain_heldout"] > 0 for s in sel)),
        "selected_heldout_gain_over_2se": int(sum(s["gain_heldout"] > 2 * s["se_heldout"] for s in sel)),
        "median_se_search_full": float(np.median([x for r in rows for x in r["search_full"]["se"]])),
        "median_se_heldout": float(np.median([x for r in rows for x in r["heldout"]["se"]])),
        "theta_reward_search_full": mean(lambda r: r["search_full"]["theta_reward"]),
        "theta_reward_heldout": mean(lambda r: r["heldout"]["theta_reward"]),
        "by_edit_type": edit_type_summary(rows, edit_types),
    }
    if args.two_edit_sample:
        two_rows = [r["two_edit"] for r in rows if r["two_edit"]["paths"]]
        summary["two_edit"] = {
            "num_paths": float(np.mean([len(r["two_edit"]["paths"]) for r in rows])),
            **{f"{k}_{s}": float(np.mean([t[s][k] for t in two_rows]))
               for k in ("num_beat_theta", "num_beat_by_2se", "best_gain") for s in splits},
            "num_beat_theta_both": float(np.mean([t["num_beat_theta_on_both"] for t in two_rows])),
            "num_beat_by_2se_both": float(np.mean([t["num_beat_by_2se_on_both"] for t in two_rows])),
            "median_gain_search_full": float(np.median([g for t in two_rows for g in t["search_full"]["gains"]])),
            "median_gain_heldout": float(np.median([g for t in two_rows for g in t["heldout"]["gains"]])),
            "selected_gain_search_full": float(np.mean([t["selected_on_search_full"]["gain_search_full"]
                                                        for t in two_rows])),
            "selected_gain_heldout": float(np.mean([t["selected_on_search_full"]["gain_heldout"]
                                                    for t in two_rows])),
        }  # fmt: skip
    if aligners is not None:
        summary["theta_same_with_identity_junction"] = all(
            all(r["theta_same_with_identity_junction"].values()) for r in rows
        )
    if args.plot:
        _plot_neighbourhood(rows, args.plot, args.alignment, f"tiny3 (L={L})")
    return {
        "run": args.run, "config": args.config, "has_run": has_run, "mode": "neighbourhood",
        "alignment": args.alignment, "run_alignment": config.arch.alignment, "edit_types": edit_types,
        "beta1": rl.beta1, "t_max": rl.t_max, "t_min": rl.t_min, "num_layers": L,
        "theta_path": theta.tolist(), "neighbours": neigh.tolist(), "bootstrap_samples": args.bootstrap,
        "two_edit_top": args.two_edit_top, "two_edit_sample": args.two_edit_sample,
        "examples_per_task": {s: [o.num_examples for o in problem.objectives[s]] for s in splits},
        "mean_over_preferences": summary,
        "se_check_mean_metrics_bootstrap_over_closed_form": {
            "n": len(se_check), "mean": float(np.mean(se_check)) if se_check else None,
            "min": float(np.min(se_check)) if se_check else None, "max": float(np.max(se_check)) if se_check else None},
        "checks": "Theta's held-out scores == report.json hm3_no_arch_level points (1e-3); Theta's search_full "
                  "scores == stages/hm3.json confirm full_search where recorded (1e-3)" if has_run else
                  "no run: Theta(lambda) is the parameter level computed here (headroom_param_level.json); "
                  "nothing to check it against",
        "plot": args.plot or None,
        "per_preference": rows,
    }  # fmt: skip


def _edit_type(theta, cand, num_layers: int) -> str:
    """Which one-edit move turns `theta` into `cand` (both [T_max], -1 padded; `neighbourhood.neighbours`' edits):
    "swap" (same layer, another source), "neighbouring_layer" (same source, layer +-1), "deletion", "repeat"."""
    a, b = [int(x) for x in theta if x >= 0], [int(x) for x in cand if x >= 0]
    if len(b) == len(a) - 1:
        return "deletion"
    if len(b) == len(a) + 1:
        return "repeat"
    diff = [t for t in range(len(a)) if a[t] != b[t]] if len(a) == len(b) else []
    if len(diff) != 1:
        raise ValueError(f"{b} is not one edit away from {a}")
    (ma, la), (mb, lb) = divmod(a[diff[0]], num_layers), divmod(b[diff[0]], num_layers)
    if la == lb:
        return "swap"
    if ma == mb and abs(la - lb) == 1:
        return "neighbouring_layer"
    raise ValueError(f"{b} is not one edit away from {a}")


def edit_type_summary(rows: list, edit_types: list[str]) -> dict:
    """Per edit type and split, over every preference x neighbour of that type: count, median / min / max gain
    over Theta, how many beat Theta, by more than 2 SE, and on both splits (`rows`: `neighbourhood`'s)."""
    types = np.asarray(edit_types)
    out = {}
    for t in dict.fromkeys(edit_types):
        sel = types == t
        g = {
            s: np.concatenate([np.asarray(r[s]["gains"])[sel] for r in rows])
            for s in ("search_full", "heldout")
        }
        se = {
            s: np.concatenate([np.asarray(r[s]["se"])[sel] for r in rows]) for s in ("search_full", "heldout")
        }
        out[t] = {"count": int(g["heldout"].size),
                  **{s: {"median_gain": float(np.median(g[s])), "min_gain": float(g[s].min()),
                         "max_gain": float(g[s].max()), "num_beat_theta": int((g[s] > 0).sum()),
                         "num_beat_by_2se": int((g[s] > 2 * se[s]).sum())} for s in g},
                  "num_beat_theta_on_both": int(((g["search_full"] > 0) & (g["heldout"] > 0)).sum()),
                  "num_beat_by_2se_on_both": int(((g["search_full"] > 2 * se["search_full"])
                                                  & (g["heldout"] > 2 * se["heldout"])).sum())}  # fmt: skip
    return out


def _check_theta(out: dict, i: int, pref, no_arch: dict, stage: dict, theta) -> None:
    """Theta's re-scores against the run's own numbers (an independent code path: the engine)."""
    d = np.abs(np.asarray(no_arch["preferences"], np.float64) - np.asarray(pref, np.float64)).sum(1)
    j = int(d.argmin())
    if d[j] > 1e-4:
        raise RuntimeError(f"preference {i} is not among report.json's hm3_no_arch_level preferences")
    got, want = np.asarray(out["heldout"]["theta_scores"]), np.asarray(no_arch["points"][j])
    if np.max(np.abs(got - want)) > 1e-3:
        raise RuntimeError(f"preference {i}: Theta's held-out scores {got} != report.json's {want}")
    out["check_heldout_vs_report"] = "ok"
    if np.abs(np.asarray(stage["preference"]) - np.asarray(pref)).sum() > 1e-4:
        raise RuntimeError(
            f"stages/hm3.json entry {i} is for preference {stage['preference']}, not {list(pref)}"
        )
    confirm = stage.get("confirm") or {}
    for p, full in zip(confirm.get("paths", []), confirm.get("full_search", []), strict=True):
        if np.array_equal(np.asarray(p), theta):
            got = np.asarray(out["search_full"]["theta_scores"])
            if np.max(np.abs(got - np.asarray(full))) > 1e-3:
                raise RuntimeError(f"preference {i}: Theta's search_full scores {got} != the run's {full}")
            out["check_search_full_vs_confirm"] = "ok"


def _plot_neighbourhood(rows: list, path: str, alignment: str = "none", title: str = "tiny3") -> None:
    """Every neighbour's reward gain over Theta on search_full (x) vs held-out (y); the search_full-selected one
    per preference with 2-SE bars. Written to a temp file, then moved."""
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    gf = np.concatenate([r["search_full"]["gains"] for r in rows])
    gh = np.concatenate([r["heldout"]["gains"] for r in rows])
    ax.scatter(gf, gh, s=6, alpha=0.35, color="grey", label="every one-edit neighbour")
    sel = [r["selected_on_search_full"] for r in rows]
    ax.errorbar([s["gain_search_full"] for s in sel], [s["gain_heldout"] for s in sel],
                xerr=[2 * s["se_search_full"] for s in sel], yerr=[2 * s["se_heldout"] for s in sel],
                fmt="o", ms=4, color="C3", lw=0.8, label="best on search_full per preference (2 SE)")  # fmt: skip
    ax.axhline(0, color="k", lw=0.6)
    ax.axvline(0, color="k", lw=0.6)
    ax.set_xlabel("reward gain over Theta, whole search split")
    ax.set_ylabel("reward gain over Theta, held-out")
    ax.set_title(f"{title}: one-edit neighbourhood of Theta(lambda), alignment {alignment}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a plot is for reading
    os.replace(tmp, path)


def main(argv=None) -> dict:
    """Parses `argv` (default sys.argv), runs, prints one JSON object and returns it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/tiny3_v5")
    parser.add_argument("--config", default="experiments/configs/tiny3.py")
    parser.add_argument("--zoo", default="", help="the run's zoo directory (default RUN/zoo)")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument(
        "--neighbourhood",
        action="store_true",
        help="score every path one edit away from Theta's identity path (see the docstring)",
    )
    parser.add_argument("--bootstrap", type=int, default=400, help="--neighbourhood: paired resamples")
    parser.add_argument("--seed", type=int, default=0, help="--neighbourhood: bootstrap seed")
    parser.add_argument(
        "--preferences", default="", help="--neighbourhood: comma-separated indices (default all)"
    )
    parser.add_argument(
        "--alignment",
        choices=("none", "moment"),
        default="none",
        help="--neighbourhood: junction alignment the paths are scored with (see the docstring)",
    )
    parser.add_argument(
        "--insertions",
        action="store_true",
        help="--neighbourhood: also Theta's path with one expert block inserted after its layer (L + 1 steps)",
    )
    parser.add_argument(
        "--two_edit_sample",
        type=int,
        default=0,
        help="--neighbourhood: also score this many two-edit paths per preference (0 = none; see two_edits)",
    )
    parser.add_argument(
        "--two_edit_top",
        type=int,
        default=3,
        help="--neighbourhood: two-edit paths around the best N one-edit ones",
    )
    parser.add_argument("--out", default="", help="also write the JSON here")
    parser.add_argument(
        "--plot",
        default="",
        help="--neighbourhood plot (default runs/arch_headroom/neighbourhood.png, _moment.png for moment)",
    )
    args = parser.parse_args(argv)  # fmt: skip
    if args.alignment != "none" and not args.neighbourhood:
        parser.error(
            "--alignment applies to --neighbourhood only (the default mode re-scores the run's paths)"
        )
    if not args.plot:
        suffix = "" if args.alignment == "none" else f"_{args.alignment}"
        args.plot = f"runs/arch_headroom/neighbourhood{suffix}.png"

    from absl import logging

    logging.set_verbosity(logging.WARNING)
    if args.neighbourhood:
        out = neighbourhood(args)
        print(json.dumps(out))
        if args.out:
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(out, f)
        return out
    from hm3_jax.arch import env as env_lib
    from hm3_jax.search import path_confirmation, path_scorer

    config, _, problem, prefs, shells, pools, _ = _setup(args)
    K, L, rl = problem.num_tasks, problem.config.num_layers, config.arch.rl
    scorer = {
        s: path_scorer.PathScorer(problem, s, prefs, shells, pools, "headroom")
        for s in ("search_full", "heldout")
    }
    archive = np.load(os.path.join(args.run, "arch", "hm3", "score_archive.npz"))
    theta = path_confirmation.identity_paths(K + 1, L, rl.t_max)[K]
    rows = []
    for i, pref in enumerate(prefs):
        sel = archive["index"] == i
        sel &= ~np.all(
            archive["paths"] == theta[None], axis=1
        )  # Theta itself is the comparison, not a candidate
        paths, sub = archive["paths"][sel], archive["scores"][sel]
        r_sub = env_lib.host_reward(sub, pref, (paths >= 0).sum(-1), rl.beta1, rl.t_max)
        order = np.argsort(-r_sub, kind="stable")[: args.top]
        cands = np.concatenate([theta[None], paths[order]])
        out = {"preference": pref.tolist()}
        for s, sc in scorer.items():
            norm = problem.normalise(sc.raw(i, cands), s)
            out[s] = env_lib.host_reward(norm, pref, (cands >= 0).sum(-1), rl.beta1, rl.t_max).tolist()
        best_full = 1 + int(np.argmax(out["search_full"][1:]))
        rows.append({
            **out,
            "subset_top": r_sub[order].tolist(),
            "theta_full": out["search_full"][0], "theta_heldout": out["heldout"][0],
            "best_full_path": cands[best_full].tolist(),
            "best_full_gain_full": out["search_full"][best_full] - out["search_full"][0],
            "best_full_gain_heldout": out["heldout"][best_full] - out["heldout"][0],
        })  # fmt: skip
    gains_full = [r["best_full_gain_full"] for r in rows]
    gains_held = [r["best_full_gain_heldout"] for r in rows]
    out = {
        "run": args.run, "top": args.top,
        "mean_gain_whole_search_of_best_over_theta": float(np.mean(gains_full)),
        "mean_gain_heldout_of_that_path": float(np.mean(gains_held)),
        "preferences_where_it_beats_theta_on_both": int(sum(g > 0 and h > 0 for g, h in zip(gains_full, gains_held, strict=True))),
        "per_preference": rows,
    }  # fmt: skip
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
