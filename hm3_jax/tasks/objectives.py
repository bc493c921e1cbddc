"""Objectives: scores of a forward function on a task split, fixed-shape so one jit serves every model/path.

An `Objective` (docs/DESIGN.md) is a hashable NamedTuple, so it can be a static `jax.jit` argument:

* ``device_fn(forward) -> array`` is jittable. For ``metric == "exact_match"``, ``forward`` maps
  ``input_ids [B, S] -> logits [B, S, V]`` and the result is ``correct bool [N]`` ("multiple_choice": the
  same forward, result ``float32 [R_pad]`` summed continuation log-probabilities). For the decode metrics
  (``"chrf"``, ``"generated_exact_match"``: `hm3_jax.paths.engine.DECODE_METRICS`), ``forward`` is a decode
  closure ``(prompt_ids [B, P], prompt_mask [B, P], max_new_tokens: int) ->
  tokens [B, max_new_tokens]`` (greedy, left-padded prompts) and the result is ``tokens int32 [N, T]``.
  For ``metric == "accuracy"`` (tiny8, `make_accuracy_objective`), ``forward`` maps
  ``pixel_values [B, C, H, W] -> ViT hidden states [B, N+1, D]`` and the objective applies its task's fixed
  linear head to the CLS feature; the result is ``correct bool [N]``.
* ``host_fn(array) -> float`` turns that into the score in [0, 100].
* ``example_fn(array) -> np.ndarray`` gives the per-example statistics behind the score, for paired bootstraps
  (`hm3_jax.moo.bootstrap`): ``bool [N]`` correctness (exact match, accuracy, generated exact match, multiple
  choice) or ``int [N, S]`` chrF sentence statistics, in the row order of its input (the kernel's rows, as
  `path_device_scores` returns them: length-bucketed for teacher-forced exact match, the examples' own order
  otherwise; the same for every model, which is all a paired resample needs). Its full-sample score
  (`moo.bootstrap.full_score`) equals host_fn's.

The split is padded to a multiple of the batch size and `lax.map` runs over the batches, so the whole split is
one jitted call whose shapes depend only on the objective. The objectives of each kind:
`hm3_jax.tasks.exact_match` (teacher-forced exact match), `hm3_jax.tasks.generation` (greedy generation, chrF
and generated exact match), `hm3_jax.tasks.multiple_choice`, `hm3_jax.tasks.accuracy` (image heads); their rows
are packed by `hm3_jax.tasks.packing` and scored by `hm3_jax.tasks.scoring`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np


class ArrayBundle:
    """The padded arrays of one objective (numpy, fixed shapes); hashed and compared by identity."""

    def __init__(self, tree: dict[str, np.ndarray]):
        self.tree = tree

    def __repr__(self) -> str:
        shapes = jax.tree.map(lambda x: tuple(x.shape), self.tree)
        return f"ArrayBundle({shapes})"


class Objective(NamedTuple):
    """One task split as a maximised score in [0, 100] (see module docstring for the device/host contract).

    `kernel(forward, arrays) -> array` is the shape-generic computation behind `device_fn` (a module-level
    function shared by every objective of one metric), and `arrays.tree` holds the split's padded arrays, so
    `score_path` can pass them traced and one compilation serves every objective of the same shapes.
    `device_fn(forward)` is `kernel(forward, arrays)` restricted to the real examples (multiple choice: equal
    to it). `example_fn(kernel output) -> per-example statistics` (None for objectives built elsewhere).
    """

    name: str  # "<task>/<split>", e.g. "math/search"
    # "exact_match" (teacher-forced), "generated_exact_match", "chrf" (both decode: engine.DECODE_METRICS),
    # "multiple_choice" or "accuracy" (forward: pixel_values -> ViT hidden states)
    metric: str
    device_fn: Callable[[Callable], jax.Array]
    host_fn: Callable[[Any], float]
    num_examples: int
    batch_size: int
    kernel: Callable[[Callable, dict], jax.Array]
    arrays: ArrayBundle
    example_fn: Callable[[Any], np.ndarray] | None = None


def correct_flags(name: str, num: int, n_pad: int, correct) -> np.ndarray:
    """bool [num]: the first `num` entries of `correct` ([num] or [n_pad]), with a clear error naming the
    objective on any other shape (the example_fn of the correctness metrics)."""
    correct = np.asarray(correct)
    if correct.ndim != 1 or correct.shape[0] not in (num, n_pad):
        raise ValueError(f"{name}: expected correctness of shape ({num},) or ({n_pad},), got {correct.shape}")
    return correct[:num].astype(bool)


def percent_correct(name: str, num: int, n_pad: int, correct) -> float:
    """Host part of the correctness metrics: 100 * mean of `correct_flags`."""
    return 100.0 * float(correct_flags(name, num, n_pad, correct).mean())
