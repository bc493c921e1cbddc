"""What makes a tiny8 expert good through a frozen head: a sweep of the experts' learning rate and steps.

Builds the zoo's data, base and frozen heads exactly as `zoo.build_into` does (same config, same keys), then
fine-tunes the experts of a few tasks at each (learning rate, steps) setting and prints one JSON object per
setting, all scored on the SEARCH split (the held-out split is left for the report). First, per probe penalty
l2 (`--probe_l2s`), the base's search accuracy through the probe fitted with it (every task); then per setting:

* `own`: each expert's accuracy on its own task (through the frozen head), and the base's for comparison;
* `others_mean`: the mean accuracy of each expert on the other swept tasks (how much it forgets);
* `tau_ratio`: ||tau_k|| / ||theta_base||;
* `task_arithmetic`: base + s * sum_k tau_k over the swept tasks' experts, per scale s: the merged model's mean
  accuracy and its mean over tasks of merged accuracy / expert accuracy (how well the experts merge; the best s
  is what a tuned baseline finds).

    nice -n 10 .venv/bin/python -m benchmarks.tiny8_expert_sweep --tasks=digits,letters,textures,counting \
        --learning_rates=5e-4,1e-3,2e-3,4e-3 --num_steps=500

The numbers measured with it are in docs/tiny8.md ("Choosing the experts' learning rate").
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from hm3_jax.tasks import scoring, zoo_format
from hm3_jax.tasks.tiny8 import data, images
from hm3_jax.tasks.tiny8 import train as train_lib
from hm3_jax.tasks.tiny8 import zoo as zoo_lib

FLAGS = flags.FLAGS

_TASKS = flags.DEFINE_string("tasks", "digits,letters,textures,counting", "tasks whose experts are swept")
_LRS = flags.DEFINE_string("learning_rates", "5e-4,1e-3,2e-3,4e-3", "expert learning rates")
_STEPS = flags.DEFINE_string("num_steps", "500", "expert fine-tuning steps (comma-separated)")
_SCALES = flags.DEFINE_string("scales", "0.2,0.3,0.5,0.7,1.0", "task arithmetic scales s")
_L2S = flags.DEFINE_string(
    "probe_l2s", "1e-3,1e-2,1e-1,1,10", "frozen-head penalties compared (base, search)"
)
_SMOKE = flags.DEFINE_bool("smoke", False, "the smoke zoo config (a quick check that the sweep runs)")


def _score(config, params, objs) -> np.ndarray:
    return np.array([scoring.score_model(config, params, o) for o in objs.values()])


def main(argv) -> None:
    del argv
    from experiments.configs import tiny8

    cfg = tiny8.get_config("smoke" if _SMOKE.value else None).zoo
    swept = tuple(_TASKS.value.split(","))
    tasks = tuple(cfg.tasks)
    config = zoo_lib.model_config(cfg)
    t0 = time.time()
    task_data = data.generate_all(cfg.seed, cfg.num_eval, cfg.num_train, tasks, cfg.image_size)
    key_init, key_base, key_experts = jax.random.split(jax.random.key(cfg.seed), 3)
    pad = zoo_lib.num_classes_padded(tasks)
    base, _ = zoo_lib.pretrain_base(cfg, config, task_data, key_init, key_base, "base", progress=False)
    heads, probe_search = {}, {}
    for t in tasks:  # the frozen head's penalty: the base's search accuracy through probes of each l2
        x = {s: data.to_model_inputs(task_data[t][s]["pixel_values"]) for s in ("train", "search")}
        feats = {s: train_lib.base_features(config, base, v) for s, v in x.items()}
        y = {s: task_data[t][s]["labels"] for s in ("train", "search")}
        for l2 in [float(v) for v in _L2S.value.split(",")]:
            head = train_lib.fit_linear_probe(feats["train"], y["train"], images.NUM_CLASSES[t], l2)
            hits = np.argmax(feats["search"] @ head["kernel"] + head["bias"], 1) == y["search"]
            probe_search.setdefault(l2, {})[t] = round(100.0 * float(hits.mean()), 2)
        if t in swept:
            heads[t] = train_lib.fit_linear_probe(
                feats["train"], y["train"], images.NUM_CLASSES[t], cfg.probe.l2
            )
    for l2, row in probe_search.items():
        mean = round(float(np.mean(list(row.values()))), 2)
        print(json.dumps({"probe_l2": l2, "base_search": row, "mean": mean}), flush=True)
    objs = zoo_lib.make_objectives({t: task_data[t] for t in swept}, heads, cfg.eval_batch_size, ("search",))[
        "search"
    ]
    base_scores = _score(config, base, objs)
    print(json.dumps({"base_search": dict(zip(swept, base_scores.round(2).tolist(), strict=True)), "setup_s": round(time.time() - t0, 1)}), flush=True)  # fmt: skip
    # the zoo's per-task keys (task order of the full zoo), so a swept expert is the zoo's expert at that setting
    keys = dict(zip(tasks, jax.random.split(key_experts, len(tasks)), strict=True))
    scales = [float(s) for s in _SCALES.value.split(",")]
    for steps in [int(s) for s in _STEPS.value.split(",")]:
        for lr in [float(x) for x in _LRS.value.split(",")]:
            t1 = time.time()
            experts = {}
            for t in swept:
                c = images.NUM_CLASSES[t]
                head = {"kernel": np.pad(heads[t]["kernel"], ((0, 0), (0, pad - c))), "bias": np.pad(heads[t]["bias"], (0, pad - c))}  # fmt: skip
                experts[t], _, _ = train_lib.train_classifier(
                    keys[t], config, base, head, data.to_model_inputs(task_data[t]["train"]["pixel_values"]),
                    task_data[t]["train"]["labels"], np.arange(pad) < c, num_steps=steps,
                    batch_size=cfg.expert.batch_size, learning_rate=lr, warmup_steps=min(cfg.expert.warmup_steps, steps // 5),
                    weight_decay=cfg.expert.weight_decay, trainable=("encoder",), desc=f"{t}@{lr}", progress=False,
                )  # fmt: skip
            matrix = np.stack([_score(config, experts[t], objs) for t in swept])  # [expert, task]
            own = np.diag(matrix)
            others = [(matrix[i].sum() - own[i]) / (len(swept) - 1) for i in range(len(swept))]
            taus = [jax.tree.map(jnp.subtract, experts[t], base) for t in swept]
            tau_sum = jax.tree.map(lambda *x: sum(x), *taus)
            ta = {}
            for s in scales:
                merged = jax.tree.map(lambda b, d, s=s: b + s * d, base, tau_sum)
                acc = _score(config, merged, objs)
                ta[s] = {"mean": round(float(acc.mean()), 2), "normalised": round(float(np.mean(acc / np.maximum(own, 1.0))), 4)}  # fmt: skip
            row = {
                "num_steps": steps,
                "learning_rate": lr,
                "own": dict(zip(swept, own.round(2).tolist(), strict=True)),
                "own_mean": round(float(own.mean()), 2),
                "others_mean": round(float(np.mean(others)), 2),
                "tau_ratio": dict(zip(swept, np.round(zoo_format.task_vector_ratios(base, [experts[t] for t in swept]), 4).tolist(), strict=True)),
                "task_arithmetic": ta,
                "seconds": round(time.time() - t1, 1),
            }  # fmt: skip
            print(json.dumps(row), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
