"""Image objectives: top-1 accuracy of a task's fixed linear head on a ViT encoder's CLS feature (tiny8, spec
image tasks)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax.tasks.objectives import ArrayBundle, Objective, correct_flags, percent_correct
from hm3_jax.tasks.packing import round_up


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
    n_pad = round_up(num, batch_size)
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

    host_fn = functools.partial(percent_correct, name, num, n_pad)
    example_fn = functools.partial(correct_flags, name, num, n_pad)

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
