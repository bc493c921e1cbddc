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

Generation objectives (`make_generation_objective`, metric "chrf" or "generated_exact_match") are what
lm-eval-harness's ``generate_until`` computes: greedy generation of at most ``max_new_tokens`` tokens,
stopping at the first of the model's EOS ids or where the decoded text first contains a stop string (the text cut there);
decoded without special tokens, stripped, then compared to the stripped target (exact match) or scored with
sacrebleu's corpus chrF. Generating all ``max_new_tokens`` and cutting afterwards gives the same text: greedy
tokens before a stop do not depend on what follows. Multiple choice (`multiple_choice.py`) sums continuation
log-probabilities, as lm-eval's ``loglikelihood``.

The split is padded to a multiple of the batch size and `lax.map` runs over the batches, so the whole split is
one jitted call whose shapes depend only on the objective.

Teacher-forced exact match. Each example is ``x = [bos] + prompt`` and ``y = target + [eos]``. Greedy
decoding from x outputs exactly y (then stops) iff for every j, ``argmax p(. | x, y_<j) == y_j``: by
induction the greedy prefix equals y_<j at step j, so the greedy step-j token is that argmax. So one forward
pass over ``x ++ y``
(right-padded; causal attention keeps padding out of earlier positions) gives greedy exact match:
``correct = all_j [argmax logits[|x| - 1 + j] == y_j]``. Exact match is at the token level of the canonical
tokenization of the target (the tokenization the experts were trained on).

