"""The optimiser and the training loop every zoo trainer uses: global-norm clipping, AdamW, linear warmup then
cosine decay, one jitted update step per loss, and the host loop that schedules the rate.

Shared by the language-model trainer (`hm3_jax.tasks.lm_train`) and the tiny8 trainers
(`hm3_jax.tasks.tiny8.train`). The learning rate and weight decay live in the optimiser state
(`optax.inject_hyperparams`), so one compiled step serves every schedule: `run_steps` writes the scheduled
rate with `set_hyperparams` before each step.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm


def make_schedule(learning_rate: float, num_steps: int, warmup_steps: int):
    """Linear warmup from 0 to `learning_rate`, then cosine decay to 10% of it at `num_steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=max(1, warmup_steps),
        decay_steps=max(num_steps, warmup_steps + 1),
        end_value=0.1 * learning_rate,
    )


def make_optimizer(clip: float = 1.0):
    """Global-norm clipping at `clip`, then AdamW whose learning rate and weight decay live in the state.

    `optax.inject_hyperparams` keeps them as arrays in `opt_state[1].hyperparams`; set them with
    `set_hyperparams`.
    """
    adamw = optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=0.0)
    return optax.chain(optax.clip_by_global_norm(clip), adamw)


def set_hyperparams(opt_state, learning_rate, weight_decay):
    """`opt_state` of `make_optimizer` with AdamW's learning rate and weight decay replaced (dtypes kept)."""
    clip_state, adamw_state = opt_state
    hyper = dict(adamw_state.hyperparams)
    hyper["learning_rate"] = jnp.asarray(learning_rate, hyper["learning_rate"].dtype)
    hyper["weight_decay"] = jnp.asarray(weight_decay, hyper["weight_decay"].dtype)
    return (clip_state, adamw_state._replace(hyperparams=hyper))


def make_update_step(loss_fn: Callable, optimizer):
    """Returns ``step(params, opt_state, *batch) -> (params, opt_state, loss)``: one `optimizer` update of
    `params` along the gradient of ``loss = loss_fn(params, *batch)``. Not jitted here; the caller jits."""

    def step(params, opt_state, *batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def run_steps(
    step: Callable,
    params,
    batch_fn: Callable[[int], tuple],
    *,
    num_steps: int,
    learning_rate: float,
    warmup_steps: int,
    weight_decay: float,
    desc: str,
    progress: bool,
):
    """The host loop: `num_steps` calls ``params, opt_state, loss = step(params, opt_state, *batch_fn(i))``
    from a fresh `make_optimizer` state, the rate of step i being `make_schedule`'s (set by `set_hyperparams`).

    Args:
      step: a (jitted) `make_update_step` step; it may donate `params` and the optimiser state.
      params: the initial trainable params (the caller's own copy when `step` donates them).
      batch_fn: i -> the step's batch arguments for step i.
      num_steps, learning_rate, warmup_steps, weight_decay: the optimiser settings.
      desc, progress: the tqdm bar's label; show it.

    Returns: (trained params, per-step losses float32 [num_steps]).
    """
    schedule = make_schedule(learning_rate, num_steps, warmup_steps)
    opt_state = make_optimizer().init(params)
    losses = []
    bar = tqdm(range(num_steps), desc=desc, disable=not progress, mininterval=1.0)
    for i in bar:
        opt_state = set_hyperparams(opt_state, schedule(i), weight_decay)
        params, opt_state, loss = step(params, opt_state, *batch_fn(i))
        losses.append(loss)
        if (i + 1) % 25 == 0 or i + 1 == num_steps:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    return params, np.asarray(jax.device_get(jnp.stack(losses)), np.float32)
