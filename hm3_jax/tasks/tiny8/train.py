"""tiny8 training: brief multi-task pretraining of the ViT encoder, then per-task experts (LP-FT).

* **Base** (`pretrain_multitask`): one shared encoder and one linear head per task on the CLS feature,
  trained briefly on the eight tasks' train parts (each step: an equal share of every task); the heads are
  thrown away and the encoder is the base model. The pretraining is deliberately short (300 steps in the
  full config): with 1500 steps the base read every task almost as well as its expert (base 75-100% held-out
  accuracy, experts 3-8 points above), so experts were not specialised. (Self-supervised rotation
  prediction, RotNet, was tried first: at this size and step budget its loss never left ln 4.)
* **Expert k** (the task-arithmetic setting, Ilharco et al. 2023, with LP-FT, Kumar et al. 2022): a linear
  head on the base encoder's CLS feature is fitted first with the encoder frozen (linear probe), then encoder
  and head are fine-tuned together on task k's train part. Expert k = (fine-tuned encoder, head k); merging
  acts on encoders only and head k reads out task k for every encoder.

Every trainer here uses `hm3_jax.tasks.optim` (AdamW, global-norm clipping 1, linear warmup then cosine decay).

The CLS feature is row 0 of the final LayerNorm's output (`hm3_jax.models.apply` of a ViT config with
`num_labels=0`). Heads are padded to `num_classes_padded` columns with a logit mask, so one compiled step
serves every task.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hm3_jax import models
from hm3_jax.tasks import optim

log = logging.getLogger(__name__)


def cls_features(config, encoder: dict, pixel_values: jax.Array) -> jax.Array:
    """CLS feature [B, D] of the final LayerNorm's output for pixel_values [B, C, H, W]."""
    return models.apply(config, encoder, pixel_values)[:, 0].astype(jnp.float32)


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, class_mask: jax.Array) -> jax.Array:
    """Mean cross-entropy over classes where `class_mask` [C] is true (logits [B, C], labels int [B])."""
    logits = jnp.where(class_mask[None], logits, -1e9)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.cache
def _classifier_step(config, train_encoder: bool):
    """jit(step(trainable, frozen, opt_state, pixels, labels, class_mask) -> (trainable, opt_state, loss)).

    trainable is {"encoder", "head"} when `train_encoder` else {"head"} (the encoder then sits in `frozen`).
    """
    optimizer = optim.make_optimizer()

    def loss_fn(trainable, frozen, pixels, labels, class_mask):
        both = {**frozen, **trainable}
        feats = cls_features(config, both["encoder"], pixels)
        logits = feats @ both["head"]["kernel"] + both["head"]["bias"]
        return masked_cross_entropy(logits, labels, class_mask)

    def step(trainable, frozen, opt_state, pixels, labels, class_mask):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, pixels, labels, class_mask)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 2))


