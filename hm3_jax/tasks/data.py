"""Task registry, deterministic generation, dedupe and the search/heldout split, JSONL I/O.

Every task has three disjoint parts, generated from one seed:

* ``"train"``: data the zoo builder fine-tunes the task's expert on (never scored);
* ``"search"`` (70% of the evaluation pool): the only data any search may look at;
* ``"heldout"`` (30% of the evaluation pool): only for reported numbers.

Examples are deduplicated by prompt before splitting (the target is a function of the prompt), so no prompt
appears in two parts. An example is a dict ``{"task", "split", "prompt", "target"}``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import numpy as np

from hm3_jax.io import atomic
from hm3_jax.tasks import arithmetic, code_output, translation

TASK_MODULES = {m.NAME: m for m in (translation, arithmetic, code_output)}
TASK_NAMES = tuple(TASK_MODULES)  # ("translation", "math", "code"): column order of every score matrix
SPLITS = ("train", "search", "heldout")
SEARCH_FRACTION = 0.7


def task_metric(task: str) -> str:
    """Returns the metric name ("chrf" or "exact_match") of a task."""
    return _module(task).METRIC


def _module(task: str):
    if task not in TASK_MODULES:
        raise ValueError(f"unknown task {task!r}; known tasks: {list(TASK_MODULES)}")
    return TASK_MODULES[task]


def unique_samples(
    sample_fn: Callable[[np.random.Generator], tuple[str, str]],
    rng: np.random.Generator,
    num: int,
    max_attempts_factor: int = 50,
    name: str = "task",
) -> list[tuple[str, str]]:
    """Draws `num` examples with distinct prompts, in draw order.

    Raises:
      ValueError: the generator could not produce `num` distinct prompts in `max_attempts_factor * num` draws.
    """
    seen: dict[str, str] = {}
    for _ in range(max_attempts_factor * num):
        prompt, target = sample_fn(rng)
        if prompt in seen:
            continue
        seen[prompt] = target
        if len(seen) == num:
            return list(seen.items())
    raise ValueError(
        f"{name}: only {len(seen)} distinct prompts in {max_attempts_factor * num} draws, "
        f"{num} were requested"
    )


def generate_task(task: str, seed: int, num_eval: int, num_train: int) -> dict[str, list[dict]]:
    """Generates one task's train/search/heldout parts deterministically.

    Args:
      task: one of `TASK_NAMES`.
      seed: integer seed; the task's stream is ``np.random.default_rng([seed, task_index])``.
      num_eval: size of the evaluation pool, split round(0.7 * num_eval) search / the rest heldout.
      num_train: number of training examples (disjoint from the evaluation pool).

    Returns:
      {"train": [...], "search": [...], "heldout": [...]} lists of example dicts.
    """
    module = _module(task)
    if num_eval < 2 or num_train < 0:
        raise ValueError(f"{task}: need num_eval >= 2 and num_train >= 0, got {num_eval}, {num_train}")
    rng = np.random.default_rng([seed, TASK_NAMES.index(task)])
    pairs = unique_samples(module.sample, rng, num_eval + num_train, name=task)
    order = rng.permutation(len(pairs))
    pairs = [pairs[i] for i in order]
    num_search = int(round(SEARCH_FRACTION * num_eval))
    bounds = {"search": (0, num_search), "heldout": (num_search, num_eval), "train": (num_eval, len(pairs))}
    return {
        split: [{"task": task, "split": split, "prompt": p, "target": t} for p, t in pairs[lo:hi]]
        for split, (lo, hi) in bounds.items()
    }


def generate_all(seed: int, num_eval: int, num_train: int, tasks: Sequence[str] = TASK_NAMES):
    """Generates every task: {task: {split: [example, ...]}}."""
    return {task: generate_task(task, seed, num_eval, num_train) for task in tasks}


def write_jsonl(path: str, examples: Sequence[dict]) -> None:
    """Writes examples as JSON lines atomically (temp file in the same directory, then rename)."""
    with atomic.atomic_file(path) as f:
        for example in examples:
            f.write(json.dumps(example, ensure_ascii=False) + "\n")


def read_jsonl(path: str) -> list[dict]:
    """Reads examples written by `write_jsonl`, checking the required fields."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            example = json.loads(line)
            missing = {"task", "split", "prompt", "target"} - set(example)
            if missing:
                raise ValueError(f"{path}:{line_no}: example lacks fields {sorted(missing)}")
            examples.append(example)
    return examples


def group_by_split(examples: Sequence[dict]) -> dict[str, list[dict]]:
    """Groups examples of one task by their "split" field (order kept)."""
    out: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for example in examples:
        if example["split"] not in out:
            raise ValueError(f"unknown split {example['split']!r}; expected one of {SPLITS}")
        out[example["split"]].append(example)
    return out
