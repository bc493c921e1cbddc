"""tiny8 training: brief multi-task pretraining of the ViT encoder, frozen task heads, per-task experts.

* **Base** (`pretrain_multitask`): one shared encoder and one linear head per task on the CLS feature,
  trained briefly on the eight tasks' train parts (each step: an equal share of every task); the heads are
  thrown away and the encoder is the base model. The pretraining is deliberately short (300 steps in the
  full config): with 1500 steps the base read every task almost as well as its expert (base 75-100% held-out
  accuracy, experts 3-8 points above), so experts were not specialised. (Self-supervised rotation
  prediction, RotNet, was tried first: at this size and step budget its loss never left ln 4.)
* **Frozen head k** (`fit_linear_probe`): an L2-regularised multinomial logistic regression on the BASE
  encoder's CLS features of task k's train part. It plays the role of CLIP's zero-shot head in the paper's
  setting (Task Arithmetic's protocol, Ilharco et al. 2023): fixed before any fine-tuning, never trained
  again, and the head every model (base, expert, merge, layer path) is read out by on task k.
* **Expert k** (`train_classifier(..., trainable=("encoder",))`): the encoder fine-tuned on task k's train part
  through the frozen head k. (`trainable=("encoder", "head")` is LP-FT, Kumar et al. 2022: the tiny8 zoo's
  former protocol, where each expert also tuned its own head; kept as `zoo.expert.head = "lp_ft"`.)

Every trainer here is a loss on `hm3_jax.tasks.optim`'s update step and host loop (AdamW, global-norm clipping 1,
linear warmup then cosine decay).

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

from hm3_jax import host_blas, models
from hm3_jax.tasks import optim

log = logging.getLogger(__name__)


def cls_features(config, encoder: dict, pixel_values: jax.Array) -> jax.Array:
    """CLS feature [B, D] of the final LayerNorm's output for pixel_values [B, C, H, W]."""
    return models.apply(config, encoder, pixel_values)[:, 0].astype(jnp.float32)


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, class_mask: jax.Array) -> jax.Array:
    """Mean cross-entropy over classes where `class_mask` [C] is true (logits [B, C], labels int [B])."""
    logits = jnp.where(class_mask[None], logits, -1e9)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


TRAINABLE_PARTS = ("encoder", "head")


@functools.cache
def _classifier_step(config, trainable_parts: tuple):
    """jit(step(trainable, opt_state, frozen, pixels, labels, class_mask) -> (trainable, opt_state, loss)).

    trainable holds the parts named in `trainable_parts` ("encoder", "head"); frozen holds the others.
    """
    optimizer = optim.make_optimizer()

    def loss_fn(trainable, frozen, pixels, labels, class_mask):
        both = {**frozen, **trainable}
        feats = cls_features(config, both["encoder"], pixels)
        logits = feats @ both["head"]["kernel"] + both["head"]["bias"]
        return masked_cross_entropy(logits, labels, class_mask)

    return jax.jit(optim.make_update_step(loss_fn, optimizer), donate_argnums=(0, 1))


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
    trainable: tuple = TRAINABLE_PARTS,
    desc: str = "train",
    progress: bool = True,
) -> tuple[dict, dict, np.ndarray]:
    """Trains the encoder and/or a linear head on its CLS feature with AdamW (the other part stays fixed).

    Args:
      key: PRNG key of the batch rows.
      config: ViT ModelConfig with num_labels=0; encoder: its params; head: {"kernel": [D, C], "bias": [C]}.
      pixel_values: float32 [N, 3, S, S] model inputs; labels: int [N].
      class_mask: bool [C], the classes of this task (others are masked out of the softmax).
      num_steps, batch_size, learning_rate, warmup_steps, weight_decay: AdamW with linear warmup and cosine
        decay to 10%, gradient clipping at global norm 1.
      trainable: the parts trained, a non-empty subset of ("encoder", "head"): ("encoder",) fine-tunes through
        a frozen head (tiny8's experts), ("head",) is a linear probe, both is full fine-tuning.
      desc, progress: tqdm bar.

    Returns: (encoder, head, per-step losses float32 [num_steps]); inputs are not modified.
    """
    trainable_parts = tuple(p for p in TRAINABLE_PARTS if p in trainable)
    if not trainable_parts or set(trainable) - set(TRAINABLE_PARTS):
        raise ValueError(
            f"{desc}: trainable must be a non-empty subset of {TRAINABLE_PARTS}, got {trainable}"
        )
    if num_steps <= 0 or batch_size <= 0 or learning_rate <= 0:
        raise ValueError(f"{desc}: num_steps, batch_size and learning_rate must be positive")
    if pixel_values.ndim != 4 or len(pixel_values) == 0:
        raise ValueError(f"{desc}: pixel_values must be a non-empty [N, C, H, W], got {pixel_values.shape}")
    rows = np.asarray(jax.random.randint(key, (num_steps, batch_size), 0, len(pixel_values)))
    targets = np.asarray(labels, np.int32)[rows]
    parts = {"encoder": jax.tree.map(jnp.array, encoder), "head": jax.tree.map(jnp.array, head)}  # own copies
    trainable = {p: v for p, v in parts.items() if p in trainable_parts}  # (donated to the step)
    frozen = {p: v for p, v in parts.items() if p not in trainable_parts}
    mask = jnp.asarray(class_mask, bool)
    trainable, losses = optim.run_steps(
        _classifier_step(config, trainable_parts),
        trainable,
        lambda i: (frozen, pixel_values[rows[i]], targets[i], mask),
        num_steps=num_steps,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        desc=desc,
        progress=progress,
    )
    log.info("%s: loss %.3f -> %.3f over %d steps", desc, losses[:10].mean(), losses[-10:].mean(), num_steps)
    out = {**frozen, **trainable}
    return out["encoder"], out["head"], losses


