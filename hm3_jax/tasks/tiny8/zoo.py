"""The tiny8 zoo: a briefly multi-task-pretrained ViT encoder and eight task experts, built offline (issue 8).

Layout of a zoo directory (built into a temporary sibling and renamed into place by
`hm3_jax.tasks.zoo.build`, which dispatches here when `config.zoo.kind == "tiny8"`)::

    DIR/manifest.json            config, fingerprint, sizes, score matrices (rows: base then experts), timings
    DIR/data/<task>.npz          uint8 pixel_values [n, 3, S, S] and int32 labels per split (train/search/heldout)
    DIR/base/                    HF ViTModel directory (config.json + model.safetensors + preprocessor_config.json)
    DIR/experts/<task>/          same, one per task in `tasks` order (the fine-tuned encoder)
    DIR/heads/<task>.npz         task k's frozen head (a linear probe on the BASE's features): kernel [D, C_task],
                                 bias [C_task]; expert k was fine-tuned through it (`zoo.expert.head = "lp_ft"`:
                                 the expert's own fine-tuned head instead, the former protocol)
    DIR/preprocessor/            preprocessor_config.json (the zoo has no tokenizer; `paths["tokenizer"]`
                                 names this directory so tokenizer-copying code finds nothing to copy)

Merging acts on encoders (`Zoo.base`, `Zoo.experts`: ViT configs with `num_labels=0`); task k is always read
out by head k, which the task's objectives carry (`make_objectives`). So the score matrix entry (model m,
task k) is the accuracy of head k on model m's CLS feature. With the default frozen heads this is Task
Arithmetic's protocol (the paper's ViT setting): head k is fitted on the base's features before any
fine-tuning (CLIP's zero-shot head there), expert k's encoder is fine-tuned through it, and it never changes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping

import jax
import numpy as np

from hm3_jax.io import atomic
from hm3_jax.io.checkpoint import Model, load_pretrained, save_pretrained
from hm3_jax.models import ModelConfig
from hm3_jax.tasks import accuracy, zoo_format
from hm3_jax.tasks.tiny8 import data, images
from hm3_jax.tasks.tiny8 import train as train_lib

# zoo.expert.head: "frozen" (the expert's encoder is fine-tuned through the base probe, which every model is read
# out by) or "lp_ft" (encoder and head fine-tuned together from the probe; head k = expert k's own head).
HEAD_PROTOCOLS = ("frozen", "lp_ft")

PREPROCESSOR = {
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": False,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "image_processor_type": "ViTImageProcessor",
    "rescale_factor": 1.0 / 255.0,
}


def model_config(zoo_config):
    """The ViT `ModelConfig` of the zoo (HF ViT defaults: GELU, qkv bias, LayerNorm eps 1e-12; no classifier)."""
    m = zoo_config.model
    return ModelConfig(
        family="vit",
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        image_size=zoo_config.image_size,
        patch_size=m.patch_size,
        num_channels=3,
        num_labels=0,
        attention_bias=True,
        hidden_act="gelu",
        norm_eps=1e-12,
    )


def num_classes_padded(tasks) -> int:
    return max(images.NUM_CLASSES[t] for t in tasks)


def make_objectives(
    task_data: Mapping, heads: Mapping, batch_size: int, splits=("search", "heldout")
) -> dict:
    """{split: {task: accuracy Objective}}: task k's split read out by head k ({"kernel", "bias"})."""
    pad = num_classes_padded(task_data)
    out = {split: {} for split in splits}
    for task, parts in task_data.items():
        for split in splits:
            out[split][task] = accuracy.make_accuracy_objective(
                f"{task}/{split}",
                data.to_model_inputs(parts[split]["pixel_values"]),
                parts[split]["labels"],
                np.asarray(heads[task]["kernel"]),
                np.asarray(heads[task]["bias"]),
                batch_size,
                pad,
            )
    return out


def _save_head(path: str, head: Mapping) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, kernel=np.asarray(head["kernel"], np.float32), bias=np.asarray(head["bias"], np.float32))


def load_heads(workdir: str, manifest: Mapping | None = None) -> dict:
    """{task: {"kernel": [D, C_task], "bias": [C_task]}} of a built tiny8 zoo."""
    manifest = manifest or zoo_format.read_manifest(workdir)
    out = {}
    for task, rel in manifest["paths"]["heads"].items():
        with np.load(os.path.join(workdir, rel)) as f:
            out[task] = {"kernel": f["kernel"], "bias": f["bias"]}
    return out


def _write_json(path: str, obj) -> None:
    atomic.write_text(path, json.dumps(obj, indent=2))


