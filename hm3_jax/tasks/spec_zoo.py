"""A spec's checkpoints, tokenizer, data and objectives, loaded as the zoo a run works on (`hm3_jax.tasks.spec`).

`load(spec, seed)` returns a `SpecZoo`: the same fields a built-in zoo has (`hm3_jax.tasks.zoo.Zoo`: base,
experts keyed by objective, tokenizer, data, objectives per split, manifest, workdir) plus `groups`, the
objective of each task, so a run scores tasks and reports objectives (an objective's score is the mean of its
tasks' scores). What a score means: `hm3_jax.tasks.spec_objectives`.

Every expert must match the base's architecture, depth and width (else a SpecError naming the expert and the
field), and its vocabulary, unless the spec sets ``tokenizer_source: base``: then each expert's embedding and
LM-head rows are mapped onto the base tokenizer's ids (`hm3_jax.io.vocab`). Nothing in a checkpoint directory
is ever run (no remote code) or unpickled.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax.io import hf_config, vocab
from hm3_jax.io.checkpoint import Model, load_pretrained
from hm3_jax.tasks import spec as spec_lib
from hm3_jax.tasks import spec_data, spec_objectives
from hm3_jax.tasks.spec import SpecError

# Fields of the model config every expert must share with the base (else the pool is ill-formed).
SHARED_FIELDS = (
    "family",
    "num_layers",
    "hidden_size",
    "intermediate_size",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "hidden_act",
    "attention_bias",
    "attention_out_bias",
    "mlp_bias",
    "tie_word_embeddings",
    "rope_theta",
    "rope_scaling",
    "norm_eps",
)


class SpecZoo(NamedTuple):
    """A loaded spec (see the module docstring); field meanings as `hm3_jax.tasks.zoo.Zoo`.

    Attributes beyond Zoo's: spec: the `Spec`; groups: {task: objective}; splits: {task: {split: [row index]}}
    (the seeded split, recorded by the run); eos_ids: generation stops at these (() for image tasks); images:
    {accuracy task: {"pixel_values": float32 model inputs [N, C, H, W], "labels": [N], "head": {kernel, bias}}};
    harness: {lm_eval task: `harness_task.HarnessTask`} (rows of such a task are its documents, {"row": i + 1}).
    """

    base: Any
    experts: dict
    tokenizer: Any
    data: dict
    objectives: dict
    manifest: dict
    workdir: str
    spec: Any
    groups: dict
    splits: dict
    eos_ids: tuple
    images: dict
    harness: dict = {}

    @property
    def tasks(self) -> tuple[str, ...]:
        """The objectives (one per expert), in the spec's order."""
        return tuple(self.experts)

    def capped_search_objectives(self, search_examples: int) -> dict:
        """{task: objective} of the first `search_examples` examples of each task's search split (batches of
        min(eval_batch_size, search_examples) rows; generations as long as on the whole split)."""
        data = {t: {"search": d["search"][:search_examples]} for t, d in self.data.items()}
        spec = self.spec._replace(eval_batch_size=min(self.spec.eval_batch_size, search_examples))
        return spec_objectives.make_objectives(
            spec,
            data,
            self.tokenizer,
            self.base.config,
            self.eos_ids,
            self.images,
            ("search",),
            shapes_from=self.data,
            harness=self.harness,
        )["search"]


def load_tokenizer(path: str):
    """The HF tokenizer of a checkpoint directory (fast, local files only, never remote code)."""
    from transformers import AutoTokenizer  # transformers: ~15 s to import, paid only where it is used

    try:
        tok = AutoTokenizer.from_pretrained(
            path, use_fast=True, trust_remote_code=False, local_files_only=True
        )
    except Exception as e:  # transformers raises many types for a missing or unreadable tokenizer
        raise SpecError(
            f"{path}: cannot load its tokenizer with transformers' AutoTokenizer ({type(e).__name__}: {e}); the "
            "base directory needs the tokenizer files (tokenizer.json and tokenizer_config.json)"
        ) from e
    if not getattr(tok, "is_fast", False):
        raise SpecError(f"{path}: only a fast (tokenizer.json) tokenizer is supported")
    return tok


def eos_ids_of(path: str, tokenizer) -> tuple[int, ...]:
    """EOS ids generation stops at: generation_config.json's eos_token_id, else config.json's, else the
    tokenizer's (an int or a list in the files)."""
    for name in ("generation_config.json", "config.json"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file) as f:
                value = json.load(f).get("eos_token_id")
            if value is not None:
                return tuple(int(v) for v in (value if isinstance(value, list) else [value]))
    if tokenizer.eos_token_id is None:
        raise SpecError(f"{path}: no eos_token_id in generation_config.json, config.json or the tokenizer")
    return (int(tokenizer.eos_token_id),)