def train_classifier(
    key: jax.Array,
    config,
    encoder: dict,
    head: dict,
    pixel_values: np.ndarray,
    labels: np.ndarray,
    class_mask: np.ndarray,
    *,
    num_steps: int,
    batch_size: int,
    learning_rate: float,
    warmup_steps: int = 10,
    weight_decay: float = 0.0,
    train_encoder: bool = True,
    desc: str = "train",
    progress: bool = True,
) -> tuple[dict, dict, np.ndarray]:
    """Trains a linear head on the CLS feature (and the encoder when `train_encoder`) with AdamW.

    Args:
      key: PRNG key of the batch rows.
      config: ViT ModelConfig with num_labels=0; encoder: its params; head: {"kernel": [D, C], "bias": [C]}.
      pixel_values: float32 [N, 3, S, S] model inputs; labels: int [N].
      class_mask: bool [C], the classes of this task (others are masked out of the softmax).
      num_steps, batch_size, learning_rate, warmup_steps, weight_decay: AdamW with linear warmup and cosine
        decay to 10%, gradient clipping at global norm 1.
      train_encoder: fine-tune the encoder too (False: linear probe).
      desc, progress: tqdm bar.

    Returns: (encoder, head, per-step losses float32 [num_steps]); inputs are not modified.
    """
    from tqdm.auto import tqdm

    if num_steps <= 0 or batch_size <= 0 or learning_rate <= 0:
        raise ValueError(f"{desc}: num_steps, batch_size and learning_rate must be positive")
    if pixel_values.ndim != 4 or len(pixel_values) == 0:
        raise ValueError(f"{desc}: pixel_values must be a non-empty [N, C, H, W], got {pixel_values.shape}")
    rows = np.asarray(jax.random.randint(key, (num_steps, batch_size), 0, len(pixel_values)))
    targets = np.asarray(labels, np.int32)[rows]
    step = _classifier_step(config, bool(train_encoder))
    encoder, head = jax.tree.map(jnp.array, encoder), jax.tree.map(jnp.array, head)  # own copies (donated)
    trainable = {"encoder": encoder, "head": head} if train_encoder else {"head": head}
    frozen = {} if train_encoder else {"encoder": encoder}
    opt_state = optim.make_optimizer().init(trainable)
    schedule = optim.make_schedule(learning_rate, num_steps, warmup_steps)
    mask = jnp.asarray(class_mask, bool)
    losses = []
    bar = tqdm(range(num_steps), desc=desc, disable=not progress, mininterval=1.0)
    for i in bar:
        opt_state = optim.set_hyperparams(opt_state, schedule(i), weight_decay)
        trainable, opt_state, loss = step(
            trainable, frozen, opt_state, pixel_values[rows[i]], targets[i], mask
        )
        losses.append(loss)
        if (i + 1) % 25 == 0 or i + 1 == num_steps:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    losses = np.asarray(jax.device_get(jnp.stack(losses)), np.float32)
    log.info("%s: loss %.3f -> %.3f over %d steps", desc, losses[:10].mean(), losses[-10:].mean(), num_steps)
    out = {**frozen, **trainable}
    return out["encoder"], out["head"], losses


def zero_head(hidden_size: int, num_classes: int) -> dict:
    """A linear head of zeros: {"kernel": [D, C], "bias": [C]} (uniform predictions before training)."""
    return {"kernel": jnp.zeros((hidden_size, num_classes)), "bias": jnp.zeros((num_classes,))}


