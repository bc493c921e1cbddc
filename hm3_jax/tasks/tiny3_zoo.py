"""The tiny3 zoo: a Llama base pretrained on prose and task text, and one fully fine-tuned expert per task.

`hm3_jax.tasks.zoo` builds, caches and loads every zoo kind and dispatches here for tiny3 (the default kind):
`build_into` writes data, tokenizer, base and experts (Hugging Face directories) and returns the manifest;
`write_eval_files` makes the built zoo a run spec; `load` reads it back. The objectives of a tiny3 task split
are `make_objective`'s: translation scored by chrF of greedy decoding, math and code by teacher-forced exact
match. See docs/tiny3.md.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from tokenizers import processors

from hm3_jax import models
from hm3_jax.io.checkpoint import Model, load_pretrained, save_pretrained
from hm3_jax.models import ModelConfig
from hm3_jax.tasks import corpus, data, lm_train, packing
from hm3_jax.tasks import tokenizer as tok_lib
from hm3_jax.tasks.exact_match import make_exact_match_objective
from hm3_jax.tasks.generation import make_chrf_objective
from hm3_jax.tasks.objectives import Objective
from hm3_jax.tasks.zoo_format import (
    FORMAT_VERSION,
    Zoo,
    config_dict,
    config_fingerprint,
    score_matrix,
    task_vector_ratios,
)


def model_config(zoo_config, vocab_size: int):
    """The Llama `ModelConfig` of the zoo (vocab size from the trained tokenizer)."""
    m = zoo_config.model
    return ModelConfig(
        family="llama",
        vocab_size=int(vocab_size),
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        num_kv_heads=m.num_heads,  # explicit, as load_pretrained reads it back: equal configs share jit caches
        max_position_embeddings=m.max_position_embeddings,
        rope_theta=10000.0,
        norm_eps=1e-6,
    )


def make_objectives(
    task_data: Mapping, tokenizer, batch_size: int, seq_len: int | None = None, splits=("search", "heldout")
) -> dict:
    """{split: {task: Objective}} for every task of `task_data` ({task: {split: examples}}).

    With `seq_len` set, every teacher-forced objective has rows of that length, and decoding objectives take
    their prompt length and number of new tokens from all `splits` together, so same-sized splits share
    compilations.
    """
    out = {split: {} for split in splits}
    for task, parts in task_data.items():
        decode_shapes = {}
        if data.task_metric(task) == "chrf":
            pairs = packing.tokenize_examples(tokenizer, [e for s in splits for e in parts[s]])
            decode_shapes = {
                "prompt_len": -(-max(len(p) for p, _ in pairs) // 8) * 8,
                "max_new_tokens": max(len(t) for _, t in pairs),
            }
        for split in splits:
            out[split][task] = make_objective(
                task, split, parts[split], tokenizer, batch_size, seq_len, **decode_shapes
            )
    return out


def train_rows_for_task(examples, tokenizer, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """An expert's training rows: (input_ids int32 [N, S], loss mask [N, S] on the target tokens)."""
    pairs = packing.tokenize_examples(tokenizer, examples)
    packed = packing.pack_teacher_forced(pairs, tokenizer.pad_token_id, 1, seq_len, name="train")
    return packed["input_ids"], packed["target_mask"]


