"""The tiny3 zoo: a base model and three task experts built offline, saved as Hugging Face directories.

Layout of a zoo directory (everything is written into a temporary sibling and renamed into place)::

    DIR/manifest.json                 config, fingerprint, seed, sizes, score matrices, norms, build time
    DIR/tokenizer/                    byte-level BPE (AutoTokenizer loads it)
    DIR/data/<task>.jsonl             every example with its "split" (train / search / heldout)
    DIR/base/                         config.json + model.safetensors + tokenizer files
    DIR/experts/<task>/               same, one per task in TASK_NAMES order

`build_or_load(config, workdir)` reuses a directory whose manifest carries the same config fingerprint; a
different fingerprint is rebuilt into a clean directory (``on_mismatch="rebuild"``, the default) or raises
(``on_mismatch="error"``); contents are never mixed.

Score matrices are ``[1 + K, K]`` (rows: base then experts in TASK_NAMES order; columns: tasks), one per
split. What every zoo kind shares (`Zoo`, the manifest's format and fingerprint, score matrices, task-vector
sizes) is `hm3_jax.tasks.zoo_format`'s, imported here; tiny8 builds, writes its spec and loads in
`hm3_jax.tasks.tiny8.zoo`, to which this module dispatches.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping

import jax
import numpy as np

from hm3_jax.io import atomic
from hm3_jax.tasks import corpus, data, lm_train, objectives
from hm3_jax.tasks import tokenizer as tok_lib
from hm3_jax.tasks.tiny8 import zoo as tiny8_zoo
from hm3_jax.tasks.zoo_format import (
    FORMAT_VERSION,
    MANIFEST,
    Zoo,
    config_dict,
    config_fingerprint,
    read_manifest,
    score_matrix,
    task_vector_ratios,
)

log = logging.getLogger(__name__)


def model_config(zoo_config, vocab_size: int):
    """The Llama `ModelConfig` of the zoo (vocab size from the trained tokenizer)."""
    from hm3_jax.models import ModelConfig

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
            pairs = objectives.tokenize_examples(tokenizer, [e for s in splits for e in parts[s]])
            decode_shapes = {
                "prompt_len": -(-max(len(p) for p, _ in pairs) // 8) * 8,
                "max_new_tokens": max(len(t) for _, t in pairs),
            }
        for split in splits:
            out[split][task] = objectives.make_objective(
                task, split, parts[split], tokenizer, batch_size, seq_len, **decode_shapes
            )
    return out


def _train_rows_for_task(examples, tokenizer, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    pairs = objectives.tokenize_examples(tokenizer, examples)
    packed = objectives.pack_teacher_forced(pairs, tokenizer.pad_token_id, 1, seq_len, name="train")
    return packed["input_ids"], packed["target_mask"]


ZOO_KINDS = ("tiny3", "tiny8")


class ZooError(ValueError):
    """A zoo directory or `config.zoo` that cannot be used; the message names the directory or key (one line)."""


def zoo_kind(zoo_config) -> str:
    """`zoo_config.kind` ("tiny3" when absent, so tiny3 fingerprints are unchanged); tiny8: hm3_jax/tasks/tiny8."""
    kind = config_dict(zoo_config).get("kind", "tiny3")
    if kind not in ZOO_KINDS:
        raise ZooError(f"config.zoo.kind={kind!r} is not a zoo kind; known kinds: {', '.join(ZOO_KINDS)}")
    return kind


def check_buildable(zoo_config, workdir: str) -> None:
    """Raises ZooError unless a zoo of `zoo_config` can be built into `workdir`, before anything is written.

    Checked: the zoo kind; `workdir` is not a file, nor a non-empty directory that holds no zoo; its parent (or
    the nearest ancestor that exists, where the missing ones would be made) is a directory we can write, since
    the build goes to a temporary sibling of `workdir`.
    """
    zoo_kind(zoo_config)
    workdir = os.path.abspath(workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ZooError(f"zoo directory {workdir} is a file")
    if os.path.isdir(workdir) and os.listdir(workdir) and read_manifest(workdir) is None:
        raise ZooError(
            f"zoo directory {workdir} is not empty and holds no {MANIFEST}: refusing to overwrite it"
        )
    ancestor = os.path.dirname(workdir)
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ZooError(f"zoo directory {workdir} cannot be created: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ZooError(
            f"zoo directory {workdir} cannot be created: {ancestor} is not writable (permission denied)"
        )


def _build(zoo_config, out_dir: str, progress: bool) -> dict:
    """Builds every artefact into `out_dir` (an empty temporary directory); returns the manifest."""
    if zoo_kind(zoo_config) == "tiny8":
        return tiny8_zoo.build_into(zoo_config, out_dir, progress)
    from hm3_jax import models
    from hm3_jax.io.checkpoint import Model, save_pretrained

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
        ids, mask = _train_rows_for_task(task_data[task]["train"], tokenizer, cfg.seq_len)
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


SPEC = "spec.yaml"


def write_spec(workdir: str) -> str:
    """Makes a built zoo a run spec (`hm3_jax.tasks.spec`): every run reads a spec, the built-in benchmarks are
    producers of one. Returns the path of `workdir/spec.yaml` (written once; later calls return it). tiny8:
    `tiny8.zoo.write_eval_files` (image tasks scored by accuracy with the experts' fixed heads). tiny3:

    Writes `eval/<task>.jsonl` (the search and held-out rows, each with its "split"), makes the tokenizer files
    beside every checkpoint encode as the models were trained (`tokenizer(prompt)` = BOS + the prompt's tokens:
    the zoo's tokenizer adds no special token by itself), then the spec: translation scored by `chrf` with
    `max_new_tokens` = the longest target + EOS (the zoo's own decode length), math and code by
    `exact_match_teacher_forced` (the zoo's own metric), `eval_batch_size` of the zoo config. So a run on the
    spec scores exactly what the zoo's own objectives score (tests/test_spec_zoo_tiny3.py).
    """
    from filelock import FileLock

    path = os.path.join(workdir, SPEC)
    manifest = read_manifest(workdir)
    if manifest is None:
        raise ValueError(f"{workdir}: no {MANIFEST}, not a built zoo")
    with FileLock(path + ".lock"):  # spec.yaml appears last: a reader that sees it sees every file it names
        if not os.path.isfile(path):
            if manifest.get("kind", "tiny3") == "tiny8":
                spec = tiny8_zoo.write_eval_files(workdir, manifest)
            else:
                spec = _write_text_eval_files(workdir, manifest)
            atomic.write_text(
                path, "# Written by hm3_jax.tasks.zoo.write_spec from the zoo's manifest.\n" + _yaml(spec)
            )
    return path


def _write_text_eval_files(workdir: str, manifest: dict) -> dict:
    """tiny3's part of `write_spec`: eval JSONL, BOS-adding tokenizers beside the checkpoints; returns the spec."""
    from tokenizers import processors

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


def _yaml(obj) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False)


def _write_manifest(out_dir: str, manifest: dict) -> None:
    atomic.write_text(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=2) + "\n")


def build(zoo_config, workdir: str, progress: bool = True) -> None:
    """Builds the zoo into `workdir`, replacing it only once the new build is complete.

    The build goes to a temporary sibling directory; then an existing `workdir` (which must itself be a zoo,
    i.e. hold a manifest, or be empty) is moved aside and deleted, and the new one renamed into place.

    Raises:
      ZooError naming the directory or key when `check_buildable` refuses, or the temporary directory cannot be
      made; nothing is written then.
    """
    workdir = os.path.abspath(workdir)
    parent = os.path.dirname(workdir)
    check_buildable(zoo_config, workdir)
    try:  # what the checks cannot see (a filesystem that refuses new entries, as /proc): still one line
        os.makedirs(parent, exist_ok=True)
        tmp = atomic.make_temp_dir(workdir)  # also removes a killed build's temporaries
    except OSError as e:
        raise ZooError(f"zoo directory {workdir} cannot be created: {e.strerror}") from None
    try:
        manifest = _build(zoo_config, tmp, progress)
        _write_manifest(tmp, manifest)
        atomic.commit_directory(tmp, workdir)  # an existing zoo is replaced; modes as the umask gives
    except BaseException:
        atomic.discard(tmp)
        raise
    log.info("built zoo %s in %.1f s", workdir, manifest["build_time_s"])


def load(workdir: str, eval_batch_size: int | None = None) -> Zoo:
    """Loads a built zoo (models, tokenizer, data, objectives) from `workdir`."""
    from hm3_jax.io.checkpoint import load_pretrained

    manifest = read_manifest(workdir)
    if manifest is None:
        raise FileNotFoundError(f"no {MANIFEST} in {workdir}: not a zoo directory (build it first)")
    if manifest.get("kind", "tiny3") == "tiny8":
        return tiny8_zoo.load(workdir, manifest, eval_batch_size)
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


class ZooMismatchError(ZooError):
    """A zoo directory holds a zoo of another config (`built_config`: the config it was built from)."""

    def __init__(self, message: str, built_config: dict | None):
        super().__init__(message)
        self.built_config = built_config or {}


def build_or_load(zoo_config, workdir: str, on_mismatch: str = "rebuild", progress: bool = True) -> Zoo:
    """Returns the zoo for `zoo_config` in `workdir`, building it when needed.

    Args:
      zoo_config: the `config.zoo` ConfigDict (see experiments/configs/tiny3.py).
      workdir: zoo directory.
      on_mismatch: what to do when `workdir` holds a zoo of another config: "rebuild" (replace it with a clean
        build) or "error" (raise `ZooMismatchError`, a ValueError).
      progress: show progress bars while building.
    """
    ensure_built(zoo_config, workdir, on_mismatch, progress)
    return load(workdir)


def ensure_built(zoo_config, workdir: str, on_mismatch: str = "rebuild", progress: bool = True) -> None:
    """Builds the zoo of `zoo_config` into `workdir` unless it already holds it (`build_or_load` without the
    load; same arguments)."""
    if on_mismatch not in ("rebuild", "error"):
        raise ValueError(f"on_mismatch must be 'rebuild' or 'error', got {on_mismatch!r}")
    fingerprint = config_fingerprint(zoo_config)
    atomic.remove_stale(workdir)  # what a killed build left beside it, also when the zoo itself is complete
    manifest = read_manifest(workdir)
    if manifest is not None and manifest.get("fingerprint") == fingerprint:
        log.info("zoo cache hit: %s (fingerprint %s)", workdir, fingerprint)
        return
    if manifest is not None:
        message = (
            f"{workdir} holds a zoo built from another config (fingerprint {manifest.get('fingerprint')}, "
            f"wanted {fingerprint})"
        )
        if on_mismatch == "error":
            raise ZooMismatchError(
                message
                + "; use another directory, delete it, or rebuild it (build_zoo --on_mismatch=rebuild)",
                manifest.get("config"),
            )
        log.warning("%s; rebuilding it", message)
    build(zoo_config, workdir, progress=progress)


def load_matching(zoo_config, workdir: str) -> Zoo:
    """The zoo already built in `workdir` from `zoo_config` (ValueError when there is none or it is another
    config's); never builds. For scripts that read a finished run's zoo."""
    if read_manifest(workdir) is None:
        raise ValueError(f"{workdir} holds no zoo (no manifest); build it with experiments.build_zoo")
    return build_or_load(zoo_config, workdir, on_mismatch="error", progress=False)


def format_summary(manifest: Mapping) -> str:
    """Markdown tables of the manifest's score matrices and task-vector sizes."""
    tasks, rows = manifest["tasks"], manifest["rows"]
    lines = []
    for split, matrix in manifest["score_matrix"].items():
        metric_names = [f"{t} ({manifest['metrics'][t]})" for t in tasks]
        lines += [f"\n{split} split", "", "| model | " + " | ".join(metric_names) + " |"]
        lines.append("|---" * (len(tasks) + 1) + "|")
        for name, row in zip(rows, matrix, strict=True):
            lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in row) + " |")
    ratios = manifest["task_vector_norm_ratio"]
    lines += ["", "||tau_k|| / ||theta_base||: " + ", ".join(f"{t} {r:.4f}" for t, r in ratios.items())]
    lines.append(
        f"build time: {manifest['build_time_s']:.1f} s wall, {manifest.get('build_cpu_s', float('nan')):.1f} s CPU "
        f"({manifest['timings_s']})"
    )
    return "\n".join(lines)


def time_scoring(zoo: Zoo, split: str = "search", repeats: int = 5) -> dict:
    """Seconds to score one model (the first expert) on every task of `split`, after compilation.

    Returns {"total_s": best of `repeats`, "<task>_s": best per task}.
    """
    model = next(iter(zoo.experts.values()))
    split_objectives = zoo.objectives[split]

    def run(objective):
        start = time.perf_counter()
        objectives.score_model(model.config, model.params, objective)
        return time.perf_counter() - start

    for objective in split_objectives.values():
        run(objective)  # compile
    per_task = {t: min(run(o) for _ in range(repeats)) for t, o in split_objectives.items()}
    totals = [sum(run(o) for o in split_objectives.values()) for _ in range(repeats)]
    return {"total_s": round(min(totals), 4), **{f"{t}_s": round(v, 4) for t, v in per_task.items()}}
