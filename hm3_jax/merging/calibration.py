"""Calibration data of the data-aware merges: one task's unlabelled search-split inputs and its forward.

A data-aware merge (RegMean, Fisher merging, AdaMerging; see `data_aware.py`) looks at how each model behaves
on a few inputs of its task. `Calibration` is all it gets for one task:

* `forward_fn(params, inputs) -> outputs`: a pure function of a params pytree (the base's layout) and a batch of
  rows `[B, ...]` of `inputs`. Fisher merging and AdaMerging read `outputs` as logits `[B, ..., C]` (class
  scores of every prediction: an LM's next-token logits `[B, S, V]`, a classifier's `[B, C]`); RegMean only
  needs the params' kernels to enter `dot_general`s (`layer_inputs.py`), so any output does.
* `inputs`: `[N, ...]`, N >= 1 rows (token ids `[N, S]`, pixels `[N, C, H, W]`, ...).
* `token_weights`: None (every row and prediction counts 1), or float `[N, ...]` with a shape that is a prefix of
  each prediction's shape `[N, ...]` (`[N]` per row, or `[N, S]` per token for an LM: 1 on real tokens, 0 on
  padding). Rows whose weights are all 0 are padding and count as no data.

The caller passes inputs of the SEARCH split only (HM3_SPEC: every number reported comes from the held-out
split, so nothing fitted may look at it); `hm3_jax.search.data_aware_menu` builds them from `Problem.objectives["search"]`.
The merges never see labels: RegMean uses inputs, Fisher merging samples labels from the model's own
predictive distribution (or takes its expectation), AdaMerging minimises the prediction entropy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Calibration(NamedTuple):
    """One task's calibration data (see the module docstring for the shapes).

    Attributes:
      forward_fn: `(params, inputs [B, ...]) -> outputs [B, ..., C]` (pure; jitted by the merges).
      inputs: `[N, ...]` search-split rows.
      token_weights: None or float `[N, ...]` (a prefix of the outputs' prediction shape).
    """

    forward_fn: Callable[[Any, jax.Array], jax.Array]
    inputs: Any
    token_weights: Any = None

    @property
    def num_rows(self) -> int:
        return int(np.shape(self.inputs)[0]) if np.ndim(self.inputs) else 0


def check_calibration(calibration: Sequence[Calibration], num_models: int, what: str) -> None:
    """Refuses calibration data that cannot calibrate: not one `Calibration` per model, no rows, token weights
    whose shape does not start with the inputs' row count, or weights that are all 0 (padding only).

    Raises:
      ValueError naming `what` (the method) and the task index.
    """
    if len(calibration) != num_models:
        raise ValueError(
            f"{what}: got calibration data for {len(calibration)} tasks, need one per model ({num_models})"
        )
    for k, c in enumerate(calibration):
        if not isinstance(c, Calibration):
            raise ValueError(f"{what}: calibration of task {k} must be a Calibration, got {type(c).__name__}")
        if c.num_rows == 0:
            raise ValueError(
                f"{what}: no calibration data for task {k} (inputs of shape {tuple(np.shape(c.inputs))}); "
                "pass >= 1 search-split row"
            )
        if c.token_weights is not None:
            shape = tuple(np.shape(c.token_weights))
            if not shape or shape[0] != c.num_rows:
                raise ValueError(
                    f"{what}: token_weights of task {k} have shape {shape}; they must start with the "
                    f"{c.num_rows} input rows"
                )
            if not isinstance(c.token_weights, jax.core.Tracer) and not np.any(
                np.asarray(c.token_weights) > 0
            ):
                raise ValueError(
                    f"{what}: no calibration data for task {k}: every token weight is 0 (padding only)"
                )


def row_weights(calibration: Calibration) -> jax.Array:
    """The token weights as float32 `[N, ...]` (ones `[N]` when None)."""
    if calibration.token_weights is None:
        return jnp.ones((calibration.num_rows,), jnp.float32)
    return jnp.asarray(calibration.token_weights, jnp.float32)


def broadcast_weights(weights: jax.Array, shape: tuple[int, ...], what: str) -> jax.Array:
    """`weights` (a prefix shape of `shape`) broadcast to `shape`: `[B]` -> `[B, S]` repeats each row's weight.

    Raises:
      ValueError naming `what` when `weights.shape` is not a prefix of `shape`.
    """
    wshape = tuple(weights.shape)
    if tuple(shape[: len(wshape)]) != wshape:
        raise ValueError(
            f"{what}: token weights of shape {wshape} do not match predictions of shape {tuple(shape)} "
            "(the weights' shape must be a prefix of it)"
        )
    return jnp.broadcast_to(weights.reshape(wshape + (1,) * (len(shape) - len(wshape))), shape)


def batches(calibration: Calibration, batch_size: int | None) -> Iterator[tuple[Any, jax.Array]]:
    """`(inputs [b, ...], weights [b, ...])` chunks of at most `batch_size` rows (None: all rows at once).

    The last chunk is padded to `batch_size` with copies of row 0 of weight 0, so every chunk has one shape
    (one compilation) and the padding counts as no data.
    """
    inputs = jnp.asarray(calibration.inputs)
    weights = row_weights(calibration)
    n = calibration.num_rows
    size = n if batch_size is None else int(batch_size)
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, size):
        x, w = inputs[start : start + size], weights[start : start + size]
        pad = size - x.shape[0]
        if pad:
            x = jnp.concatenate([x, jnp.broadcast_to(x[:1], (pad,) + x.shape[1:])])
            w = jnp.concatenate([w, jnp.zeros((pad,) + w.shape[1:], w.dtype)])
        yield x, w