def make_objective(
    task: str,
    split: str,
    examples: Sequence[Mapping[str, str]],
    tokenizer,
    batch_size: int,
    seq_len: int | None = None,
    prompt_len: int | None = None,
    max_new_tokens: int | None = None,
) -> Objective:
    """The objective of one task split (metric from the task registry).

    Args:
      task: task name ("translation" -> chrF on greedy decoding; "math", "code" -> teacher-forced exact
        match).
      split: split name (only used in the objective's name, "<task>/<split>").
      examples: example dicts with "prompt" and "target".
      tokenizer: the zoo tokenizer (pad/bos/eos set).
      batch_size: rows per forward pass.
      seq_len: row length of teacher-forced objectives (None: longest example rounded up to 8). Objectives
        with equal shapes share one compilation in `score_path`.
      prompt_len, max_new_tokens: decoding shapes of chrF objectives (None: from this split's longest prompt
        and longest target + eos).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    name = f"{task}/{split}"
    pairs = packing.tokenize_examples(tokenizer, examples)
    metric = data.task_metric(task)
    if metric == "exact_match":
        return make_exact_match_objective(name, pairs, tokenizer.pad_token_id, batch_size, seq_len)
    longest_target = max(len(t) for _, t in pairs)  # reference + eos
    if max_new_tokens is None:
        max_new_tokens = longest_target
    elif max_new_tokens < longest_target:
        raise ValueError(f"{name}: max_new_tokens={max_new_tokens} < longest target + eos ({longest_target})")
    references = [e["target"] for e in examples]
    prompts = [p for p, _ in pairs]
    return make_chrf_objective(name, prompts, references, tokenizer, batch_size, max_new_tokens, prompt_len)


def build_into(zoo_config, out_dir: str, progress: bool = True) -> dict:
    """Builds every artefact of a tiny3 zoo into `out_dir` (an empty temporary directory); returns the manifest."""
    start, cpu_start = time.time(), time.process_time()
    timings = {}
    cfg = zoo_config
    # 1. data
    task_data = data.generate_all(cfg.seed, cfg.num_eval, cfg.num_train, tuple(cfg.tasks))
    for task, parts in task_data.items():
        data.write_jsonl(
            os.path.join(out_dir, "data", f"{task}.jsonl"), [e for s in data.SPLITS for e in parts[s]]
        )
    # 2. corpus and tokenizer (trained on prose and the *train* parts only)
    train_examples = [e for parts in task_data.values() for e in parts["train"]]
    docs = corpus.base_corpus(
        np.random.default_rng([cfg.seed, 99]), train_examples, cfg.task_share, cfg.get("max_prose_chars")
    )
    tokenizer = tok_lib.train_tokenizer(
        docs + [e["prompt"] + e["target"] for e in train_examples], cfg.vocab_size
    )
    tok_dir = os.path.join(out_dir, "tokenizer")
    tok_lib.save_tokenizer(tokenizer, tok_dir)
    tokenizer = tok_lib.load_tokenizer(tok_dir)
    timings["data_and_tokenizer_s"] = time.time() - start
    # 3. base model on the packed corpus
    config = model_config(cfg, len(tokenizer))
    key_init, key_base, key_experts = jax.random.split(jax.random.key(cfg.seed), 3)
    token_docs = [tok_lib.encode(tokenizer, d) for d in docs]
    stream = lm_train.pack_stream(token_docs, cfg.seq_len, tokenizer.bos_token_id, tokenizer.eos_token_id)
    t0 = time.time()
    base_params, base_losses = lm_train.train_lm(
        key_base,
        config,
        models.init(config, key_init),
        stream,
        np.ones_like(stream, np.float32),
        cfg.base.num_steps,
        cfg.base.batch_size,
        cfg.base.learning_rate,
        cfg.base.warmup_steps,
        cfg.base.weight_decay,
        desc="base",
        progress=progress,
    )
    timings["base_train_s"] = time.time() - t0
    # 4. experts: full fine-tuning from the base, loss on target tokens of the task's train part
    expert_params, expert_losses = {}, {}
    t0 = time.time()
    for task, key in zip(task_data, jax.random.split(key_experts, len(task_data)), strict=True):
        ids, mask = train_rows_for_task(task_data[task]["train"], tokenizer, cfg.seq_len)
        expert_params[task], expert_losses[task] = lm_train.train_lm(
            key,
            config,
            base_params,
            ids,
            mask,
            cfg.expert.num_steps,
            cfg.expert.batch_size,
            cfg.expert.learning_rate,
            cfg.expert.warmup_steps,
            cfg.expert.weight_decay,
            desc=f"expert/{task}",
            progress=progress,
        )
    timings["experts_train_s"] = time.time() - t0
    # 5. save as HF directories with the tokenizer beside the weights
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    named = [("base", base_params)] + [(os.path.join("experts", t), p) for t, p in expert_params.items()]
    for rel, params in named:
        path = os.path.join(out_dir, rel)
        save_pretrained(Model(config, params, dict(special)), path)
        tokenizer.save_pretrained(path)
    # 6. score matrices (rows: base then experts; columns: tasks) and task-vector sizes
    t0 = time.time()
    objs = make_objectives(task_data, tokenizer, cfg.eval_batch_size, cfg.seq_len)
    rows = [Model(config, base_params)] + [Model(config, p) for p in expert_params.values()]
    matrices = {split: score_matrix(rows, objs[split]).round(4).tolist() for split in objs}
    timings["scoring_s"] = time.time() - t0
    ratios = task_vector_ratios(base_params, list(expert_params.values()))
    timings["total_s"] = time.time() - start
    return {
        "format_version": FORMAT_VERSION,
        "fingerprint": config_fingerprint(zoo_config),
        "config": config_dict(zoo_config),
        "seed": int(cfg.seed),
        "tasks": list(task_data),
        "metrics": {t: data.task_metric(t) for t in task_data},
        "rows": ["base"] + list(task_data),
        "score_matrix": matrices,
        "task_vector_norm_ratio": dict(zip(task_data, [round(r, 6) for r in ratios], strict=True)),
        "sizes": {
            "examples": {t: {s: len(p[s]) for s in data.SPLITS} for t, p in task_data.items()},
            "vocab_size": len(tokenizer),
            "num_params": int(sum(x.size for x in jax.tree.leaves(base_params))),
            "corpus_tokens": int(stream.size),
        },
        "model_config": dataclasses.asdict(config),
        "final_train_loss": {
            "base": float(base_losses[-20:].mean()),
            **{t: float(v[-20:].mean()) for t, v in expert_losses.items()},
        },
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "build_time_s": round(time.time() - start, 2),
        # CPU seconds of this process over all threads: a load-independent measure of the build's work
        "build_cpu_s": round(time.process_time() - cpu_start, 2),
        "paths": {
            "base": "base",
            "experts": {t: f"experts/{t}" for t in task_data},
            "tokenizer": "tokenizer",
        },
    }


def write_eval_files(workdir: str, manifest: Mapping) -> dict:
    """tiny3's part of `hm3_jax.tasks.zoo.write_spec`: eval JSONL, BOS-adding tokenizers beside the checkpoints;
    returns the spec."""
    tokenizer = tok_lib.load_tokenizer(os.path.join(workdir, manifest["paths"]["tokenizer"]))
    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    paths = manifest["paths"]
    for rel in [paths["base"], *paths["experts"].values()]:
        tokenizer.save_pretrained(os.path.join(workdir, rel))
    tasks = {}
    for task in manifest["tasks"]:
        rows = [
            {"prompt": e["prompt"], "target": e["target"], "split": e["split"]}
            for e in data.read_jsonl(os.path.join(workdir, "data", f"{task}.jsonl"))
            if e["split"] in ("search", "heldout")
        ]
        data.write_jsonl(os.path.join(workdir, "eval", f"{task}.jsonl"), rows)
        entry = {"data": f"eval/{task}.jsonl"}
        if data.task_metric(task) == "chrf":
            longest = max(len(tok_lib.encode(tokenizer, r["target"])) for r in rows)
            entry |= {"metric": "chrf", "max_new_tokens": longest + 1}
        else:
            entry["metric"] = "exact_match_teacher_forced"
        tasks[task] = entry
    return {
        "base": paths["base"],
        "experts": dict(paths["experts"]),
        "tasks": tasks,
        "eval_batch_size": int(manifest["config"]["eval_batch_size"]),
    }


def load(workdir: str, manifest: Mapping, eval_batch_size: int | None = None) -> Zoo:
    """Loads a built tiny3 zoo (models, tokenizer, data, objectives) from `workdir` (its `manifest` read)."""
    tokenizer = tok_lib.load_tokenizer(os.path.join(workdir, manifest["paths"]["tokenizer"]))
    base = load_pretrained(os.path.join(workdir, manifest["paths"]["base"]))
    experts = {t: load_pretrained(os.path.join(workdir, p)) for t, p in manifest["paths"]["experts"].items()}
    task_data = {
        t: data.group_by_split(data.read_jsonl(os.path.join(workdir, "data", f"{t}.jsonl")))
        for t in manifest["tasks"]
    }
    batch_size = eval_batch_size or manifest["config"]["eval_batch_size"]
    objs = make_objectives(task_data, tokenizer, batch_size, manifest["config"]["seq_len"])
    return Zoo(base, experts, tokenizer, task_data, objs, manifest, os.path.abspath(workdir))
