"""The data-aware merges' calibration rows, from the SEARCH split of a Problem only (issue 19).

`search_calibration(problem, rows, continuation_tokens)` and `objective_calibration(...)` build one `Calibration`
per objective (expert); `data_aware_menu`'s module docstring describes the rows (prompts of teacher-forced and
generation tasks, images read by their frozen head, each expert's own continuation). `continuation_passes` is
what continuing the rows costs.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from hm3_jax import merging, models
from hm3_jax.merging import Calibration, CalibrationPasses
from hm3_jax.search.problem import Problem


def lm_forward(config, params, inputs):
    """`inputs` `[B, 2, S]` (token ids, attention mask) -> logits `[B, S, V]` (`models.apply`)."""
    return models.apply(config, params, inputs[:, 0], inputs[:, 1])


def head_forward(config, head_kernel, head_bias, params, pixel_values):
    """`pixel_values` `[B, C, H, W]` -> logits `[B, C']` = h_cls @ head_kernel + head_bias (`head_kernel` `[D, C']`,
    h_cls the CLS row of the encoder's final LayerNorm, as `accuracy.make_accuracy_objective` reads it)."""
    feats = models.apply(config, params, pixel_values)[:, 0].astype(jnp.float32)
    return feats @ head_kernel + head_bias


def _image_calibration(config, objectives_k: list, rows: int) -> Calibration:
    """The `Calibration` of one image objective: its first `rows` search images and its frozen head's logits."""
    if len(objectives_k) != 1:
        raise ValueError(
            "data-aware merges: an objective of several image tasks has several heads; group image tasks one "
            f"per objective (got {[o.name for o in objectives_k]})"
        )
    tree = objectives_k[0].arrays.tree
    n = min(int(rows), int(objectives_k[0].num_examples))
    pixels = np.asarray(tree["pixel_values"]).reshape((-1,) + np.shape(tree["pixel_values"])[-3:])[:n]
    forward = functools.partial(
        head_forward, config, jnp.asarray(tree["head_kernel"]), jnp.asarray(tree["head_bias"])
    )
    return Calibration(forward, pixels.astype(np.float32))


def _task_rows(objective, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, mask, weights) `[n, S]` of the first `rows` real examples of one search objective, prompts only."""
    tree = objective.arrays.tree
    n = min(int(rows), int(objective.num_examples))
    if "prompt_ids" in tree:  # generation: left-padded prompts and their mask
        ids = np.asarray(tree["prompt_ids"]).reshape(-1, np.shape(tree["prompt_ids"])[-1])[:n]
        mask = np.asarray(tree["prompt_mask"]).reshape(-1, ids.shape[-1])[:n]
        return ids.astype(np.int32), mask.astype(np.int32), mask.astype(np.float32)
    if "input_ids" in tree and "target_mask" in tree:  # teacher forced: [bos] + prompt + target, right-padded
        ids = np.asarray(tree["input_ids"]).reshape(-1, np.shape(tree["input_ids"])[-1])[:n]
        target = np.asarray(tree["target_mask"]).reshape(-1, ids.shape[-1])[:n] > 0
        if not np.all(target.any(1)):
            raise ValueError(f"{objective.name}: a search example has no target tokens")
        prompt_len = np.argmax(target, axis=1) + 1  # target_mask[t] = 1 when ids[t + 1] is a target token
        weights = (np.arange(ids.shape[1])[None] < prompt_len[:, None]).astype(np.float32)
        ids = np.where(weights > 0, ids, 0).astype(np.int32)  # no target token left in the rows
        return ids, np.ones_like(ids), weights
    raise ValueError(
        f"data-aware merges need token prompts; search objective {objective.name!r} (metric "
        f"{objective.metric!r}) has arrays {sorted(tree)}"
    )


def search_calibration(problem: Problem, rows: int, continuation_tokens: int = 0) -> list[Calibration]:
    """One `Calibration` per objective (expert) from the search split, prompt tokens only (module docstring).

    An objective of several tasks (`problem.groups`) gets the first `rows` examples of each of its tasks, right-
    padded to a common length with weight 0. With `continuation_tokens` = T > 0 every token calibration of
    objective k is continued by expert k's own greedy answer (`merging.own_continuation`, T tokens, weighted up
    to the first of `problem.eos_ids`); image calibrations are left as they are.
    """
    groups = problem.groups or tuple(range(problem.num_tasks))
    calibration = objective_calibration(
        problem.config, problem.objectives["search"], groups, problem.tasks, rows
    )
    if int(continuation_tokens) <= 0:
        return calibration
    return [
        c
        if problem.config.family == "vit"
        else merging.own_continuation(
            problem.config, expert, c, int(continuation_tokens), problem.eos_ids, problem.tasks[k]
        )
        for k, (c, expert) in enumerate(zip(calibration, problem.experts, strict=True))
    ]


def continuation_passes(calibration, continuation_tokens: int) -> CalibrationPasses:
    """What continuing the calibration rows costs: one forward of each row (its prompt and T generated tokens,
    with a KV cache; counted as one pass per row)."""
    if int(continuation_tokens) <= 0:
        return CalibrationPasses(0, 0)
    return CalibrationPasses(sum(c.num_rows for c in calibration), 0)


def objective_calibration(config, objectives, groups, tasks, rows: int) -> list[Calibration]:
    """`search_calibration` from its parts: the model's `config`, the search split's `objectives`, their
    objective index `groups` and the objectives' names `tasks` (K); also what the memory plan measures."""
    if int(rows) < 1:
        raise ValueError(f"data-aware merges: calibration rows must be >= 1, got {rows}")
    forward = functools.partial(lm_forward, config)
    out = []
    for k in range(len(tasks)):
        objectives_k = [o for o, g in zip(objectives, groups, strict=True) if g == k]
        if not objectives_k:
            raise ValueError(f"data-aware merges: objective {tasks[k]!r} has no search task")
        if any({"pixel_values", "head_kernel"} <= set(o.arrays.tree) for o in objectives_k):
            out.append(_image_calibration(config, objectives_k, rows))
            continue
        parts = [_task_rows(o, rows) for o in objectives_k]
        width = max(p[0].shape[1] for p in parts)
        ids, mask, weights = (
            np.concatenate([np.pad(p[i], ((0, 0), (0, width - p[i].shape[1]))) for p in parts])
            for i in range(3)
        )
        out.append(Calibration(forward, np.stack([ids, mask], 1), weights))
    return out
