"""Text and JSON results written whole, by one process: what a run, a report or an export writes for a user.

`write_text` / `write_json` go through `hm3_jax.io.atomic.write_text` (a temporary beside the path, renamed into
place: no half-written file after an interruption). In a multi-process JAX run every process computes the same
text; only process 0 writes it (two writers of one path would race) and the others return at once.
`to_jsonable` turns what results hold (numpy and jax arrays and scalars, tuples, non-finite floats) into plain
JSON values: NaN -> null, +-inf -> +-1e308.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np

from hm3_jax.io import atomic


def to_jsonable(x: Any) -> Any:
    """`x` with arrays as nested lists, tuples as lists, dict keys as strings and non-finite floats made finite
    (NaN -> None, +-inf -> +-1e308)."""
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, np.generic)) or type(x).__module__.startswith("jax"):
        return to_jsonable(np.asarray(x).tolist())
    if isinstance(x, float) and not np.isfinite(x):
        return None if np.isnan(x) else (1e308 if x > 0 else -1e308)
    return x


def is_main_process() -> bool:
    """True in process 0 of a multi-process JAX run (and in a single-process run)."""
    return jax.process_index() == 0


def write_text(path: str, text: str) -> None:
    """Writes `text` to `path` atomically from process 0 only (raises OSError as `atomic.write_text`)."""
    if is_main_process():
        atomic.write_text(path, text)


def write_json(path: str, obj: Any) -> None:
    """`write_text` of `to_jsonable(obj)` as indented JSON (keys in their order) and a final newline."""
    write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")