def check_expert(base_config, expert_config, name: str, expert_dir: str) -> None:
    """SpecError naming the expert and the field where it cannot share a pool with the base (vocabularies:
    `hm3_jax.io.vocab.check_same_vocab`, or mapped with `tokenizer_source: base`)."""
    for field in SHARED_FIELDS:
        a, b = getattr(base_config, field), getattr(expert_config, field)
        if a != b:
            raise SpecError(
                f"expert {name!r} ({expert_dir}): {field} is {b!r} but the base's is {a!r}; every expert must "
                "be a fine-tune of the base with the same architecture"
            )


class SpecTasks(NamedTuple):
    """What a spec describes besides the weights (`load_tasks`): read from the config.json files, the base's
    tokenizer and the data files; field meanings as `SpecZoo`'s (configs: {expert: ModelConfig})."""

    spec: Any
    base_config: Any
    configs: dict
    tokenizer: Any
    eos_ids: tuple
    data: dict
    splits: dict
    images: dict
    objectives: dict
    harness: dict = {}


def load_tasks(spec, seed: int = 0) -> SpecTasks:
    """A spec's configs (every expert checked against the base), tokenizer, split data and objectives, without
    reading any weights (a run's `load` and the memory plan, hm3_jax/pipeline/memory_plan.py, share it)."""
    if isinstance(spec, str):
        spec = spec_lib.load_spec(spec)
    base_config, _ = _named("the base", spec.base, hf_config.read_hf_config, spec.base)
    expert_configs = {}
    for name, d in spec.experts.items():
        expert_configs[name], _ = _named(f"expert {name!r}", d, hf_config.read_hf_config, d)
        check_expert(base_config, expert_configs[name], name, d)
        if spec.tokenizer_source != "base" and base_config.family != "vit":
            _named(f"expert {name!r}", d, vocab.check_same_vocab, spec.base, d, name)
    check_task_kinds(spec, base_config)
    text = any(t.metric != "accuracy" for t in spec.tasks.values())
    tokenizer = load_tokenizer(spec.base) if text else None
    eos_ids = eos_ids_of(spec.base, tokenizer) if text else ()
    data, splits, images, harness = {}, {}, {}, {}
    for name, task in spec.tasks.items():
        if task.metric == "lm_eval":
            harness[name] = spec_objectives.load_harness_task(task)
            rows = [{"row": i + 1} for i in range(len(harness[name].requests))]  # the task's documents
        elif task.metric == "accuracy":
            arrays, rows = spec_data.read_images(task)
            images[name] = {
                "pixel_values": preprocess_images(spec.base, arrays["pixel_values"], base_config, task),
                "labels": arrays["labels"],
                "head": spec_data.read_head(task),
            }
            check_head(task, images[name], base_config)
        else:
            rows = spec_data.read_rows(task)
        key = harness[name].split_key if task.metric == "lm_eval" else None  # harness: its data file's name
        splits[name] = spec_data.split_rows(task, rows, seed, key)
        data[name] = {s: [rows[i] for i in idx] for s, idx in splits[name].items()}
    objectives = spec_objectives.make_objectives(
        spec, data, tokenizer, base_config, eos_ids, images, harness=harness
    )
    return SpecTasks(
        spec, base_config, expert_configs, tokenizer, eos_ids, data, splits, images, objectives, harness
    )