def pretrain_base(
    cfg, config, task_data: dict, key_init, key_base, desc: str = "base", progress: bool = True
):
    """The zoo's base (`build_into` step 2): `train_lib.pretrain_multitask` from `train_lib.init_encoder` on every
    task's train part of `task_data` (`data.generate_all`), with `cfg.base`'s recipe. Returns (encoder, losses)."""
    tasks = tuple(cfg.tasks)
    pad = num_classes_padded(tasks)
    class_masks = np.stack([np.arange(pad) < images.NUM_CLASSES[t] for t in tasks])
    return train_lib.pretrain_multitask(
        key_base,
        config,
        train_lib.init_encoder(config, key_init),
        [data.to_model_inputs(task_data[t]["train"]["pixel_values"]) for t in tasks],
        [task_data[t]["train"]["labels"] for t in tasks],
        class_masks,
        num_steps=cfg.base.num_steps,
        batch_size=cfg.base.batch_size,
        learning_rate=cfg.base.learning_rate,
        warmup_steps=cfg.base.warmup_steps,
        weight_decay=cfg.base.weight_decay,
        desc=desc,
        progress=progress,
    )


def build_into(zoo_config, out_dir: str, progress: bool = True) -> dict:
    """Builds every artefact of a tiny8 zoo into `out_dir` (an empty temporary directory); returns the manifest."""
    start, cpu_start = time.time(), time.process_time()
    cfg = zoo_config
    tasks = tuple(cfg.tasks)
    unknown = [t for t in tasks if t not in images.TASKS]
    if unknown or not tasks:
        raise ValueError(f"tiny8: unknown or no tasks {unknown or tasks}; known: {images.TASKS}")
    if cfg.expert.head not in HEAD_PROTOCOLS:
        raise ValueError(f"tiny8: zoo.expert.head must be one of {HEAD_PROTOCOLS}, got {cfg.expert.head!r}")
    timings = {}
    # 1. data
    task_data = data.generate_all(cfg.seed, cfg.num_eval, cfg.num_train, tasks, cfg.image_size)
    for task, parts in task_data.items():
        data.save_task(os.path.join(out_dir, "data", f"{task}.npz"), parts)
    timings["data_s"] = time.time() - start
    # 2. base: brief multi-task pretraining on every task's train part (one throw-away head per task)
    config = model_config(cfg)
    key_init, key_base, key_experts = jax.random.split(jax.random.key(cfg.seed), 3)
    pad = num_classes_padded(tasks)
    t0 = time.time()
    base, base_losses = pretrain_base(
        cfg, config, task_data, key_init, key_base, "base (multi-task)", progress
    )
    timings["base_train_s"] = time.time() - t0
    # 3. frozen heads: a converged linear probe on the base's CLS features of each task's train part
    e = cfg.expert
    t0 = time.time()
    probe_heads, probe_train_accuracy = {}, {}
    for task in tasks:
        feats = train_lib.base_features(
            config, base, data.to_model_inputs(task_data[task]["train"]["pixel_values"])
        )
        y = task_data[task]["train"]["labels"]
        probe_heads[task] = train_lib.fit_linear_probe(feats, y, images.NUM_CLASSES[task], cfg.probe.l2)
        logits = feats @ probe_heads[task]["kernel"] + probe_heads[task]["bias"]
        probe_train_accuracy[task] = round(100.0 * float(np.mean(np.argmax(logits, 1) == y)), 4)
    timings["probe_s"] = time.time() - t0
    # 4. experts: the encoder fine-tuned on task k through head k (frozen), or encoder + head (lp_ft)
    trainable = {"frozen": ("encoder",), "lp_ft": ("encoder", "head")}[e.head]
    experts, heads, losses = {}, {}, {}
    t0 = time.time()
    for task, key in zip(tasks, jax.random.split(key_experts, len(tasks)), strict=True):
        x = data.to_model_inputs(task_data[task]["train"]["pixel_values"])
        y = task_data[task]["train"]["labels"]
        c = images.NUM_CLASSES[task]
        padded = {  # the mask drops the padded columns from the softmax; their zero weights get no gradient
            "kernel": np.pad(probe_heads[task]["kernel"], ((0, 0), (0, pad - c))),
            "bias": np.pad(probe_heads[task]["bias"], (0, pad - c)),
        }
        experts[task], head, losses[task] = train_lib.train_classifier(
            key,
            config,
            base,
            padded,
            x,
            y,
            np.arange(pad) < c,
            num_steps=e.num_steps,
            batch_size=e.batch_size,
            learning_rate=e.learning_rate,
            warmup_steps=e.warmup_steps,
            weight_decay=e.weight_decay,
            trainable=trainable,
            desc=f"expert/{task}",
            progress=progress,
        )
        heads[task] = {"kernel": np.asarray(head["kernel"])[:, :c], "bias": np.asarray(head["bias"])[:c]}
    timings["experts_train_s"] = time.time() - t0
    # 5. save: HF ViTModel directories, heads, preprocessing
    os.makedirs(os.path.join(out_dir, "preprocessor"))
    _write_json(os.path.join(out_dir, "preprocessor", "preprocessor_config.json"), PREPROCESSOR)
    named = [("base", base)] + [(os.path.join("experts", t), p) for t, p in experts.items()]
    for rel, params in named:
        save_pretrained(Model(config, params), os.path.join(out_dir, rel))
        _write_json(os.path.join(out_dir, rel, "preprocessor_config.json"), PREPROCESSOR)
    for task, head in heads.items():
        _save_head(os.path.join(out_dir, "heads", f"{task}.npz"), head)
    # 6. score matrices [1 + K, K] (rows: base then experts; columns: tasks, each read out by head k)
    t0 = time.time()
    objs = make_objectives(task_data, heads, cfg.eval_batch_size)
    rows = [Model(config, base)] + [Model(config, p) for p in experts.values()]
    matrices = {split: zoo_format.score_matrix(rows, objs[split]).round(4).tolist() for split in objs}
    probe_objs = make_objectives(task_data, probe_heads, cfg.eval_batch_size, splits=("heldout",))
    probe_row = zoo_format.score_matrix([Model(config, base)], probe_objs["heldout"])[0].round(4).tolist()
    timings["scoring_s"] = time.time() - t0
    ratios = zoo_format.task_vector_ratios(base, list(experts.values()))
    timings["total_s"] = time.time() - start
    return {
        "format_version": zoo_format.FORMAT_VERSION,
        "kind": "tiny8",
        "fingerprint": zoo_format.config_fingerprint(zoo_config),
        "config": zoo_format.config_dict(zoo_config),
        "seed": int(cfg.seed),
        "tasks": list(tasks),
        "metrics": {t: "accuracy" for t in tasks},
        "num_classes": {t: images.NUM_CLASSES[t] for t in tasks},
        "rows": ["base"] + list(tasks),
        "score_matrix": matrices,
        "head_protocol": e.head,
        "base_linear_probe_heldout": dict(zip(tasks, probe_row, strict=True)),
        "base_linear_probe_train": probe_train_accuracy,
        "task_vector_norm_ratio": dict(zip(tasks, [round(r, 6) for r in ratios], strict=True)),
        "sizes": {
            "examples": {t: {s: int(len(p[s]["labels"])) for s in data.SPLITS} for t, p in task_data.items()},
            "image_size": int(cfg.image_size),
            "num_params": int(sum(x.size for x in jax.tree.leaves(base))),
        },
        "model_config": dataclasses.asdict(config),
        "final_train_loss": {
            "base_multitask": float(base_losses[-20:].mean()),
            **{t: float(v[-20:].mean()) for t, v in losses.items()},
        },
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "build_time_s": round(time.time() - start, 2),
        "build_cpu_s": round(time.process_time() - cpu_start, 2),
        "paths": {
            "base": "base",
            "experts": {t: f"experts/{t}" for t in tasks},
            "heads": {t: f"heads/{t}.npz" for t in tasks},
            "tokenizer": "preprocessor",
        },
    }