@functools.cache
def _jit_cls_features(config):
    return jax.jit(functools.partial(cls_features, config))


def base_features(config, encoder: dict, pixel_values: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """CLS features float64 [N, D] of `pixel_values` float32 [N, C, H, W], computed in batches."""
    apply = _jit_cls_features(config)
    out = [
        np.asarray(apply(encoder, pixel_values[i : i + batch_size]))
        for i in range(0, len(pixel_values), batch_size)
    ]
    return np.concatenate(out).astype(np.float64)


def _probe_objective(x1: np.ndarray, y: np.ndarray, theta: np.ndarray, l2: float):
    """(loss, P [N, C]) of `fit_linear_probe`'s objective at theta [D + 1, C] (last row: the bias)."""
    z = x1 @ theta
    z -= z.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    return -(y * log_p).sum() + 0.5 * l2 * (theta[:-1] ** 2).sum(), np.exp(log_p)


@host_blas.single_threaded  # its Hessian products and lstsq: small host BLAS calls (hm3_jax/host_blas.py)
def fit_linear_probe(
    features: np.ndarray, labels: np.ndarray, num_classes: int, l2: float, max_iterations: int = 100
) -> dict:
    """The frozen head of one task: multinomial logistic regression on fixed features, solved to convergence.

    Minimises ``J(W, b) = sum_i CE(softmax(W^T h_i + b), y_i) + l2 ||W||^2 / 2`` over W [D, C], b [C] (b is not
    penalised) by Newton's method with a backtracking line search, in float64. At the optimum
    ``H^T (P - Y) + l2 W = 0`` and ``1^T (P - Y) = 0`` (P the softmax rows, Y the one-hot labels), which
    tests/test_tiny8.py checks in numpy. J is invariant to adding one constant to every bias, so the Hessian is
    singular along that direction: the Newton step is the least-squares (minimum-norm) solution, which keeps the
    biases' mean at its start, 0. As CLIP's linear probes (Radford et al. 2021), but the head then stays fixed:
    every model is read out on this task by it. Runs on one BLAS thread (`host_blas.single_threaded`: the same
    values, no busy-waiting for descheduled OpenBLAS threads on a loaded machine).

    Args:
      features: float [N, D] (the base encoder's CLS features of the task's train part).
      labels: int [N]; every class in [0, num_classes) must occur (a class without examples has no finite
        optimum).
      num_classes: the task's classes C; l2: the penalty (> 0); max_iterations: Newton steps before giving up.

    Returns: {"kernel": float32 [D, C], "bias": float32 [C]}.

    Raises: ValueError for bad shapes, missing classes or l2 <= 0; RuntimeError if the gradient's largest entry
    per example is still above 1e-9 after `max_iterations` steps.
    """
    features, labels = np.asarray(features, np.float64), np.asarray(labels)
    if features.ndim != 2 or labels.shape != (len(features),) or not len(labels):
        raise ValueError(f"probe: need features [N, D] and labels [N], got {features.shape}, {labels.shape}")
    missing = sorted(set(range(num_classes)) - set(labels.tolist()))
    if missing or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"probe: labels must cover exactly classes 0..{num_classes - 1}; missing {missing}")
    if not l2 > 0:
        raise ValueError(f"probe: l2 must be positive, got {l2}")
    n, d = features.shape
    x1 = np.concatenate([features, np.ones((n, 1))], 1)  # [N, D + 1]
    y = np.eye(num_classes)[labels]  # [N, C]
    ridge = np.full((d + 1, num_classes), l2)
    ridge[-1] = 0.0  # the bias is not penalised
    theta = np.zeros((d + 1, num_classes))
    loss, p = _probe_objective(x1, y, theta, l2)
    for _ in range(max_iterations):
        grad = x1.T @ (p - y) + ridge * theta  # [D + 1, C]
        if np.abs(grad).max() / n < 1e-9:
            break
        # Hessian [(D + 1) C, (D + 1) C] (theta's row-major order): block (c, k) = X^T diag(p_c (delta_ck - p_k)) X
        outer = (x1[:, :, None] * p[:, None, :]).reshape(n, -1)  # [N, (D + 1) C]: x_i p_i^T
        hess = -(outer.T @ outer)
        for c in range(num_classes):
            hess[c::num_classes, c::num_classes] += (x1 * p[:, c : c + 1]).T @ x1
        hess += np.diag(ridge.ravel())
        step = np.linalg.lstsq(hess, grad.ravel(), rcond=None)[0].reshape(theta.shape)
        t = 1.0
        while True:  # backtracking (Armijo) line search
            new_loss, new_p = _probe_objective(x1, y, theta - t * step, l2)
            if new_loss <= loss - 1e-4 * t * (grad * step).sum() or t < 1e-10:
                break
            t *= 0.5
        theta, loss, p = theta - t * step, new_loss, new_p
    else:
        raise RuntimeError(f"probe: Newton's method did not converge in {max_iterations} steps")
    return {"kernel": theta[:-1].astype(np.float32), "bias": theta[-1].astype(np.float32)}


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

    return jax.jit(optim.make_update_step(loss_fn, optimizer), donate_argnums=(0, 1))


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
    num_tasks = len(pixel_values)
    per_task = batch_size // num_tasks
    if per_task < 1 or num_steps <= 0 or learning_rate <= 0:
        raise ValueError(f"{desc}: need batch_size >= number of tasks ({num_tasks}), positive steps and rate")
    keys = jax.random.split(key, num_tasks)
    rows = [
        np.asarray(jax.random.randint(k, (num_steps, per_task), 0, len(x)))
        for k, x in zip(keys, pixel_values, strict=True)
    ]
    d, c = config.hidden_size, class_masks.shape[1]
    params = {
        "encoder": jax.tree.map(jnp.array, encoder),
        "heads": {"kernel": jnp.zeros((num_tasks, d, c)), "bias": jnp.zeros((num_tasks, c))},
    }
    masks = jnp.asarray(class_masks, bool)

    def batch(i):
        pixels = np.concatenate([x[r[i]] for x, r in zip(pixel_values, rows, strict=True)])
        targets = np.stack([np.asarray(y, np.int32)[r[i]] for y, r in zip(labels, rows, strict=True)])
        return pixels, targets, masks

    params, losses = optim.run_steps(
        _multitask_step(config),
        params,
        batch,
        num_steps=num_steps,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        desc=desc,
        progress=progress,
    )
    log.info("%s: loss %.3f -> %.3f over %d steps", desc, losses[:10].mean(), losses[-10:].mean(), num_steps)
    return params["encoder"], losses