def load(spec, seed: int = 0, on_host: bool = False) -> SpecZoo:
    """Loads a spec (a path or a `Spec`): models in the spec's dtype, tokenizer, split data, objectives.

    `on_host`: the models' params as host (numpy) arrays (`load_pretrained(..., on_host=True)`; a run on a mesh
    places only its pools' shards), else every tensor on the default device."""
    tasks = load_tasks(spec, seed)
    spec, tokenizer, eos_ids, data = tasks.spec, tasks.tokenizer, tasks.eos_ids, tasks.data
    splits, images, objectives = tasks.splits, tasks.images, tasks.objectives
    dtype = jnp.bfloat16 if spec.dtype == "bfloat16" else jnp.float32
    base = _named("the base", spec.base, load_pretrained, spec.base, dtype=dtype, on_host=on_host)
    experts = {}
    base_vocab = vocab.vocab_of(spec.base) if spec.tokenizer_source == "base" else None
    for name, d in spec.experts.items():
        expert = _named(f"expert {name!r}", d, load_pretrained, d, dtype=dtype, on_host=on_host)
        if base_vocab is not None:
            params = vocab.align_to_base_vocab(
                base_vocab, vocab.vocab_of(d), expert.params, base.params, expert.config
            )
            if on_host:  # the re-indexed embedding and head come back as device arrays: copied to the host
                # (`np.asarray` of a CPU-backend array is a view that keeps its device buffer alive)
                params = jax.tree.map(
                    lambda x: x if type(x) is np.ndarray else np.array(x, copy=True), params
                )
            expert = Model(base.config, params, expert.hf_config)
        experts[name] = expert
    groups = {t: s.objective for t, s in spec.tasks.items()}
    manifest = {
        "kind": "spec",
        "spec": spec_lib.as_dict(spec),
        "tasks": list(spec.experts),
        "metrics": {t: s.metric for t, s in spec.tasks.items()},
        "groups": groups,
        "paths": {"base": spec.base, "experts": dict(spec.experts), "tokenizer": spec.base},
        "config": {"eval_batch_size": spec.eval_batch_size},
        "sizes": {"examples": {t: {s: len(v) for s, v in d.items()} for t, d in data.items()}},
    }
    return SpecZoo(
        base,
        experts,
        tokenizer,
        data,
        objectives,
        manifest,
        os.path.dirname(spec.path),
        spec,
        groups,
        splits,
        eos_ids,
        images,
        tasks.harness,
    )


def _named(who: str, path: str, fn, *args, **kwargs):
    """`fn(*args, **kwargs)`; a checkpoint that cannot be read (bad config, missing or unreadable weights, other
    vocabulary, remote code) is a SpecError saying which model of the spec it is (the message names the file)."""
    try:
        return fn(*args, **kwargs)
    except SpecError:
        raise
    except (ValueError, OSError) as e:
        raise SpecError(f"{who} ({path}): {e}") from e


def check_task_kinds(spec, config) -> None:
    """Image tasks (accuracy) need a ViT encoder without classifier (ViTModel; the heads are the tasks'),
    text tasks a language model."""
    for name, task in spec.tasks.items():
        vision = task.metric == "accuracy"
        if vision and (config.family != "vit" or config.num_labels):
            raise SpecError(
                f"task {name!r}: metric accuracy needs a ViTModel base (an encoder without classifier, "
                f"num_labels 0), got family {config.family!r} with {config.num_labels} labels"
            )
        if not vision and config.family == "vit":
            raise SpecError(f"task {name!r}: metric {task.metric} needs a language model; the base is a ViT")


def preprocess_images(base_dir: str, pixels, config, task):
    """uint8 images [N, C, H, W] -> float32 model inputs through the base's own `preprocessor_config.json` with
    transformers' image processor (as transformers would feed the model)."""
    from transformers import AutoImageProcessor  # transformers: ~15 s to import, paid only where it is used

    if not os.path.isfile(os.path.join(base_dir, "preprocessor_config.json")):
        raise SpecError(
            f"{base_dir}: an image task ({task.name!r}) needs the base's preprocessor_config.json"
        )
    processor = AutoImageProcessor.from_pretrained(  # the numpy processor: the one the file describes
        base_dir, local_files_only=True, trust_remote_code=False, use_fast=False
    )
    out = processor(images=list(pixels), input_data_format="channels_first", return_tensors="np")[
        "pixel_values"
    ]
    want = (len(pixels), config.num_channels, config.image_size, config.image_size)
    if out.shape != want:
        raise SpecError(
            f"{task.data}: images preprocess to {out.shape[1:]}, the model takes {want[1:]} "
            f"(check the images' size and the base's preprocessor_config.json)"
        )
    return out.astype("float32")


def check_head(task, image_task: dict, config) -> None:
    head, labels = image_task["head"], image_task["labels"]
    if head["kernel"].shape[0] != config.hidden_size:
        raise SpecError(
            f"{task.head}: kernel has {head['kernel'].shape[0]} rows, the model's hidden size is "
            f"{config.hidden_size}"
        )
    if labels.min() < 0 or labels.max() >= head["kernel"].shape[1]:
        raise SpecError(
            f"{task.data}: labels lie in [{labels.min()}, {labels.max()}], the head has "
            f"{head['kernel'].shape[1]} classes"
        )


def describe(zoo: SpecZoo) -> dict:
    """Sizes and the recorded split of a loaded spec (JSON-able; a run stores it)."""
    return {
        "examples": zoo.manifest["sizes"]["examples"],
        "splits": {
            t: {s: [zoo.data[t][s][i]["row"] for i in range(len(idx))] for s, idx in v.items()}
            for t, v in zoo.splits.items()
        },
        "eos_ids": list(zoo.eos_ids),
        "groups": zoo.groups,
    }
