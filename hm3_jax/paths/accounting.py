"""Step 5 of the path engine's `evaluate`: the objectives' host-side scores of the evaluated rows and what
evaluating them cost (block steps and analytic FLOPs, with and without the prefix tree's sharing).

`recorded` is what `recording.record_objectives` learnt: per-path FLOPs of the teacher-forced objectives'
blocks (`tf_block_flops`, per real block) and LM heads (`tf_head_flops`), and per decode call a function of
the path length (`dec_flops_fns`).
"""

from __future__ import annotations

import jax
import numpy as np


def path_flops(recorded: dict, length: int) -> float:
    """Analytic forward FLOPs of one path of `length` real blocks on every objective, evaluated alone (no
    prefix sharing; the LM head where the objectives read it, e.g. exact match's target positions)."""
    tf = recorded["tf_block_flops"] * length + recorded["tf_head_flops"]
    return float(tf + sum(f(length) for f in recorded["dec_flops_fns"]))


def rows_cost(recorded: dict, lengths, *, has_tf: bool, has_dec: bool, tree_block_steps: int | None) -> dict:
    """Cost fields (`cache.Cost`) of evaluating rows of real lengths `lengths` [n].

    has_tf / has_dec: whether teacher-forced / decode objectives ran. tree_block_steps: the prefix tree's
    block steps when the teacher-forced objectives ran as a tree (each node's block once, each path's head
    once), None when they ran plain. Decode objectives always run plain. The `*_plain` fields are the cost
    of every path evaluated alone (`path_flops`)."""
    n = lengths.shape[0]
    block_steps_plain = int(lengths.sum())
    flops_plain = sum(path_flops(recorded, int(t)) for t in lengths)
    flops = 0.0
    block_steps = 0
    if tree_block_steps is not None:
        flops += tree_block_steps * recorded["tf_block_flops"] + n * recorded["tf_head_flops"]
        block_steps += tree_block_steps
    elif has_tf:
        flops += sum(recorded["tf_block_flops"] * int(t) + recorded["tf_head_flops"] for t in lengths)
        block_steps += int(lengths.sum())
    if has_dec:
        flops += sum(sum(f(int(t)) for f in recorded["dec_flops_fns"]) for t in lengths)
        if not has_tf:
            block_steps += int(lengths.sum())
    return dict(
        num_evaluations=n,
        block_steps=block_steps,
        block_steps_plain=block_steps_plain,
        flops=float(flops),
        flops_plain=float(flops_plain),
    )


def host_scores(objectives, raw: list, n: int, keep_examples: bool):
    """(scores float64 [n, num_objectives], per row and objective its `example_fn` statistics or None) of the
    objectives' device outputs `raw` (per objective, stacked [n, ...]): `host_fn` of each row's output.
    Raises ValueError for a score outside [0, 100] (or not finite)."""
    scores = np.zeros((n, len(objectives)))
    stats = [[None] * len(objectives) for _ in range(n)] if keep_examples else None
    for k, obj in enumerate(objectives):
        for i in range(n):
            row = jax.tree.map(lambda a, i=i: np.asarray(a[i]), raw[k])
            if keep_examples and getattr(obj, "example_fn", None) is not None:
                stats[i][k] = obj.example_fn(row)
            value = float(obj.host_fn(row))
            if not np.isfinite(value) or value < -1e-6 or value > 100 + 1e-6:
                raise ValueError(f"objective {obj.name!r} returned score {value}, expected within [0, 100]")
            scores[i, k] = value
    return scores, stats