def write_eval_files(workdir: str, manifest: Mapping) -> dict:
    """The search and held-out images of every task as `eval/<task>.npz` (uint8 `search/pixel_values`,
    `search/labels`, `heldout/...`); returns the zoo's spec (`hm3_jax.tasks.spec`): one accuracy task per expert
    with task k's frozen head (`heads/<task>.npz`), preprocessed by the base's preprocessor_config.json (the
    same inputs as `data.to_model_inputs`, tests/test_tiny8.py)."""
    tasks = {}
    for task in manifest["tasks"]:
        parts = data.load_task(os.path.join(workdir, "data", f"{task}.npz"))
        data.save_task(
            os.path.join(workdir, "eval", f"{task}.npz"), {s: parts[s] for s in ("search", "heldout")}
        )
        tasks[task] = {
            "data": f"eval/{task}.npz",
            "metric": "accuracy",
            "head": manifest["paths"]["heads"][task],
        }
    return {
        "base": manifest["paths"]["base"],
        "experts": dict(manifest["paths"]["experts"]),
        "tasks": tasks,
        "eval_batch_size": int(manifest["config"]["eval_batch_size"]),
    }


def load(workdir: str, manifest: Mapping, eval_batch_size: int | None = None):
    """Loads a built tiny8 zoo as a `hm3_jax.tasks.zoo_format.Zoo` (tokenizer None; data {task: {split: arrays}})."""
    base = load_pretrained(os.path.join(workdir, manifest["paths"]["base"]))
    experts = {t: load_pretrained(os.path.join(workdir, p)) for t, p in manifest["paths"]["experts"].items()}
    task_data = {t: data.load_task(os.path.join(workdir, "data", f"{t}.npz")) for t in manifest["tasks"]}
    heads = load_heads(workdir, manifest)
    batch_size = eval_batch_size or manifest["config"]["eval_batch_size"]
    objs = make_objectives(task_data, heads, batch_size)
    return zoo_format.Zoo(base, experts, None, task_data, objs, dict(manifest), os.path.abspath(workdir))
