"""The multi-task upper bound on tiny3: can ONE model of this size keep >= 90% of each expert's own-task score?

Issue 6's target asks a merged model at the balanced preference to keep at least 90% of each expert's own-task
held-out score. Merging can only lose to multi-task training with the same data and compute (merges see no data
at all), so a model fine-tuned from the zoo's base on the union of the three tasks' training data is the natural
upper bound: if it cannot keep 90% of every expert, no merge of these experts can be expected to.

Recipe (the experts', `hm3_jax/tasks/zoo.py` step 4): full fine-tuning from the zoo's base, loss on the target
tokens of each task's training examples (`packing.tokenize_examples` + `pack_teacher_forced`, the zoo's
`seq_len`), AdamW with global-norm clipping 1.0 (`hm3_jax.tasks.optim.make_optimizer`), linear warmup then
cosine decay to 10% (`optim.make_schedule`), the expert learning rate, warmup, weight decay and batch size.
Two budgets: `same` = the sum of the experts' steps (3 x 150 = 450 steps of 32 rows: the compute of building the
three experts) and `3x` = three times that. Tasks are mixed uniformly per batch, stratified: every batch holds
floor(B/3) or ceil(B/3) rows of each task (B = 32: 11/11/10, the short task rotating per step), rows drawn
uniformly with replacement within a task. The only departure from `lm_train.train_lm` is this per-task
stratification of the batch (train_lm draws rows uniformly from one array); the jitted step is lm_train's.

Evaluation is the run's: `hm3_jax.search.problem.score_params` on a held-out path engine built like
`make_problem`'s (same objectives, strategy, chunking, prefix sharing), so the numbers are comparable with
`report.json`'s points; the base's and the experts' re-scores are checked against `report.json`'s
(`source_scores.heldout`, an error if they differ by more than 1e-3). Retention = score / the expert's own-task
score. Uncertainty: 1000 paired bootstrap resamples of the 300 held-out examples per task (the same resampled
examples for the model and the expert; per-example statistics from `Objective.example_fn`, as
`hm3_jax.search.heldout_bootstrap`), giving a 95% interval of each retention and P(min retention >= 0.9).

Trained params go to `--out` (default runs/multitask_bound, ignored by git) with a meta.json written last; a
re-run with the same seed, steps and zoo loads them instead of training again. Prints one JSON object; writes
`--out/retention.png`.

    .venv/bin/python benchmarks/multitask_bound.py --run=runs/tiny3 --seed=0     # after `make demo-full`
    .venv/bin/python benchmarks/multitask_bound.py --run=runs/tiny3_v5 --seed=0  # the run docs report

The run's zoo is `--zoo` (default RUN/zoo, where `make demo-full` builds it). `--no_run`: RUN may be a
directory with a zoo and no run (the deep tiny3 zoo of issue 20); the re-scores are then checked against the
zoo manifest's held-out score matrix, and the merge rows are the balanced Theta(lambda) of
RUN/headroom_param_level.json if `arch_headroom.py` wrote one there:

    .venv/bin/python benchmarks/multitask_bound.py --run=/tmp/deep3 --config=deep --no_run --seed=0 \
        --out=/tmp/deep3/multitask_bound

For the tests: a smoke run with
`--config=smoke --multipliers=1 --bootstrap=10` (30 training steps on the smoke zoo).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np


def stratified_rows(key, num_steps: int, batch_size: int, rows_per_task: list[int]) -> np.ndarray:
    """[num_steps, batch_size] (task, row) pairs packed as task * 2**20 + row: per step floor/ceil(B / K) rows of
    each of the K tasks (the tasks that get the smaller share rotate with the step), rows uniform with replacement.
    """
    import jax

    K = len(rows_per_task)
    base, extra = divmod(batch_size, K)
    keys = jax.random.split(key, K)
    draws = [
        np.asarray(jax.random.randint(k, (num_steps, base + 1), 0, n))
        for k, n in zip(keys, rows_per_task, strict=True)
    ]
    out = np.empty((num_steps, batch_size), np.int64)
    for i in range(num_steps):
        col = 0
        for k in range(K):
            n_k = base + (1 if (k - i) % K < extra else 0)
            out[i, col : col + n_k] = k * 2**20 + draws[k][i, :n_k]
            col += n_k
    return out


def train_multitask(key, config, base_params, task_rows, num_steps: int, cfg_expert, desc: str):
    """Fine-tunes `base_params` on the union of `task_rows` ([(ids [N_k, S], mask [N_k, S])] per task).

    Same optimiser, schedule and jitted step as `hm3_jax.tasks.lm_train.train_lm`; batches stratified by task.
    Returns (params, losses float32 [num_steps]).
    """
    from hm3_jax.tasks import lm_train

    plan = stratified_rows(key, num_steps, cfg_expert.batch_size, [len(ids) for ids, _ in task_rows])
    offsets = np.cumsum([0] + [len(ids) for ids, _ in task_rows])[:-1]
    rows = offsets[plan // 2**20] + plan % 2**20  # (task, row) -> row of the tasks' concatenated rows
    return lm_train.train_lm(
        key, config, base_params,
        np.concatenate([np.asarray(i, np.int32) for i, _ in task_rows]),
        np.concatenate([np.asarray(m, np.float32) for _, m in task_rows]),
        num_steps, cfg_expert.batch_size, cfg_expert.learning_rate, cfg_expert.warmup_steps,
        cfg_expert.weight_decay, desc=desc, rows=rows,
    )  # fmt: skip


def trained_or_cached(out_dir, meta_want, train_fn, config, special):
    """Loads `out_dir` when its meta.json equals `meta_want` (same seed, steps, zoo); else trains and saves."""
    from hm3_jax.io.checkpoint import Model, load_pretrained, save_pretrained

    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if {k: meta.get(k) for k in meta_want} == meta_want:
            return load_pretrained(out_dir).params, meta
    t0, c0 = time.time(), time.process_time()
    params, losses = train_fn()
    meta = {**meta_want, "train_wall_s": round(time.time() - t0, 1),
            "train_cpu_s": round(time.process_time() - c0, 1),
            "first_loss": float(losses[:20].mean()), "final_loss": float(losses[-20:].mean())}  # fmt: skip
    if os.path.exists(meta_path):
        os.remove(meta_path)  # a stale meta must never vouch for the weights written next
    save_pretrained(Model(config, params, dict(special)), out_dir)  # temp sibling + rename
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".meta_", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, meta_path)  # written last: its presence means the weights are complete
    return params, meta


def main(argv=None) -> dict:
    """Parses `argv` (default sys.argv), runs, prints one JSON object and returns it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/tiny3_v5", help="finished run (report.json, zoo/)")
    parser.add_argument("--zoo", default="", help="the run's zoo directory (default RUN/zoo)")
    parser.add_argument("--config", default="", help="tiny3 config variant (the run's: empty)")
    parser.add_argument("--out", default="runs/multitask_bound", help="trained params and the plot (not git)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--multipliers", default="1,3", help="budgets as multiples of the experts' summed steps"
    )
    parser.add_argument(
        "--bootstrap", type=int, default=1000, help="paired resamples of the held-out examples"
    )
    parser.add_argument(
        "--no_run",
        action="store_true",
        help="RUN may hold a zoo only (no report.json): check against the zoo's score matrix, no merge rows",
    )
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from absl import logging

    from experiments.configs import tiny3
    from hm3_jax import models
    from hm3_jax.moo import bootstrap
    from hm3_jax.paths import engine as engine_lib
    from hm3_jax.search.problem import pool_for, score_params
    from hm3_jax.tasks import packing, scoring
    from hm3_jax.tasks import zoo as zoo_lib

    logging.set_verbosity(logging.WARNING)
    multipliers = [int(m) for m in args.multipliers.split(",") if m.strip()]
    if not multipliers or min(multipliers) < 1:
        raise ValueError(f"--multipliers must be positive integers, got {args.multipliers!r}")
    report_path = os.path.join(args.run, "report.json")
    report = None  # without a run: the zoo's own score matrix is the check, and no merge rows
    if os.path.isfile(report_path):
        with open(report_path) as f:
            report = json.load(f)
    elif not args.no_run:
        raise FileNotFoundError(
            f"{report_path} not found: --run must be a finished HM3 run (or pass --no_run)"
        )
    config = tiny3.get_config(args.config or None)
    zoo_dir = args.zoo or os.path.join(args.run, "zoo")
    zoo = zoo_lib.load_matching(config.zoo, zoo_dir)
    tasks = list(zoo.tasks)
    if report is not None and tasks != report["tasks"]:
        raise ValueError(f"zoo tasks {tasks} != report tasks {report['tasks']}")
    # The sources' held-out scores to check the re-scores against: the run's, else the zoo build's
    reference = report["source_scores"]["heldout"] if report else zoo.manifest["score_matrix"]["heldout"]
    reference_name = (
        "report.json source_scores.heldout" if report else "the zoo manifest's heldout score_matrix"
    )
    mcfg, zcfg = zoo.base.config, config.zoo
    experts = [zoo.experts[t].params for t in tasks]
    special = {k: getattr(zoo.tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}

    # Training data: each task's train part, packed exactly as the zoo packs an expert's.
    task_rows = []
    for t in tasks:
        pairs = packing.tokenize_examples(zoo.tokenizer, zoo.data[t]["train"])
        packed = packing.pack_teacher_forced(pairs, zoo.tokenizer.pad_token_id, 1, zcfg.seq_len, name="train")
        task_rows.append((packed["input_ids"], packed["target_mask"]))
    expert_steps = zcfg.expert.num_steps * len(tasks)

    # The held-out engine as make_problem builds it.
    heldout_objs = [zoo.objectives["heldout"][t] for t in tasks]
    engine = engine_lib.make_engine(
        mcfg, models.shell_of(zoo.base.params), pool_for(experts, zoo.base.params), heldout_objs, strategy=config.engine.strategy,
        chunk_size=config.engine.chunk_size, prefix_sharing=config.engine.prefix_sharing, pool_id="sources",
    )  # fmt: skip
    idx = bootstrap.resample_indices(args.seed, [o.num_examples for o in heldout_objs], args.bootstrap)

    def evaluate(params):
        """Held-out scores [K] via the run's engine, and resampled scores [B, K] from per-example statistics."""
        scores = np.asarray(score_params(engine, experts, params), np.float64)
        shell, path = models.shell_of(params), jnp.arange(mcfg.num_layers, dtype=jnp.int32)
        res = []
        for k, o in enumerate(heldout_objs):
            raw = np.asarray(scoring.path_device_scores(mcfg, shell, params["blocks"], path, None, o))
            stats = o.example_fn(raw)  # [N] 0/1 correctness or [N, S] chrF sentence statistics
            full = bootstrap.full_score(stats, o.metric)
            if abs(full - scores[k]) > 1e-3:
                raise RuntimeError(
                    f"per-example statistics give {full} on {tasks[k]}, the engine {scores[k]}"
                )
            res.append(bootstrap.resampled_scores(stats, o.metric, idx[k]))
        return scores, np.stack(res, -1)

    rows = {"base": zoo.base.params, **{f"expert:{t}": p for t, p in zip(tasks, experts, strict=True)}}
    evaluated = {name: evaluate(p) for name, p in rows.items()}
    # the run's (or the zoo's) source scores: an independent check of this evaluation
    for j, name in enumerate(rows):
        want = np.asarray(reference[j])
        if np.max(np.abs(evaluated[name][0] - want)) > 1e-3:
            raise RuntimeError(f"{name}: held-out re-score {evaluated[name][0]} != {reference_name}'s {want}")
    own = np.array([evaluated[f"expert:{t}"][0][k] for k, t in enumerate(tasks)])  # [K]
    own_b = np.stack([evaluated[f"expert:{t}"][1][:, k] for k, t in enumerate(tasks)], -1)  # [B, K]

    trained_meta = {}
    key = jax.random.key(args.seed)
    for mult, k in zip(multipliers, jax.random.split(key, len(multipliers)), strict=True):
        steps = expert_steps * mult
        name = f"multitask_{mult}x"
        want = {"seed": args.seed, "num_steps": steps, "zoo_fingerprint": zoo.manifest["fingerprint"],
                "batch_size": zcfg.expert.batch_size, "learning_rate": zcfg.expert.learning_rate,
                "warmup_steps": zcfg.expert.warmup_steps, "weight_decay": zcfg.expert.weight_decay,
                "mixing": "stratified-uniform"}  # fmt: skip
        params, meta = trained_or_cached(
            os.path.join(args.out, name), want,
            lambda k=k, steps=steps, name=name: train_multitask(
                k, mcfg, zoo.base.params, task_rows, steps, zcfg.expert, name),
            mcfg, special,
        )  # fmt: skip
        trained_meta[name] = meta
        evaluated[name] = evaluate(params)

    def entry(points, resampled=None):
        points = np.asarray(points, np.float64)
        ret = points / own
        out = {"heldout": points.round(4).tolist(), "retention": ret.round(4).tolist(),
               "min_retention": float(ret.min()), "keeps_90_each": bool(ret.min() >= 0.9)}  # fmt: skip
        if resampled is not None:
            rb = resampled / own_b  # paired: the same resampled examples for the model and the expert
            out["retention_interval_95"] = np.percentile(rb, [2.5, 97.5], axis=0).T.round(4).tolist()
            out["p_min_retention_ge_90"] = float(np.mean(rb.min(1) >= 0.9))
        return out

    models_out = {name: entry(*evaluated[name]) for name in evaluated}
    if report is not None:
        for method in ("task_arithmetic", "hm3", "hm3_no_arch_level"):
            m = report["methods"][method]
            models_out[f"{method}@balanced (report.json)"] = entry(m["points"][m["balanced_index"]])
    param_cache = os.path.join(args.run, "headroom_param_level.json")  # arch_headroom.py's, without a run
    if report is None and os.path.isfile(param_cache):
        with open(param_cache) as f:
            # row 0 is the balanced preference (run_config.make_preferences)
            first = json.load(f)["entries"][0]
        variant = "tuned" if "tuned" in first else "paper"
        models_out[f"theta_{variant}@balanced (headroom_param_level.json)"] = entry(first[variant]["heldout"])
    for name, meta in trained_meta.items():
        models_out[name]["training"] = meta
    best = max(trained_meta, key=lambda n: models_out[n]["min_retention"])
    result = {
        "run": args.run, "seed": args.seed, "tasks": tasks,
        "expert_own_task_heldout": own.round(4).tolist(),
        "expert_steps_each": zcfg.expert.num_steps, "bootstrap_samples": args.bootstrap,
        "models": models_out,
        "best_multitask": best,
        "multitask_keeps_90_each": models_out[best]["keeps_90_each"],
        "checks": f"base and expert held-out re-scores equal {reference_name} within 1e-3; "
                  "per-example statistics reproduce every engine score within 1e-3",
    }  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    plot_path = os.path.join(args.out, "retention.png")
    _plot(models_out, tasks, plot_path)
    result["plot"] = plot_path
    print(json.dumps(result))
    return result


def _plot(models_out: dict, tasks, path: str) -> None:
    """Grouped bars of held-out retention per task, with the 90% target; written to a temp file then moved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in models_out if not n.startswith("expert:")]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(names)
    for j, n in enumerate(names):
        ret = np.asarray(models_out[n]["retention"])
        x = np.arange(len(tasks)) + (j - (len(names) - 1) / 2) * width
        err = None
        if "retention_interval_95" in models_out[n]:
            iv = np.asarray(models_out[n]["retention_interval_95"])
            err = np.abs(iv.T - ret)
        ax.bar(x, ret, width, yerr=err, capsize=2, label=n.replace(" (report.json)", ""))
    ax.axhline(0.9, color="k", ls="--", lw=1)
    ax.set_xticks(np.arange(len(tasks)), tasks)
    ax.set_ylabel("held-out score / expert's own")
    ax.set_title("tiny3: retention of each expert's own-task score (95% paired bootstrap)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a plot is for reading
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
