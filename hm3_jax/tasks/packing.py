"""Token rows of the text objectives and trainers: (prompt, target) pairs, right-padded teacher-forced rows
(bucketed by length), left-padded prompts. Every split is padded with dummy rows to a multiple of the batch size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from hm3_jax.tasks.tokenizer import encode


def round_up(n: int, multiple: int) -> int:
    """The least multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple


def tokenize_examples(tokenizer, examples: Sequence[Mapping[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, target_ids) per example: ``[bos] + tok(prompt)`` and ``tok(target) + [eos]``."""
    out = []
    for example in examples:
        prompt = [tokenizer.bos_token_id] + encode(tokenizer, example["prompt"])
        target = encode(tokenizer, example["target"]) + [tokenizer.eos_token_id]
        out.append((prompt, target))
    return out


def pack_teacher_forced(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
    batch_size: int,
    seq_len: int | None = None,
    name: str = "split",
) -> dict[str, np.ndarray]:
    """Right-padded ``prompt ++ target`` rows for teacher-forced scoring and training.

    Args:
      pairs: (prompt_ids, target_ids) per example (target includes eos).
      pad_id: padding token id.
      batch_size: rows are padded with dummy examples to a multiple of this.
      seq_len: row length; None = the longest example rounded up to a multiple of 8.
      name: used in error messages.

    Returns:
      {"input_ids": int32 [N_pad, S], "target_mask": float32 [N_pad, S] (1 at t when the prediction at t must
      equal input_ids[t + 1], i.e. t + 1 is a target position), "valid": bool [N_pad]}.
    """
    if not pairs:
        raise ValueError(f"{name}: no examples")
    longest = max(len(p) + len(t) for p, t in pairs)
    if seq_len is None:
        seq_len = round_up(longest, 8)
    if longest > seq_len:
        raise ValueError(f"{name}: longest example has {longest} tokens, more than seq_len={seq_len}")
    if any(len(t) == 0 for _, t in pairs) or any(len(p) == 0 for p, _ in pairs):
        raise ValueError(f"{name}: every example needs a non-empty prompt and target")
    n_pad = round_up(len(pairs), batch_size)
    input_ids = np.full((n_pad, seq_len), pad_id, np.int32)
    target_mask = np.zeros((n_pad, seq_len), np.float32)
    valid = np.zeros((n_pad,), bool)
    for i, (prompt, target) in enumerate(pairs):
        row = list(prompt) + list(target)
        input_ids[i, : len(row)] = row
        target_mask[i, len(prompt) - 1 : len(row) - 1] = 1.0
        valid[i] = True
    return {"input_ids": input_ids, "target_mask": target_mask, "valid": valid}


def pack_prompts(
    prompts: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int,
    prompt_len: int | None = None,
    name="split",
) -> dict[str, np.ndarray]:
    """Left-padded prompts for greedy decoding.

    Returns {"prompt_ids": int32 [N_pad, P], "prompt_mask": int32 [N_pad, P]}.

    Dummy rows (padding to a multiple of `batch_size`) hold a single pad token with mask 1 so that every row
    has at least one real position.
    """
    if not prompts:
        raise ValueError(f"{name}: no examples")
    longest = max(len(p) for p in prompts)
    if prompt_len is None:
        prompt_len = round_up(longest, 8)
    if longest > prompt_len:
        raise ValueError(f"{name}: longest prompt has {longest} tokens, more than prompt_len={prompt_len}")
    n_pad = round_up(len(prompts), batch_size)
    ids = np.full((n_pad, prompt_len), pad_id, np.int32)
    mask = np.zeros((n_pad, prompt_len), np.int32)
    mask[:, -1] = 1
    for i, prompt in enumerate(prompts):
        ids[i, prompt_len - len(prompt) :] = prompt
        mask[i, :] = 0
        mask[i, prompt_len - len(prompt) :] = 1
    return {"prompt_ids": ids, "prompt_mask": mask}


def target_positions(input_ids: np.ndarray, target_mask: np.ndarray, width: int | None = None):
    """The positions a teacher-forced exact match reads, per row, left-aligned and padded.

    Args: input_ids int [..., S]; target_mask [..., S] (1 at t when the prediction at t must equal
      input_ids[t + 1]); width: P (default: the largest number of targets of a row, at least 1).
    Returns: (positions int32 [..., P], labels int32 [..., P] = input_ids[t + 1], valid bool [..., P]); padding
      entries have position 0, label 0, valid False.
    """
    tmask = np.asarray(target_mask) > 0
    tmask[..., -1] = False  # the last position predicts nothing inside the row
    counts = tmask.sum(axis=-1)
    width = max(1, int(counts.max(initial=0))) if width is None else int(width)
    if counts.max(initial=0) > width:
        raise ValueError(f"target_positions: a row has {counts.max()} targets, more than width={width}")
    flat_mask = tmask.reshape(-1, tmask.shape[-1])
    flat_ids = np.asarray(input_ids).reshape(-1, tmask.shape[-1])
    positions = np.zeros((flat_mask.shape[0], width), np.int32)
    labels = np.zeros((flat_mask.shape[0], width), np.int32)
    valid = np.zeros((flat_mask.shape[0], width), bool)
    for r in range(flat_mask.shape[0]):
        t = np.nonzero(flat_mask[r])[0]
        positions[r, : len(t)] = t
        labels[r, : len(t)] = flat_ids[r, t + 1]
        valid[r, : len(t)] = True
    shape = tmask.shape[:-1] + (width,)
    return positions.reshape(shape), labels.reshape(shape), valid.reshape(shape)


def bucket_teacher_forced(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
    batch_size: int,
    seq_len: int | None = None,
    name: str = "split",
) -> tuple[dict, np.ndarray]:
    """Sorts examples by length and trims each batch to its longest row (rounded up to 8).

    Right padding costs compute in every forward pass; sorting first makes short examples share short
    batches. Consecutive batches of equal length form one group (one `lax.map`).

    Returns:
      (arrays as `exact_match_kernel` takes them, order int [N]: the original index of each bucketed row).
    """
    packed = pack_teacher_forced(pairs, pad_id, 1, seq_len, name=name)
    lengths = np.array([len(p) + len(t) for p, t in pairs])
    order = np.argsort(lengths, kind="stable")
    n_pad = round_up(len(pairs), batch_size)
    rows = np.concatenate([order, np.full(n_pad - len(order), -1)])
    groups: list[tuple[int, list[np.ndarray], list[np.ndarray]]] = []
    for b in range(n_pad // batch_size):
        idx = rows[b * batch_size : (b + 1) * batch_size]
        real = idx[idx >= 0]
        width = min(packed["input_ids"].shape[1], round_up(int(lengths[real].max()), 8))
        ids = np.full((batch_size, width), pad_id, np.int32)
        tmask = np.zeros((batch_size, width), np.float32)
        ids[: len(real)] = packed["input_ids"][real, :width]
        tmask[: len(real)] = packed["target_mask"][real, :width]
        if groups and groups[-1][0] == width:
            groups[-1][1].append(ids)
            groups[-1][2].append(tmask)
        else:
            groups.append((width, [ids], [tmask]))
    arrays = {
        "input_ids": tuple(np.stack(g[1]) for g in groups),
        "target_mask": tuple(np.stack(g[2]) for g in groups),
    }
    gathered = [
        target_positions(ids, tmask)
        for ids, tmask in zip(arrays["input_ids"], arrays["target_mask"], strict=True)
    ]
    arrays["target_positions"] = tuple(g[0] for g in gathered)
    arrays["target_labels"] = tuple(g[1] for g in gathered)
    arrays["target_valid"] = tuple(g[2] for g in gathered)
    return arrays, order
