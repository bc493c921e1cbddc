"""Orientations of one tensor: Hugging Face (PyTorch) layout <-> ours, by the `kind` of a mapping entry.

| kind       | HF layout                       | ours              | used for                             |
| ---------- | ------------------------------- | ----------------- | ------------------------------------ |
| `copy`     | same                            | same              | norms, biases, embeddings, Conv1D    |
| `linear`   | `nn.Linear.weight` [out, in]    | kernel [in, out]  | every projection except GPT-2's      |
| `patch`    | `nn.Conv2d.weight` [D, C, p, p] | kernel [p*p*C, D] | ViT patch embedding                  |
| `leading1` | [1, ..., N, D]                  | [N, D] (or [D])   | ViT `cls_token`, position embeddings |

`to_ours` and `to_hf` convert an array; `hf_shape` gives the HF shape of an array of our shape.
"""

from __future__ import annotations

import numpy as np

from hm3_jax.models.config import ModelConfig


def to_ours(kind: str, x: np.ndarray, ours_shape: tuple[int, ...]) -> np.ndarray:
    if kind == "copy":
        return x
    if kind == "linear":
        return x.T
    if kind == "patch":
        if len(ours_shape) == 4:  # [D, C, p, p] -> [p, p, C, D] (flax/lax conv layout)
            return x.transpose(2, 3, 1, 0)
        # [D, C, p, p] -> [p*p*C, D], flattened in (patch row, column, channel) order as hm3_jax.models.vit
        return x.transpose(2, 3, 1, 0).reshape(-1, x.shape[0])
    if kind == "leading1":
        return x.reshape(ours_shape)
    raise ValueError(f"unknown mapping kind {kind!r}")


def to_hf(kind: str, x: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
    if kind == "copy":
        return x
    if kind == "linear":
        return x.T
    if kind == "patch":
        if x.ndim == 4:
            return x.transpose(3, 2, 0, 1)
        d, c, p, _ = hf_shape
        return x.reshape(p, p, c, d).transpose(3, 2, 0, 1)
    if kind == "leading1":
        return x.reshape(hf_shape)
    raise ValueError(f"unknown mapping kind {kind!r}")


def hf_shape(kind: str, ours_shape: tuple[int, ...], config: ModelConfig) -> tuple[int, ...]:
    if kind == "copy":
        return ours_shape
    if kind == "linear":
        return tuple(reversed(ours_shape))
    if kind == "patch":
        p = config.patch_size
        return (ours_shape[-1], config.num_channels, p, p)
    if kind == "leading1":
        return (1,) * (3 - len(ours_shape)) + ours_shape
    raise ValueError(f"unknown mapping kind {kind!r}")
