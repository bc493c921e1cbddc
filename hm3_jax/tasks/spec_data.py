"""A spec's data files (`hm3_jax.tasks.spec`), read and checked: JSONL rows, image arrays and heads, and the
seeded search / held-out split of each task's rows. Every mistake is a `SpecError` naming the file or row.
"""

from __future__ import annotations

import json
import os
import zlib

import numpy as np

from hm3_jax.tasks.spec import SPLITS, SpecError, TaskSpec

SEARCH_FRACTION = 0.7  # of a task's rows without their own "split", the share searched on


def _fail(where: str, message: str):
    raise SpecError(f"{where}: {message}")


def read_images(task: TaskSpec) -> tuple[dict, list[dict]]:
    """An accuracy task's arrays ({"pixel_values": uint8 [N, C, H, W], "labels": int64 [N]}) and one row per image
    ({"row": 1-based index, "split" when the file gives one}); the head ({"kernel", "bias"}) is `read_head`."""
    try:
        with np.load(task.data, allow_pickle=False) as f:
            raw = {k: f[k] for k in f.files}
    except Exception as e:  # a truncated or foreign file
        raise SpecError(f"{task.data}: not a readable .npz file ({type(e).__name__}: {e})") from e
    parts = {s: (raw.get(f"{s}/pixel_values"), raw.get(f"{s}/labels")) for s in SPLITS}
    if all(p is not None and y is not None for p, y in parts.values()):
        pixels = np.concatenate([parts[s][0] for s in SPLITS])
        labels = np.concatenate([parts[s][1] for s in SPLITS])
        splits = [s for s in SPLITS for _ in range(len(parts[s][1]))]
    elif "pixel_values" in raw and "labels" in raw:
        pixels, labels, splits = raw["pixel_values"], raw["labels"], None
    else:
        _fail(
            task.data,
            f"needs arrays pixel_values and labels (or search/... and heldout/...), has {sorted(raw)}",
        )
    if pixels.dtype != np.uint8 or pixels.ndim != 4:
        _fail(task.data, f"pixel_values must be uint8 images [N, C, H, W], got {pixels.dtype} {pixels.shape}")
    if labels.ndim != 1 or len(labels) != len(pixels) or not np.issubdtype(labels.dtype, np.integer):
        _fail(
            task.data,
            f"labels must be integers [N] for {len(pixels)} images, got {labels.dtype} {labels.shape}",
        )
    rows = [{"row": i + 1} | ({} if splits is None else {"split": splits[i]}) for i in range(len(labels))]
    if not rows:
        _fail(task.data, f"no images (task {task.name!r})")
    return {"pixel_values": pixels, "labels": labels.astype(np.int64)}, rows


def read_head(task: TaskSpec) -> dict:
    """An accuracy task's head {"kernel": float32 [D, C], "bias": float32 [C]} (checked)."""
    try:
        with np.load(task.head, allow_pickle=False) as f:
            head = {k: np.asarray(f[k], np.float32) for k in ("kernel", "bias") if k in f.files}
    except Exception as e:
        raise SpecError(f"{task.head}: not a readable .npz file ({type(e).__name__}: {e})") from e
    if (
        set(head) != {"kernel", "bias"}
        or head["kernel"].ndim != 2
        or head["bias"].shape != head["kernel"].shape[1:]
    ):
        _fail(task.head, "a head file holds kernel [D, C] and bias [C]")
    return head


def read_rows(task: TaskSpec) -> list[dict]:
    """The task's JSONL rows, checked for the fields its metric needs; each gets its 1-based line as "row"."""
    rows = []
    with open(task.data, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{task.data}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SpecError(f"{where}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                _fail(where, f"expected a JSON object, got {type(row).__name__}")
            rows.append(_check_row(row, task.metric, where) | {"row": line_no})
    if not rows:
        _fail(task.data, f"no rows (task {task.name!r})")
    return rows


def _check_row(row: dict, metric: str, where: str) -> dict:
    def text(key):
        if key not in row:
            _fail(where, f"missing field {key!r} (a {metric} row needs {needs})")
        if not isinstance(row[key], str):
            _fail(where, f"field {key!r} must be a string, got {type(row[key]).__name__}")
        return row[key]

    needs = "prompt, choices, answer" if metric == "multiple_choice" else "prompt, target"
    out = {"prompt": text("prompt")}
    if not out["prompt"]:
        _fail(where, "empty prompt")
    if metric == "multiple_choice":
        choices = row.get("choices")
        if not isinstance(choices, list) or not choices:
            _fail(where, f"field 'choices' must be a non-empty list of strings, got {choices!r}")
        if not all(isinstance(c, str) and c for c in choices):
            _fail(where, "every choice must be a non-empty string")
        answer = row.get("answer")
        if not isinstance(answer, int) or isinstance(answer, bool):
            _fail(where, f"field 'answer' must be an integer index into choices, got {answer!r}")
        if not 0 <= answer < len(choices):
            _fail(where, f"answer index {answer} is out of range for {len(choices)} choices")
        out |= {"choices": list(choices), "answer": answer}
    else:
        out["target"] = text("target")
    split = row.get("split")
    if split is not None and split not in SPLITS:
        _fail(where, f"field 'split' must be one of {list(SPLITS)}, got {split!r}")
    if split is not None:
        out["split"] = split
    return out


def split_rows(task: TaskSpec, rows: list[dict], seed: int, key: str | None = None) -> dict[str, list[int]]:
    """{split: indices into `rows`}: a row's own "split" is honoured; the others are shuffled with
    `np.random.default_rng([seed, crc32(key)])` and the first round(0.7 n) go to "search" (tasks that read one
    file split it alike: an example is never searched in one task and held out in another).

    key: the name the shuffle is seeded with; default the data file's name (a harness task passes its
    `HarnessTask.split_key`: the name of the JSONL file its documents are read from).

    Raises SpecError when a split ends up empty (name the task and how many rows it has).
    """
    out = {s: [i for i, r in enumerate(rows) if r.get("split") == s] for s in SPLITS}
    free = np.asarray([i for i, r in enumerate(rows) if "split" not in r], np.int64)
    if free.size:
        key = os.path.basename(task.data) if key is None else key
        rng = np.random.default_rng([int(seed), zlib.crc32(key.encode())])
        free = free[rng.permutation(free.size)]
        n_search = int(round(SEARCH_FRACTION * free.size))
        out["search"] = sorted(out["search"] + free[:n_search].tolist())
        out["heldout"] = sorted(out["heldout"] + free[n_search:].tolist())
    for s in SPLITS:
        if not out[s]:
            _fail(
                task.data,
                f"the {s!r} split of task {task.name!r} is empty ({len(rows)} rows); add rows or give some rows "
                f'"split": "{s}"',
            )
    return out
