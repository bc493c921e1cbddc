"""Greedy-generation objectives (metric "chrf" or "generated_exact_match").

Generation objectives (`make_generation_objective`, metric "chrf" or "generated_exact_match") are what
lm-eval-harness's ``generate_until`` computes: greedy generation of at most ``max_new_tokens`` tokens,
stopping at the first of the model's EOS ids or where the decoded text first contains a stop string (the text cut there);
decoded without special tokens, stripped, then compared to the stripped target (exact match) or scored with
sacrebleu's corpus chrF. Generating all ``max_new_tokens`` and cutting afterwards gives the same text: greedy
tokens before a stop do not depend on what follows. Multiple choice (`multiple_choice.py`) sums continuation
log-probabilities, as lm-eval's ``loglikelihood``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax.tasks import metrics
from hm3_jax.tasks.objectives import ArrayBundle, Objective
from hm3_jax.tasks.packing import pack_prompts


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
        name,
        GENERATION_METRICS[metric],
        device_fn,
        host_fn,
        num,
        batch_size,
        generation_kernel,
        ArrayBundle(arrays),
        example_fn,
    )


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
        name,
        prompts,
        references,
        tokenizer,
        batch_size,
        "chrf",
        max_new_tokens,
        eos_ids=(tokenizer.eos_token_id,),
        prompt_len=prompt_len,
    )


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