Scoring helpers `score_path` / `score_model` jit the objective's kernel with the config static and every array
(params, pool, path, junction, the split's padded arrays) traced, so new models, new paths and other splits of
the same shapes never recompile.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax.paths.engine import DECODE_METRICS
from hm3_jax.tasks import metrics
from hm3_jax.tasks.tokenizer import encode


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


def _round_up(n: int, multiple: int) -> int:
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
        seq_len = _round_up(longest, 8)
    if longest > seq_len:
        raise ValueError(f"{name}: longest example has {longest} tokens, more than seq_len={seq_len}")
    if any(len(t) == 0 for _, t in pairs) or any(len(p) == 0 for p, _ in pairs):
        raise ValueError(f"{name}: every example needs a non-empty prompt and target")
    n_pad = _round_up(len(pairs), batch_size)
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
        prompt_len = _round_up(longest, 8)
    if longest > prompt_len:
        raise ValueError(f"{name}: longest prompt has {longest} tokens, more than prompt_len={prompt_len}")
    n_pad = _round_up(len(prompts), batch_size)
    ids = np.full((n_pad, prompt_len), pad_id, np.int32)
    mask = np.zeros((n_pad, prompt_len), np.int32)
    mask[:, -1] = 1
    for i, prompt in enumerate(prompts):
        ids[i, prompt_len - len(prompt) :] = prompt
        mask[i, :] = 0
        mask[i, prompt_len - len(prompt) :] = 1
    return {"prompt_ids": ids, "prompt_mask": mask}


def _correct_flags(name: str, num: int, n_pad: int, correct) -> np.ndarray:
    """bool [num]: the first `num` entries of `correct` ([num] or [n_pad]), with a clear error naming the
    objective on any other shape (the example_fn of the correctness metrics)."""
    correct = np.asarray(correct)
    if correct.ndim != 1 or correct.shape[0] not in (num, n_pad):
        raise ValueError(f"{name}: expected correctness of shape ({num},) or ({n_pad},), got {correct.shape}")
    return correct[:num].astype(bool)


def _percent_correct(name: str, num: int, n_pad: int, correct) -> float:
    """Host part of the correctness metrics: 100 * mean of `_correct_flags`."""
    return 100.0 * float(_correct_flags(name, num, n_pad, correct).mean())


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
    return map_targets(lambda logits, labels, valid: jnp.all(argmax_equals(logits, labels) | ~valid, -1),
                       forward, arrays)  # fmt: skip


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
    n_pad = _round_up(len(pairs), batch_size)
    rows = np.concatenate([order, np.full(n_pad - len(order), -1)])
    groups: list[tuple[int, list[np.ndarray], list[np.ndarray]]] = []
    for b in range(n_pad // batch_size):
        idx = rows[b * batch_size : (b + 1) * batch_size]
        real = idx[idx >= 0]
        width = min(packed["input_ids"].shape[1], _round_up(int(lengths[real].max()), 8))
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
    n_pad = _round_up(num, batch_size)
    inverse = np.argsort(order)  # bucketed position of each original example

    def device_fn(forward):
        correct = exact_match_kernel(forward, jax.tree.map(jnp.asarray, arrays))
        return correct[inverse]  # [N], original order

    # the mean does not depend on the order: accepts device_fn's [N] and the kernel's padded [N_pad]
    host_fn = functools.partial(_percent_correct, name, num, n_pad)
    example_fn = functools.partial(_correct_flags, name, num, n_pad)  # the kernel's (bucketed) row order

    return Objective(
        name, "exact_match", device_fn, host_fn, num, batch_size, exact_match_kernel, ArrayBundle(arrays),
        example_fn,
    )  # fmt: skip


def generation_kernel(decode_fn, arrays: dict) -> jax.Array:
    """Greedy decoding of a padded split.

    Args:
      decode_fn: ``(prompt_ids [B, P], prompt_mask [B, P], max_new_tokens) -> tokens [B, max_new_tokens]``.
      arrays: {"prompt_ids", "prompt_mask": int32 [nb, B, P], "new_tokens": [T]} (only T = the static number
        of new tokens is read from "new_tokens").

    Returns:
      int32 [nb * B, T] (padding rows included; the host function drops them).
    """
    max_new_tokens = arrays["new_tokens"].shape[0]

    def one_batch(batch):
        ids, mask = batch
        return decode_fn(ids, mask, max_new_tokens).astype(jnp.int32)

    tokens = jax.lax.map(one_batch, (arrays["prompt_ids"], arrays["prompt_mask"]))
    return tokens.reshape(-1, max_new_tokens)


GENERATION_METRICS = {"exact_match": "generated_exact_match", "chrf": "chrf"}  # argument -> Objective.metric


def make_generation_objective(
    name: str,
    prompts: Sequence[Sequence[int]],
    targets: Sequence[str],
    tokenizer,
    batch_size: int,
    metric: str,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    stop: Sequence[str] = (),
    prompt_len: int | None = None,
) -> Objective:
    """Greedy-generation objective, scored as lm-eval-harness's ``generate_until`` (module docstring).

    ``text_i = strip(cut_stop(decode(g_i[: first eos])))`` with g_i the greedy tokens of prompt i; then
    ``exact_match = 100 * mean_i [text_i == strip(target_i)]`` (Objective.metric "generated_exact_match") or
    ``chrf = sacrebleu corpus chrF(text, strip(targets))`` (metric "chrf").

    Args:
      name: "<task>/<split>".
      prompts: token ids per example, as the caller's tokenizer gives them
        (``tokenizer(prompt)["input_ids"]``, its own special-token rule); left-padded here.
      targets: reference strings, one per example.
      tokenizer: decodes generations (``decode(ids, skip_special_tokens=True)``); its pad id (or 0) pads
        prompts.
      batch_size: rows per decode call (the split is padded to a multiple of it).
      metric: "exact_match" or "chrf".
      max_new_tokens: tokens generated per example (static).
      eos_ids: generation stops at the first of these ids (all EOS ids of the model's generation_config.json).
      stop: strings; the decoded text is cut at the first occurrence of any (lm-eval's ``until``).
      prompt_len: prompt width (None: the longest prompt rounded up to 8); equal shapes share a compilation.
    """
    if metric not in GENERATION_METRICS:
        raise ValueError(
            f"{name}: generation metric must be one of {sorted(GENERATION_METRICS)}, got {metric!r}"
        )
    if len(targets) != len(prompts):
        raise ValueError(f"{name}: {len(prompts)} prompts but {len(targets)} targets")
    if max_new_tokens < 1:
        raise ValueError(f"{name}: max_new_tokens must be >= 1, got {max_new_tokens}")
    eos_ids, stop = tuple(int(e) for e in eos_ids), tuple(stop)
    if not eos_ids:
        raise ValueError(f"{name}: need at least one eos id")
    if any(not s for s in stop):
        raise ValueError(f"{name}: stop strings must be non-empty")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out either way
    packed = pack_prompts(prompts, pad_id, batch_size, prompt_len, name=name)
    num = len(prompts)
    n_pad, prompt_len = packed["prompt_ids"].shape
    shape = (n_pad // batch_size, batch_size, prompt_len)
    arrays = {
        "prompt_ids": packed["prompt_ids"].reshape(shape),
        "prompt_mask": packed["prompt_mask"].reshape(shape),
        "new_tokens": np.zeros((max_new_tokens,), np.int32),
    }
    targets = [t.strip() for t in targets]

    def device_fn(decode_fn):
        return generation_kernel(decode_fn, jax.tree.map(jnp.asarray, arrays))[:num]  # [N, T]

    def texts(tokens) -> list[str]:
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[0] not in (num, n_pad):
            raise ValueError(
                f"{name}: expected tokens of shape ({num}, T) or ({n_pad}, T), got {tokens.shape}"
            )
        return decode_generations(tokenizer, tokens[:num], eos_ids, stop)

    if metric == "chrf":
        counts = metrics.make_chrf_counter(targets)  # one memo for the score and the statistics

        def host_fn(tokens) -> float:
            return metrics.chrf_from_counts(counts(texts(tokens)))

        def example_fn(tokens) -> np.ndarray:
            return np.asarray(counts(texts(tokens)), np.int64)  # [N, S] sentence statistics

    else:

        def example_fn(tokens) -> np.ndarray:
            return np.array([h == t for h, t in zip(texts(tokens), targets, strict=True)], bool)  # [N]

        def host_fn(tokens) -> float:
            return 100.0 * float(example_fn(tokens).mean())

    return Objective(
        name, GENERATION_METRICS[metric], device_fn, host_fn, num, batch_size, generation_kernel,
        ArrayBundle(arrays), example_fn,
    )  # fmt: skip


def make_chrf_objective(
    name: str,
    prompts: Sequence[Sequence[int]],
    references: Sequence[str],
    tokenizer,
    batch_size: int,
    max_new_tokens: int,
    prompt_len: int | None = None,
) -> Objective:
    """Greedy-decoding chrF objective of the zoo tasks: `make_generation_objective` with the tokenizer's eos
    as the only stop (decode ``max_new_tokens``, cut at eos, detokenize, strip, corpus chrF)."""
    return make_generation_objective(
        name, prompts, references, tokenizer, batch_size, "chrf", max_new_tokens,
        eos_ids=(tokenizer.eos_token_id,), prompt_len=prompt_len,
    )  # fmt: skip


def decode_generations(tokenizer, tokens, eos_ids: Sequence[int], stop: Sequence[str] = ()) -> list[str]:
    """Text of each row of ``tokens [N, T]``: up to (excluding) its first id in `eos_ids`, decoded without
    special tokens, cut before the first occurrence of any `stop` string (lm-eval's ``until``), stripped."""
    eos = set(int(e) for e in eos_ids)
    out = []
    for row in np.asarray(tokens).tolist():
        end = next((j for j, t in enumerate(row) if t in eos), len(row))
        text = tokenizer.decode(row[:end], skip_special_tokens=True)
        for s in stop:
            text = text.split(s, 1)[0]
        out.append(text.strip())
    return out


def decode_until_eos(tokenizer, tokens, eos_id: int) -> list[str]:
    """Detokenizes each row of ``tokens [N, T]`` up to (excluding) its first eos, stripped."""
    return decode_generations(tokenizer, tokens, (eos_id,))


def make_objective(
    task: str,
    split: str,
    examples: Sequence[Mapping[str, str]],
    tokenizer,
    batch_size: int,
    seq_len: int | None = None,
    prompt_len: int | None = None,
    max_new_tokens: int | None = None,
) -> Objective:
    """The objective of one task split (metric from the task registry).

    Args:
      task: task name ("translation" -> chrF on greedy decoding; "math", "code" -> teacher-forced exact
        match).
      split: split name (only used in the objective's name, "<task>/<split>").
      examples: example dicts with "prompt" and "target".
      tokenizer: the zoo tokenizer (pad/bos/eos set).
      batch_size: rows per forward pass.
      seq_len: row length of teacher-forced objectives (None: longest example rounded up to 8). Objectives
        with equal shapes share one compilation in `score_path`.
      prompt_len, max_new_tokens: decoding shapes of chrF objectives (None: from this split's longest prompt
        and longest target + eos).
    """
    from hm3_jax.tasks.data import task_metric

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    name = f"{task}/{split}"
    pairs = tokenize_examples(tokenizer, examples)
    metric = task_metric(task)
    if metric == "exact_match":
        return make_exact_match_objective(name, pairs, tokenizer.pad_token_id, batch_size, seq_len)
    longest_target = max(len(t) for _, t in pairs)  # reference + eos
    if max_new_tokens is None:
        max_new_tokens = longest_target
    elif max_new_tokens < longest_target:
        raise ValueError(f"{name}: max_new_tokens={max_new_tokens} < longest target + eos ({longest_target})")
    references = [e["target"] for e in examples]
    prompts = [p for p, _ in pairs]
    return make_chrf_objective(name, prompts, references, tokenizer, batch_size, max_new_tokens, prompt_len)


def accuracy_kernel(forward, arrays: dict) -> jax.Array:
    """Top-1 accuracy of a fixed linear head on the encoder's CLS feature, over a padded split.

    Args:
      forward: ``pixel_values [B, C, H, W] -> hidden states [B, N+1, D]`` (a ViT without classifier: the
        final LayerNorm's output, HF `last_hidden_state`; index 0 is CLS).
      arrays: {"pixel_values": float32 [nb, B, C, H, W], "labels": int32 [nb, B] (-1 on padding rows),
        "head_kernel": [D, C_pad], "head_bias": [C_pad]} (classes past the task's own are padded with a
        bias of -1e9, so they never win the argmax).

    Returns:
      bool [nb * B]: ``argmax_c (h_cls @ W + b)_c == label`` (padding rows included; never correct).
    """
    kernel, bias = arrays["head_kernel"], arrays["head_bias"]

    def one_batch(batch):
        pixels, labels = batch
        hidden = forward(pixels)
        if hidden.ndim != 3:
            raise ValueError(
                f"accuracy objectives need forward -> hidden states [B, N+1, D], got shape {hidden.shape} "
                "(use a ViT config with num_labels=0: the task heads live in the objectives)"
            )
        logits = hidden[:, 0].astype(jnp.float32) @ kernel.astype(jnp.float32) + bias.astype(jnp.float32)
        return jnp.argmax(logits, axis=-1) == labels

    return jax.lax.map(one_batch, (arrays["pixel_values"], arrays["labels"])).reshape(-1)


def make_accuracy_objective(
    name: str,
    pixel_values: np.ndarray,
    labels: np.ndarray,
    head_kernel: np.ndarray,
    head_bias: np.ndarray,
    batch_size: int,
    num_classes_padded: int | None = None,
) -> Objective:
    """Classification accuracy (in [0, 100]) of a fixed linear head on an encoder's CLS feature.

    The task-arithmetic setting for vision (Ilharco et al. 2023; HM3's ViT experiments): merging acts on the
    encoders and task k is always read out by its own fixed head (W_k, b_k), so
    ``acc_k(encoder) = mean_i [argmax(W_k^T h_cls(x_i) + b_k) == y_i]`` with h_cls the CLS row of the final
    LayerNorm's output.

    Args:
      name: "<task>/<split>".
      pixel_values: float [N, C, H, W] model inputs; labels: int [N] in [0, num_classes).
      head_kernel: [D, num_classes]; head_bias: [num_classes].
      batch_size: rows per forward pass (the split is padded to a multiple of it).
      num_classes_padded: pad the head to this many classes (bias -1e9 on the extra ones) so objectives of
        tasks with different label spaces share one compilation; default: no padding.
    """
    pixel_values, labels = np.asarray(pixel_values, np.float32), np.asarray(labels)
    head_kernel, head_bias = np.asarray(head_kernel, np.float32), np.asarray(head_bias, np.float32)
    if batch_size <= 0:
        raise ValueError(f"{name}: batch_size must be positive, got {batch_size}")
    if pixel_values.ndim != 4 or labels.shape != (pixel_values.shape[0],) or labels.size == 0:
        raise ValueError(
            f"{name}: need pixel_values [N, C, H, W] and labels [N] with N > 0, got {pixel_values.shape} and "
            f"{labels.shape}"
        )
    if head_kernel.ndim != 2 or head_bias.shape != (head_kernel.shape[1],):
        raise ValueError(f"{name}: head kernel {head_kernel.shape} and bias {head_bias.shape} do not match")
    num_classes = head_kernel.shape[1]
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"{name}: labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]"
        )
    padded = num_classes if num_classes_padded is None else int(num_classes_padded)
    if padded < num_classes:
        raise ValueError(f"{name}: num_classes_padded={padded} < the head's {num_classes} classes")
    kernel = np.zeros((head_kernel.shape[0], padded), np.float32)
    kernel[:, :num_classes] = head_kernel
    bias = np.full((padded,), -1e9, np.float32)
    bias[:num_classes] = head_bias
    num = labels.shape[0]
    n_pad = _round_up(num, batch_size)
    pix = np.zeros((n_pad,) + pixel_values.shape[1:], np.float32)
    pix[:num] = pixel_values
    lab = np.full((n_pad,), -1, np.int32)
    lab[:num] = labels
    arrays = {
        "pixel_values": pix.reshape((n_pad // batch_size, batch_size) + pixel_values.shape[1:]),
        "labels": lab.reshape(n_pad // batch_size, batch_size),
        "head_kernel": kernel,
        "head_bias": bias,
    }

    def device_fn(forward):
        return accuracy_kernel(forward, jax.tree.map(jnp.asarray, arrays))[:num]  # [N]

    host_fn = functools.partial(_percent_correct, name, num, n_pad)
    example_fn = functools.partial(_correct_flags, name, num, n_pad)

    return Objective(
        name,
        "accuracy",
        device_fn,
        host_fn,
        num,
        batch_size,
        accuracy_kernel,
        ArrayBundle(arrays),
        example_fn,
    )


def _path_forward(config, shell, pool, path, junction, metric: str):
    from hm3_jax import models

    if metric in DECODE_METRICS:
        return lambda ids, mask, n: models.greedy_decode(
            config, shell, pool, path, ids, mask, n, junction=junction
        )
    if metric == "accuracy":
        return lambda ids: models.apply_path(config, shell, pool, path, ids, junction=junction)
    return lambda ids, positions=None: models.apply_path(  # exact match, multiple choice: teacher-forced
        config, shell, pool, path, ids, junction=junction, positions=positions
    )


@functools.partial(jax.jit, static_argnames=("config", "kernel", "metric"))
def _path_kernel(config, shell, pool, path, junction, arrays, kernel, metric):
    return kernel(_path_forward(config, shell, pool, path, junction, metric), arrays)


def path_device_scores(config, shell, pool, path, junction, objective: Objective):
    """Jitted device part of `objective` for a layer path: ``kernel(forward, arrays)``.

    Config, kernel and metric are static; everything else (params, path, junction, the split's arrays) is
    traced, so new models, paths and same-shaped splits reuse one compilation. Returns the padded device
    output (host_fn accepts it).
    """
    arrays = jax.tree.map(jnp.asarray, objective.arrays.tree)
    return _path_kernel(config, shell, pool, path, junction, arrays, objective.kernel, objective.metric)


def score_path(config, shell, pool, path, objective: Objective, junction=None) -> float:
    """Score in [0, 100] of the path model (`hm3_jax.models.apply_path` semantics) on `objective`.

    Args:
      config: ModelConfig of the shell; shell: embed/final/head params; pool: stacked blocks [P, ...];
      path: int32 [T_max] pool indices (-1 = padding); junction: None or {"scale", "shift": [T_max, D]}.
    """
    from hm3_jax.models.path import check_junction, pool_size, validate_path

    path = np.asarray(path, np.int32)
    validate_path(path, pool_size(pool))
    check_junction(junction, path.shape[0], config.hidden_size)
    return objective.host_fn(path_device_scores(config, shell, pool, jnp.asarray(path), junction, objective))


def score_model(config, params, objective: Objective) -> float:
    """Score in [0, 100] of a single model (the identity path over its own blocks) on `objective`."""
    from hm3_jax import models

    pool = params["blocks"]  # == make_pool([params["blocks"]]) without a copy
    path = np.arange(config.num_layers, dtype=np.int32)
    return score_path(config, models.shell_of(params), pool, path, objective)


def score_models(config, params_list: Sequence[Any], objectives: Sequence[Objective]) -> np.ndarray:
    """Score matrix [len(params_list), len(objectives)] (rows: models, columns: objectives)."""
    return np.array([[score_model(config, p, o) for o in objectives] for p in params_list], np.float64)
