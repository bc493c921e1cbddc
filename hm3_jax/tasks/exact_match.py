"""Teacher-forced exact match: one forward pass scores greedy decoding of a whole target.

Each example is ``x = [bos] + prompt`` and ``y = target + [eos]``. Greedy
decoding from x outputs exactly y (then stops) iff for every j, ``argmax p(. | x, y_<j) == y_j``: by
induction the greedy prefix equals y_<j at step j, so the greedy step-j token is that argmax. So one forward
pass over ``x ++ y``
(right-padded; causal attention keeps padding out of earlier positions) gives greedy exact match:
``correct = all_j [argmax logits[|x| - 1 + j] == y_j]``. Exact match is at the token level of the canonical
tokenization of the target (the tokenization the experts were trained on).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax.tasks.objectives import ArrayBundle, Objective, correct_flags, percent_correct
from hm3_jax.tasks.packing import bucket_teacher_forced, round_up


def argmax_equals(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Whether `argmax(logits, -1) == labels`, without materialising the argmax (same result as jnp.argmax).

    `jnp.argmax` returns the first index of the maximum, NaN counting as the maximum. So the argmax is y iff no
    entry j "beats" y, where, with l = logits[..., y]:
      l not NaN:  j beats y iff  l_j is NaN  or  l_j > l  or  (l_j == l and j < y);
      l NaN:      j beats y iff  l_j is NaN and j < y.
    This is one fused elementwise pass and an OR-reduction over V, where XLA:CPU lowers `jnp.argmax` to a
    variadic (value, index) reduce that measured 3.5x the head matmul producing the logits (tiny3,
    [105, 48, 1024]: 24 ms vs 7 ms of CPU; this formulation 2.6 ms; docs/path_eval.md).

    Args: logits [..., V]; labels int [...] (values in [0, V); out-of-range labels never match).
    Returns: bool [...].
    """
    labels = labels.astype(jnp.int32)
    picked = jnp.take_along_axis(logits, jnp.clip(labels, 0, logits.shape[-1] - 1)[..., None], axis=-1)
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    before = iota < labels[..., None]
    nan = jnp.isnan(logits)
    beats = jnp.where(
        jnp.isnan(picked), nan & before, nan | (logits > picked) | ((logits == picked) & before)
    )
    in_range = (labels >= 0) & (labels < logits.shape[-1])
    return in_range & ~jnp.any(beats, axis=-1)


def accepts_positions(forward) -> bool:
    """Whether a teacher-forced `forward` takes the optional keyword `positions` (see `exact_match_kernel`)."""
    try:
        return "positions" in inspect.signature(forward).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return False


def exact_match_kernel(forward, arrays: dict) -> jax.Array:
    """Teacher-forced greedy exact match over a padded, length-bucketed split.

    Args:
      forward: ``input_ids [B, S] -> logits [B, S, V]``; a forward that also takes the keyword
        ``positions`` (int32 [B, P]) returns the logits at those positions only, ``[B, P, V]``
        (`logits[b, p] = full_logits[b, positions[b, p]]`), and then the LM head runs only where a target is
        predicted (~7% of the positions on tiny3; docs/path_eval.md, "Second pass").
      arrays: {"input_ids": tuple of int32 [nb_g, B, S_g], "target_mask": tuple of [nb_g, B, S_g]}: groups of
        batches whose rows are trimmed to the group's length S_g (`bucket_teacher_forced`), optionally with
        "target_positions", "target_labels" (int32) and "target_valid" (bool), tuples of [nb_g, B, P_g]: the
        positions t with target_mask 1, their labels input_ids[t + 1], padded to P_g per group (used with a
        forward that takes `positions`; the result is the same either way).

    Returns:
      bool [sum_g nb_g * B] in bucketed order (padding rows included; the host function drops them).
    """
    return map_targets(
        lambda logits, labels, valid: jnp.all(argmax_equals(logits, labels) | ~valid, -1), forward, arrays
    )


def map_targets(reduce_fn, forward, arrays: dict) -> jax.Array:
    """A teacher-forced per-row reduction over a length-bucketed split (`bucket_teacher_forced`), one `lax.map`
    per length group: ``reduce_fn(logits [B, P, V], labels [B, P], valid bool [B, P]) -> [B]`` sees the logits
    at the positions that predict a target token and those tokens. With a forward that takes `positions` only
    those positions' logits are computed (the arrays' "target_positions", "target_labels", "target_valid");
    otherwise the full logits ``[:, :-1]`` with labels ``input_ids[:, 1:]`` and valid ``target_mask[:, :-1] > 0``
    (the same values: `target_positions` lists exactly those positions).

    Returns: [sum_g nb_g * B] in bucketed order (padding rows included).
    """
    if "target_positions" in arrays and accepts_positions(forward):

        def one_batch(batch):
            ids, positions, labels, valid = batch
            return reduce_fn(forward(ids, positions=positions), labels, valid)

        keys = ("input_ids", "target_positions", "target_labels", "target_valid")
        groups = zip(*(arrays[k] for k in keys), strict=True)
    else:

        def one_batch(batch):
            ids, tmask = batch
            return reduce_fn(forward(ids)[:, :-1], ids[:, 1:], tmask[:, :-1] > 0)

        groups = zip(arrays["input_ids"], arrays["target_mask"], strict=True)
    return jnp.concatenate([jax.lax.map(one_batch, g).reshape(-1) for g in groups])


def make_exact_match_objective(
    name: str,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
    batch_size: int,
    seq_len: int | None = None,
) -> Objective:
    """Teacher-forced exact-match objective over tokenized (prompt, target+eos) pairs.

    `seq_len` caps the row length (error when an example is longer); rows are bucketed by length.
    """
    arrays, order = bucket_teacher_forced(pairs, pad_id, batch_size, seq_len, name=name)
    num = len(pairs)
    n_pad = round_up(num, batch_size)
    inverse = np.argsort(order)  # bucketed position of each original example

    def device_fn(forward):
        correct = exact_match_kernel(forward, jax.tree.map(jnp.asarray, arrays))
        return correct[inverse]  # [N], original order

    # the mean does not depend on the order: accepts device_fn's [N] and the kernel's padded [N_pad]
    host_fn = functools.partial(percent_correct, name, num, n_pad)
    example_fn = functools.partial(correct_flags, name, num, n_pad)  # the kernel's (bucketed) row order

    return Objective(
        name,
        "exact_match",
        device_fn,
        host_fn,
        num,
        batch_size,
        exact_match_kernel,
        ArrayBundle(arrays),
        example_fn,
    )
