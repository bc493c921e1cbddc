"""The optimiser every zoo trainer uses: global-norm clipping, AdamW, linear warmup then cosine decay.

Shared by the language-model trainer (`hm3_jax.tasks.lm_train`) and the tiny8 classifier trainer
(`hm3_jax.tasks.tiny8.train`). The learning rate and weight decay live in the optimiser state
(`optax.inject_hyperparams`), so one compiled step serves every schedule: the host loop writes the scheduled
rate with `set_hyperparams` before each step.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


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
