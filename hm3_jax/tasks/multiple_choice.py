"""Multiple-choice objectives: accuracy of the choice with the highest summed continuation log-probability.

This is lm-eval-harness's ``loglikelihood`` request and its ``acc`` metric. For example i with prompt ids x_i
and choices c_i1..c_iJ (continuation ids: the ids of prompt + choice after the ids of the prompt, computed by
the caller with the model's tokenizer, as lm-eval does),

    ll_ij = sum_{t < |c_ij|} log softmax(logits(x_i ++ c_ij)[|x_i| - 1 + t])[c_ij,t]     (float32)
    pred_i = argmax_j ll_ij   (the first maximum on exact ties, as numpy / lm-eval)
    score = 100 * mean_i [pred_i == answer_i].

Each (example, choice) is one teacher-forced row ``x ++ c`` (right-padded, length-bucketed exactly like the
exact-match rows, `packing.bucket_teacher_forced`); a forward that takes ``positions=`` runs the LM head
only at the continuation positions. The device output is the kernel's: ``float32 [R_pad]`` summed
log-probabilities in bucketed row order (padding rows included), so `device_fn(forward)` equals
`kernel(forward, arrays)` and `host_fn` / `example_fn` read the same layout whichever route produced it
(`score_path` or the path engine).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax.tasks.exact_match import map_targets
from hm3_jax.tasks.objectives import ArrayBundle, Objective
from hm3_jax.tasks.packing import bucket_teacher_forced


def continuation_logprob_kernel(forward, arrays: dict) -> jax.Array:
    """Summed log-probability of each row's continuation tokens.

    Args:
      forward: ``input_ids [B, S] -> logits [B, S, V]``, optionally taking ``positions`` (int32 [B, P]) and then
        returning ``[B, P, V]`` at those positions only.
      arrays: as `exact_match.exact_match_kernel` takes them (`bucket_teacher_forced`): "input_ids",
        "target_mask" and "target_positions", "target_labels", "target_valid", tuples over length groups.

    Returns:
      float32 [sum_g nb_g * B]: ``sum_t [target_mask_t] log_softmax(logits_t)[input_ids_{t+1}]`` per row, in
      bucketed order (padding rows give 0).
    """

    return map_targets(summed_logprob, forward, arrays)


def summed_logprob(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
    """``sum_p [valid_p] log_softmax(logits_p)[labels_p]`` in float32 (lm-eval's ``loglikelihood`` of a
    continuation; also `hm3_jax.evaluation.token_requests`).

    Args: logits [..., P, V]; labels int [..., P]; valid bool [..., P]. Returns: float32 [...].
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, picked, 0.0), axis=-1)


def pack_multiple_choice(
    prompt_ids: Sequence[Sequence[int]],
    choice_ids: Sequence[Sequence[Sequence[int]]],
    pad_id: int,
    batch_size: int,
    seq_len: int | None = None,
    name: str = "split",
) -> tuple[dict, np.ndarray, np.ndarray]:
    """Rows ``prompt_i ++ choice_ij`` (example-major), bucketed by length.

    Returns: (arrays for `continuation_logprob_kernel`, order int [R] (the original row of each bucketed row:
      ``kernel_output[argsort(order)]`` is in example-major row order), offsets int [N + 1] (example i's rows
      are ``offsets[i]:offsets[i + 1]``)).
    """
    if len(prompt_ids) != len(choice_ids):
        raise ValueError(f"{name}: {len(prompt_ids)} prompts but {len(choice_ids)} choice lists")
    if any(len(c) == 0 for c in choice_ids):
        raise ValueError(f"{name}: every example needs at least one choice")
    pairs = [(p, c) for p, cs in zip(prompt_ids, choice_ids, strict=True) for c in cs]
    arrays, order = bucket_teacher_forced(pairs, pad_id, batch_size, seq_len, name=name)
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in choice_ids])]).astype(np.int64)
    return arrays, order, offsets


def make_multiple_choice_objective(
    name: str,
    prompt_ids: Sequence[Sequence[int]],
    choice_ids: Sequence[Sequence[Sequence[int]]],
    answers: Sequence[int],
    pad_id: int,
    batch_size: int,
    seq_len: int | None = None,
) -> Objective:
    """Multiple-choice accuracy in [0, 100] (metric "multiple_choice"; module docstring).

    Args:
      name: "<task>/<split>".
      prompt_ids: per example the prompt's token ids (non-empty; the tokenizer's own special-token rule).
      choice_ids: per example, per choice the continuation ids (non-empty).
      answers: per example the index of the correct choice.
      pad_id: padding id of the rows (never read: causal attention keeps padding after the real tokens).
      batch_size: rows per forward pass; seq_len: row length cap (None: longest row rounded up to 8).
    """
    answers = np.asarray(answers, np.int64)
    if answers.shape != (len(prompt_ids),):
        raise ValueError(f"{name}: {len(prompt_ids)} examples but answers of shape {answers.shape}")
    num_choices = np.array([len(c) for c in choice_ids])
    if np.any(answers < 0) or np.any(answers >= num_choices):
        raise ValueError(f"{name}: every answer must index one of its example's choices")
    if batch_size <= 0:
        raise ValueError(f"{name}: batch_size must be positive, got {batch_size}")
    arrays, order, offsets = pack_multiple_choice(prompt_ids, choice_ids, pad_id, batch_size, seq_len, name)
    r_pad = sum(ids.shape[0] * ids.shape[1] for ids in arrays["input_ids"])
    inverse = np.argsort(order)  # bucketed position of each example-major row

    def device_fn(forward):
        return continuation_logprob_kernel(forward, jax.tree.map(jnp.asarray, arrays))  # [R_pad], bucketed

    def example_fn(raw) -> np.ndarray:
        raw = np.asarray(raw)
        if raw.shape != (r_pad,):
            raise ValueError(
                f"{name}: expected summed log-probabilities of shape ({r_pad},), got {raw.shape}"
            )
        rows = raw[inverse]  # [R] example-major
        pred = np.array([np.argmax(rows[a:b]) for a, b in zip(offsets[:-1], offsets[1:], strict=True)])
        return pred == answers  # bool [N]

    def host_fn(raw) -> float:
        return 100.0 * float(example_fn(raw).mean())

    return Objective(
        name,
        "multiple_choice",
        device_fn,
        host_fn,
        len(prompt_ids),
        batch_size,
        continuation_logprob_kernel,
        ArrayBundle(arrays),
        example_fn,
    )
