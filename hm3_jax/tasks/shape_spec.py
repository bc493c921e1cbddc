"""A spec with the shapes of a real setting and nothing else: for memory plans before anything is downloaded.

`write_shape_spec(directory, configs, tasks, ...)` writes a spec directory whose checkpoints are config.json
files only (the real models' hyperparameters; no weights), whose tokenizer is character-level (one token per
character, so a row of n characters is n tokens, plus BOS when the base adds one) and whose JSONL rows have the
token lengths a `TaskShape` gives. `hm3_jax.pipeline.memory_plan` plans it exactly as it would plan the real spec
with data of those lengths (`experiments/configs/llama2_7b.py:shapes`); a run on it stops at the missing
weights, naming the file.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import yaml
from tokenizers import Tokenizer, models, processors

_ALPHABET = "abcdefghij"  # prompt, target and choice text; every character is one token
_SPECIALS = ("<pad>", "<s>", "</s>")


class TaskShape(NamedTuple):
    """Token lengths of one task of a spec (the longest rows; every row has them).

    Attributes: metric (a spec metric); objective (an expert's name); rows: examples in the data file (split
    70 / 30 by the run); prompt_tokens: prompt length (BOS included when the base adds one); target_tokens:
    exact_match / chrf targets, or each choice of multiple_choice; choices: multiple_choice's choices per row;
    max_new_tokens: the generation budget (None: target_tokens + 8, the spec's default).
    """

    metric: str
    objective: str
    rows: int
    prompt_tokens: int
    target_tokens: int
    choices: int = 0
    max_new_tokens: int | None = None


def char_tokenizer(add_bos: bool):
    """A fast HF tokenizer with one token per character of `_ALPHABET` and <pad> 0, <s> 1, </s> 2 (BOS before
    every text when `add_bos`, as Llama's)."""
    from transformers import (
        PreTrainedTokenizerFast,  # transformers: ~15 s to import, paid only where it is used
    )

    vocab = {t: i for i, t in enumerate(_SPECIALS + tuple(_ALPHABET))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _rows(shape: TaskShape, bos: int) -> list[dict]:
    prompt = "a" * (shape.prompt_tokens - bos)
    if shape.metric == "multiple_choice":
        choices = [_ALPHABET[1 + j % 9] * shape.target_tokens for j in range(shape.choices)]
        return [
            {"prompt": prompt, "choices": choices, "answer": i % shape.choices} for i in range(shape.rows)
        ]
    return [{"prompt": prompt, "target": "b" * shape.target_tokens} for _ in range(shape.rows)]


def write_shape_spec(
    directory: str,
    configs: dict,
    tasks: dict,
    *,
    dtype: str = "bfloat16",
    eval_batch_size: int = 16,
    tokenizer_source: str | None = None,
    add_bos: bool = True,
) -> str:
    """Writes the spec directory and returns the spec's path.

    Args:
      directory: created if missing; its spec.yaml, config.json files, tokenizer and data are (re)written.
      configs: {"base": config.json dict, expert name: config.json dict, ...} (experts in objective order).
      tasks: {task name: TaskShape}.
      dtype, eval_batch_size, tokenizer_source: the spec's fields.
      add_bos: whether the base's tokenizer puts BOS before a prompt (Llama yes, Qwen2 no).
    """
    tok = char_tokenizer(add_bos)
    for name, hf in configs.items():
        d = os.path.join(directory, name)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(hf, f, indent=1)
        if name == "base" or tokenizer_source != "base":
            tok.save_pretrained(d)
    os.makedirs(os.path.join(directory, "data"), exist_ok=True)
    spec = {
        "base": "base",
        "experts": {n: n for n in configs if n != "base"},
        "tasks": {},
        "dtype": dtype,
        "eval_batch_size": eval_batch_size,
    }
    if tokenizer_source:
        spec["tokenizer_source"] = tokenizer_source
    for name, shape in tasks.items():
        path = os.path.join("data", f"{name}.jsonl")
        with open(os.path.join(directory, path), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in _rows(shape, int(add_bos)))
        entry = {"data": path, "metric": shape.metric, "objective": shape.objective}
        if shape.max_new_tokens is not None:
            entry["max_new_tokens"] = shape.max_new_tokens
        spec["tasks"][name] = entry
    spec_path = os.path.join(directory, "spec.yaml")
    with open(spec_path, "w") as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    return spec_path
