"""Calibration rows continued by the expert itself: its greedy answer to each prompt, appended (issue 19).

A data-aware merge of language models sees each expert on its task's unlabelled prompts. At inference the
expert's layers also process the tokens it generates, and for short-answer tasks those positions are where the
task is decided; prompt-only Grams miss them (tiny3: RegMean at the balanced preference keeps 71% of the code
expert with prompt-only Grams, 79% when each expert's own 8-token continuation is added; docs/merging.md). Still
label-free: the continuation is expert k's own greedy output on task k's search prompts, never a target.

    own_continuation(config, params, calibration, num_tokens, eos_ids) -> Calibration

Input rows: `inputs` `[N, 2, S]` (token ids, attention mask) with `token_weights` `[N, S]`, 1 exactly on the
prompt's tokens (left-padded generation prompts or right-padded teacher-forced prefixes, as
`search.data_aware_menu` builds them). Output rows: `[N, 2, P + T]`, each row's prompt tokens left-padded to P
(the longest prompt) followed by the T = `num_tokens` tokens `models.greedy_decode` generates along the
identity path; the mask is 1 on the prompt's and every generated token; the weights are 1 on the prompt's
tokens and on the generated tokens up to and including the first of `eos_ids` (0 after it: what follows an
end-of-sequence is not the expert's answer). Positions are `cumsum(mask) - 1` in both the decode and the
calibration forward, so the Grams see the tokens at the positions the expert generated them at.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from hm3_jax import models
from hm3_jax.merging.calibration import Calibration


def left_padded_prompts(calibration: Calibration, what: str = "calibration") -> tuple[np.ndarray, np.ndarray]:
    """(prompt_ids, prompt_mask) `[N, P]` int32: each row's weighted tokens, in order, left-padded with 0.

    Raises:
      ValueError naming `what` and the row when the inputs are not `[N, 2, S]` token rows or a row has no token
      of positive weight.
    """
    inputs = np.asarray(calibration.inputs)
    if inputs.ndim != 3 or inputs.shape[1] != 2 or calibration.token_weights is None:
        raise ValueError(
            f"{what}: a continuation needs token rows [N, 2, S] (ids, mask) with token weights, got inputs of "
            f"shape {inputs.shape}"
        )
    ids, weights = inputs[:, 0], np.asarray(calibration.token_weights) > 0
    counts = weights.sum(1)
    if not np.all(counts > 0):
        raise ValueError(f"{what}: row {int(np.argmin(counts))} has no prompt token to continue")
    width = int(counts.max())
    prompt_ids = np.zeros((len(ids), width), np.int32)
    prompt_mask = np.zeros((len(ids), width), np.int32)
    for r in range(len(ids)):
        tokens = ids[r][weights[r]]
        prompt_ids[r, width - len(tokens) :] = tokens
        prompt_mask[r, width - len(tokens) :] = 1
    return prompt_ids, prompt_mask


def answer_weights(generated: np.ndarray, eos_ids: Sequence[int]) -> np.ndarray:
    """float32 `[N, T]`: 1 on every generated token up to and including the first of `eos_ids` in its row."""
    generated = np.asarray(generated)
    is_eos = np.isin(generated, np.asarray(tuple(eos_ids), generated.dtype))
    before = np.cumsum(is_eos, axis=1) - is_eos  # eos tokens strictly before each position
    return (before == 0).astype(np.float32)


def own_continuation(
    config: Any,
    params: dict,
    calibration: Calibration,
    num_tokens: int,
    eos_ids: Sequence[int] = (),
    what: str = "calibration",
) -> Calibration:
    """`calibration` with every prompt continued by `params`' greedy answer (module docstring).

    Args:
      config: the language model's `ModelConfig` (family llama or gpt2); params: the expert (stacked blocks).
      calibration: token rows (module docstring); its `forward_fn` is kept.
      num_tokens: T >= 1 generated tokens per row.
      eos_ids: end-of-sequence ids (empty: every generated token counts).
      what: named in errors (e.g. the task).
    Returns:
      A `Calibration` with inputs `[N, 2, P + T]` int32 and token weights `[N, P + T]` float32.
    """
    if int(num_tokens) < 1:
        raise ValueError(f"{what}: continuation tokens must be >= 1, got {num_tokens}")
    prompt_ids, prompt_mask = left_padded_prompts(calibration, what)
    path = jnp.arange(config.num_layers, dtype=jnp.int32)
    generated = models.greedy_decode(
        config,
        models.shell_of(params),
        params["blocks"],
        path,
        jnp.asarray(prompt_ids),
        jnp.asarray(prompt_mask),
        int(num_tokens),
    )
    generated = np.asarray(generated, np.int32)
    ids = np.concatenate([prompt_ids, generated], 1)
    mask = np.concatenate([prompt_mask, np.ones_like(generated)], 1)
    weights = np.concatenate([prompt_mask.astype(np.float32), answer_weights(generated, eos_ids)], 1)
    return Calibration(calibration.forward_fn, np.stack([ids, mask], 1), weights)
