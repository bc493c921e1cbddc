"""tiny8 data: eight small image-classification tasks generated offline from a seed (issue 8).

The vision analogue of the paper's eight CLIP tasks (SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD):
eight tasks with their own label spaces, all rendered as RGB images of one size (default 16 x 16) so one
ViT encoder reads every task. Nothing is downloaded: the sources are code, scikit-learn's bundled `digits`,
matplotlib's bundled DejaVu fonts and scikit-image's bundled sample photographs
(`hm3_jax.tasks.tiny8.images` draws them; this module splits, stores and reads them).

Splits (as tiny3): per task a **train** part (only the zoo builder fine-tunes on it) and an evaluation pool
of `num_eval` examples split 70/30 into **search** and **heldout**. Train and evaluation examples come from
disjoint sources: distinct random draws for procedural tasks and letters, disjoint sample indices for digits,
and disjoint tiles of each photograph for textures (a third of its 4S x 4S tiles, spread over the whole
photograph, for evaluation).

A split is `{"pixel_values": uint8 [n, 3, S, S], "labels": int32 [n]}`; `to_model_inputs` maps uint8 to the
float inputs the ViT reads, `(x / 255 - 0.5) / 0.5` (HF ViTImageProcessor's default mean/std 0.5).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hm3_jax.io import atomic
from hm3_jax.tasks.tiny8.images import TASKS, generate_images

SPLITS = ("train", "search", "heldout")
SEARCH_FRACTION = 0.7


def task_index(task: str) -> int:
    if task not in TASKS:
        raise ValueError(f"unknown tiny8 task {task!r}; known: {TASKS}")
    return TASKS.index(task)


def _to_split(images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    pixels = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
    return {"pixel_values": pixels, "labels": np.asarray(labels, np.int32)}


def generate_task(task: str, seed: int, num_eval: int, num_train: int, image_size: int = 16) -> dict:
    """{split: {"pixel_values": uint8 [n, 3, S, S], "labels": int32 [n]}} for train/search/heldout.

    Deterministic in (task, seed, num_eval, num_train, image_size). search = the first
    round(0.7 * num_eval) examples of the shuffled evaluation pool, heldout = the rest.
    """
    k = task_index(task)
    if num_eval < 2 or num_train < 1:
        raise ValueError(f"{task}: need num_eval >= 2 and num_train >= 1, got {num_eval}, {num_train}")
    if image_size < 8 or image_size % 8:
        raise ValueError(f"image_size must be a positive multiple of 8, got {image_size}")
    train = generate_images(
        task, np.random.default_rng([seed, k, 0]), num_train, image_size, "train", seed, num_eval
    )
    pool = generate_images(
        task, np.random.default_rng([seed, k, 1]), num_eval, image_size, "eval", seed, num_eval
    )
    order = np.random.default_rng([seed, k, 2]).permutation(num_eval)
    n_search = int(round(SEARCH_FRACTION * num_eval))
    n_search = min(max(n_search, 1), num_eval - 1)
    return {
        "train": _to_split(*train),
        "search": _to_split(pool[0][order[:n_search]], pool[1][order[:n_search]]),
        "heldout": _to_split(pool[0][order[n_search:]], pool[1][order[n_search:]]),
    }


def generate_all(
    seed: int, num_eval: int, num_train: int, tasks: Sequence[str] = TASKS, image_size: int = 16
):
    """{task: generate_task(...)} in `tasks` order."""
    return {t: generate_task(t, seed, num_eval, num_train, image_size) for t in tasks}


def to_model_inputs(pixel_values: np.ndarray) -> np.ndarray:
    """uint8 [..., 3, S, S] -> float32 ViT inputs `(x / 255 - 0.5) / 0.5` in [-1, 1]."""
    if pixel_values.dtype != np.uint8:
        raise ValueError(f"pixel_values must be uint8, got {pixel_values.dtype}")
    return (pixel_values.astype(np.float32) / 255.0 - 0.5) / 0.5


def save_task(path: str, parts: dict) -> None:
    """Writes one task's splits to `path` (.npz: `<split>/pixel_values`, `<split>/labels`) atomically."""
    with atomic.atomic_file(path, "wb") as f:
        np.savez_compressed(f, **{f"{s}/{k}": v for s, arrays in parts.items() for k, v in arrays.items()})


def load_task(path: str) -> dict:
    """Inverse of `save_task`."""
    with np.load(path) as f:
        out: dict = {}
        for name in f.files:
            split, key = name.split("/")
            out.setdefault(split, {})[key] = f[name]
    return out