def sincos_2d(grid: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
    """Fixed 2-D sine-cosine position embeddings [grid * grid, dim] (MAE / big_vision `posemb_sincos_2d`).

    Patch (row r, column c) gets [sin(c w), cos(c w), sin(r w), cos(r w)] with w_i = temperature^(-i / (dim/4)),
    i < dim/4, so position is visible from the first block on.
    """
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}")
    rows, cols = np.mgrid[0:grid, 0:grid].astype(np.float64)
    omega = temperature ** (-np.arange(dim // 4) / (dim // 4))
    r, c = rows.reshape(-1, 1) * omega, cols.reshape(-1, 1) * omega
    return np.concatenate([np.sin(c), np.cos(c), np.sin(r), np.cos(r)], axis=1).astype(np.float32)


def init_encoder(config, key: jax.Array) -> dict:
    """ViT encoder params for training from scratch on small images (big_vision's ViT initialisation).

    `hm3_jax.models.init` gives HF's N(0, 0.02) everywhere, which suits D = 768 (about 0.55 / sqrt(D)) but is
    six times below fan-in scale at D = 64: the blocks then barely change the residual stream and training
    stalls. As big_vision: every block kernel [L, in, out] is Xavier-uniform, limit sqrt(6 / (in + out));
    position embeddings start at the fixed 2-D sine-cosine table (CLS row 0); the patch projection is
    LeCun normal N(0, 1 / fan_in). Norms, biases and the CLS token keep `models.init`'s values.
    """
    key_params, key_patch, key_blocks = jax.random.split(key, 3)
    params = models.init(config, key_params)
    grid = config.image_size // config.patch_size
    position = np.zeros((grid * grid + 1, config.hidden_size), np.float32)
    position[1:] = sincos_2d(grid, config.hidden_size)
    fan_in = config.patch_size**2 * config.num_channels
    patch = jax.random.normal(key_patch, (fan_in, config.hidden_size)) / np.sqrt(fan_in)
    embed = dict(params["embed"])
    embed["position"] = jnp.asarray(position)
    embed["patch"] = {**embed["patch"], "kernel": patch.astype(jnp.float32)}
    blocks = {}
    names = sorted(params["blocks"])
    for name, k in zip(names, jax.random.split(key_blocks, len(names)), strict=True):
        layer = dict(params["blocks"][name])
        if "kernel" in layer:
            shape = layer["kernel"].shape
            limit = np.sqrt(6.0 / (shape[-2] + shape[-1]))
            layer["kernel"] = jax.random.uniform(k, shape, jnp.float32, -limit, limit)
        blocks[name] = layer
    return {**params, "embed": embed, "blocks": blocks}


@functools.cache
def _multitask_step(config):
    """jit(step(params, opt_state, pixels [T*b, C, H, W], labels [T, b], class_masks [T, C]) -> ...).

    params = {"encoder", "heads": {"kernel": [T, D, C], "bias": [T, C]}}: one head per task on the shared CLS
    feature; the loss is the mean over tasks of each task's masked cross-entropy.
    """
    optimizer = optim.make_optimizer()

    def loss_fn(params, pixels, labels, class_masks):
        t, b = labels.shape
        feats = cls_features(config, params["encoder"], pixels).reshape(t, b, -1)
        logits = (
            jnp.einsum("tbd,tdc->tbc", feats, params["heads"]["kernel"]) + params["heads"]["bias"][:, None]
        )
        logits = jnp.where(class_masks[:, None], logits, -1e9)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def step(params, opt_state, pixels, labels, class_masks):
        loss, grads = jax.value_and_grad(loss_fn)(params, pixels, labels, class_masks)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def pretrain_multitask(
    key: jax.Array,
    config,
    encoder: dict,
    pixel_values: list[np.ndarray],
    labels: list[np.ndarray],
    class_masks: np.ndarray,
    *,
    num_steps: int,
    batch_size: int,
    learning_rate: float,
    warmup_steps: int = 10,
    weight_decay: float = 0.0,
    desc: str = "base",
    progress: bool = True,
) -> tuple[dict, np.ndarray]:
    """Multi-task pretraining: one shared encoder, one linear head per task (thrown away afterwards).

    Each step draws `batch_size // T` examples of each of the T tasks (pixel_values[t] float32 [N_t, C, H, W],
    labels[t] int [N_t]); loss = mean_t CE(head_t(h_cls), y) over task t's classes (class_masks bool [T, C]).
    Returns (encoder, per-step losses float32 [num_steps]).
    """
    from tqdm.auto import tqdm

    num_tasks = len(pixel_values)
    per_task = batch_size // num_tasks
    if per_task < 1 or num_steps <= 0 or learning_rate <= 0:
        raise ValueError(f"{desc}: need batch_size >= number of tasks ({num_tasks}), positive steps and rate")
    keys = jax.random.split(key, num_tasks)
    rows = [np.asarray(jax.random.randint(k, (num_steps, per_task), 0, len(x))) for k, x in zip(keys, pixel_values, strict=True)]  # fmt: skip
    d, c = config.hidden_size, class_masks.shape[1]
    params = {
        "encoder": jax.tree.map(jnp.array, encoder),
        "heads": {"kernel": jnp.zeros((num_tasks, d, c)), "bias": jnp.zeros((num_tasks, c))},
    }
    step = _multitask_step(config)
    opt_state = optim.make_optimizer().init(params)
    schedule = optim.make_schedule(learning_rate, num_steps, warmup_steps)
    masks = jnp.asarray(class_masks, bool)
    losses = []
    bar = tqdm(range(num_steps), desc=desc, disable=not progress, mininterval=1.0)
    for i in bar:
        opt_state = optim.set_hyperparams(opt_state, schedule(i), weight_decay)
        pixels = np.concatenate([x[r[i]] for x, r in zip(pixel_values, rows, strict=True)])
        targets = np.stack([np.asarray(y, np.int32)[r[i]] for y, r in zip(labels, rows, strict=True)])
        params, opt_state, loss = step(params, opt_state, pixels, targets, masks)
        losses.append(loss)
        if (i + 1) % 25 == 0 or i + 1 == num_steps:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    losses = np.asarray(jax.device_get(jnp.stack(losses)), np.float32)
    log.info("%s: loss %.3f -> %.3f over %d steps", desc, losses[:10].mean(), losses[-10:].mean(), num_steps)
    return params["encoder"], losses
