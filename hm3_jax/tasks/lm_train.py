"""Language-model training as a library: token streams, masked cross-entropy, a jitted AdamW step, the loop.

Used by the zoo builder (`hm3_jax.tasks.zoo`) for the base model (next-token loss on every token of a packed
corpus) and for the experts (loss on the target tokens of a task's training examples only). The optimiser and
its schedule, the update step and the host loop are `hm3_jax.tasks.optim`'s.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax import models
from hm3_jax.tasks import optim

log = logging.getLogger(__name__)


def pack_stream(token_docs: Sequence[Sequence[int]], seq_len: int, bos_id: int, eos_id: int) -> np.ndarray:
    """Concatenates ``[bos] + doc + [eos]`` for every document and cuts the stream into rows.

    Args:
      token_docs: token ids per document.
      seq_len: row length S.
      bos_id, eos_id: special token ids.

    Returns:
      int32 [num_rows, S]; the incomplete last row is dropped.
    """
    stream = []
    for doc in token_docs:
        stream.append(bos_id)
        stream.extend(doc)
        stream.append(eos_id)
    num_rows = len(stream) // seq_len
    if num_rows == 0:
        raise ValueError(f"corpus has {len(stream)} tokens, fewer than one row of seq_len={seq_len}")
    return np.asarray(stream[: num_rows * seq_len], np.int32).reshape(num_rows, seq_len)


def masked_lm_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over masked positions.

    loss = sum_t m_t * -log p(x_{t+1} | x_<=t) / sum_t m_t, with logits [B, S, V], input_ids [B, S] and
    loss_mask [B, S] (1 at t when the prediction at t is trained).
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
    mask = loss_mask[:, :-1].astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_train_step(config, optimizer, batch_size: int):
    """Returns ``step(params, opt_state, input_ids, loss_mask) -> (params, opt_state, loss)``.

    input_ids and loss_mask are one batch [batch_size, S]; the shapes do not depend on the data set, so base
    and expert training share one compiled step. Not jitted here; the caller jits.
    """

    def loss_fn(params, ids, mask):
        return masked_lm_loss(models.apply(config, params, ids), ids, mask)

    return optim.make_update_step(loss_fn, optimizer)


@functools.cache
def _jitted_step(config, batch_size: int):
    """One compiled step per (config, batch_size): base and expert training reuse it."""
    return jax.jit(make_train_step(config, optim.make_optimizer(), batch_size), donate_argnums=(0, 1))


def train_lm(
    key: jax.Array,
    config,
    params: dict,
    input_ids: np.ndarray,
    loss_mask: np.ndarray,
    num_steps: int,
    batch_size: int,
    learning_rate: float,
    warmup_steps: int = 20,
    weight_decay: float = 0.0,
    desc: str = "train",
    progress: bool = True,
    rows: np.ndarray | None = None,
) -> tuple[dict, np.ndarray]:
    """Trains `params` on rows of token ids with a masked next-token loss (AdamW, warmup + cosine).

    Args:
      key: PRNG key (batch sampling).
      config: ModelConfig; params: initial params (not modified).
      input_ids: int32 [N, S]; loss_mask: [N, S] (1 at t when predicting input_ids[t + 1] is trained).
      num_steps, batch_size, learning_rate, warmup_steps, weight_decay: optimiser settings.
      desc: progress-bar label. progress: show a tqdm bar.
      rows: optional batch plan, int [num_steps, batch_size] indices into `input_ids` (e.g. batches stratified
        by task); default: rows drawn uniformly with replacement from `key`.

    Returns:
      (trained params, per-step losses float32 [num_steps]).
    """
    if input_ids.shape != loss_mask.shape or input_ids.ndim != 2:
        raise ValueError(f"input_ids {input_ids.shape} and loss_mask {loss_mask.shape} must be equal [N, S]")
    if num_steps <= 0 or batch_size <= 0 or learning_rate <= 0:
        raise ValueError(
            f"num_steps, batch_size and learning_rate must be positive, got {num_steps}, {batch_size}, "
            f"{learning_rate}"
        )
    ids, mask = np.asarray(input_ids, np.int32), np.asarray(loss_mask, np.float32)
    if rows is None:  # rows drawn uniformly with replacement; the run is a function of `key`
        rows = np.asarray(jax.random.randint(key, (num_steps, batch_size), 0, ids.shape[0]))
    rows = np.asarray(rows)
    if rows.shape != (num_steps, batch_size) or rows.min() < 0 or rows.max() >= ids.shape[0]:
        raise ValueError(
            f"rows must be [num_steps, batch_size] = [{num_steps}, {batch_size}] indices into the "
            f"{ids.shape[0]} input rows, got shape {rows.shape}, range [{rows.min()}, {rows.max()}]"
        )
    params, losses = optim.run_steps(
        _jitted_step(config, batch_size),
        jax.tree.map(jnp.array, params),  # own copy: the step donates its buffers
        lambda i: (ids[rows[i]], mask[rows[i]]),
        num_steps=num_steps,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        desc=desc,
        progress=progress,
    )
    log.info("%s: loss %.3f -> %.3f over %d steps", desc, losses[0], losses[-1], num_steps)
    return params, losses


@functools.partial(jax.jit, static_argnames=("config",))
def eval_loss(config, params, input_ids, loss_mask):
    """Masked next-token loss of `params` on a batch (input_ids, loss_mask [B, S])."""
    return masked_lm_loss(models.apply(config, params, input_ids), input_ids, loss_mask)
