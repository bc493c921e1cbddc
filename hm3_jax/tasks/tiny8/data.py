"""tiny8 data: eight small image-classification tasks generated offline from a seed (issue 8).

The vision analogue of the paper's eight CLIP tasks (SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD):
eight tasks with their own label spaces, all rendered as RGB images of one size (default 16 x 16) so one
ViT encoder reads every task. Nothing is downloaded: the sources are code, scikit-learn's bundled `digits`,
the `mnist1d` generator and scikit-image's bundled sample photographs.

| task | classes | what decides the label |
| --- | --- | --- |
| digits   | 10 | sklearn's 8x8 handwritten digit (upsampled, shifted, random ink/paper colours) |
| mnist1d  | 10 | the mnist1d digit template of a 1-D signal, drawn as a line plot |
| textures | 8  | which scikit-image photograph a grey crop (random scale, flip, tint) comes from |
| shapes   | 6  | circle, square, triangle, cross, ring, diamond (random size, place, colours) |
| stripes  | 8  | grating orientation in 22.5 degree bins (random frequency, phase, colours) |
| counting | 6  | number of dots, 1-6 |
| colours  | 8  | hue bin (45 degrees) of a random shape on a grey background |
| position | 9  | 3x3 grid cell holding a cross, with two square distractors elsewhere |

Splits (as tiny3): per task a **train** part (only the zoo builder fine-tunes on it) and an evaluation pool
of `num_eval` examples split 70/30 into **search** and **heldout**. Train and evaluation examples come from
disjoint sources: distinct random draws for procedural tasks and mnist1d, disjoint sample indices for digits,
and disjoint image regions (top 70% of each photograph for train, bottom 30% for evaluation) for textures.

A split is `{"pixel_values": uint8 [n, 3, S, S], "labels": int32 [n]}`; `to_model_inputs` maps uint8 to the
float inputs the ViT reads, `(x / 255 - 0.5) / 0.5` (HF ViTImageProcessor's default mean/std 0.5).
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Sequence

import numpy as np

SPLITS = ("train", "search", "heldout")
SEARCH_FRACTION = 0.7

TASKS = ("digits", "mnist1d", "textures", "shapes", "stripes", "counting", "colours", "position")
NUM_CLASSES = {
    "digits": 10,
    "mnist1d": 10,
    "textures": 8,
    "shapes": 6,
    "stripes": 8,
    "counting": 6,
    "colours": 8,
    "position": 9,
}
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
TEXTURE_IMAGES = ("brick", "grass", "gravel", "camera", "coins", "moon", "page", "astronaut")
_TRAIN_REGION = 0.7  # textures: train crops from the top 70% of each photograph, evaluation crops below


def task_index(task: str) -> int:
    if task not in TASKS:
        raise ValueError(f"unknown tiny8 task {task!r}; known: {TASKS}")
    return TASKS.index(task)


# ---------------------------------------------------------------- drawing helpers (float images in [0, 1])
def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # pixel centres
    return yy, xx


def _shape_mask(kind: str, size: int, cy: float, cx: float, r: float) -> np.ndarray:
    """bool [S, S] mask of a shape of radius `r` centred at (cy, cx) (pixel units)."""
    yy, xx = _coords(size)
    dy, dx = yy - cy, xx - cx
    if kind == "circle":
        return dy**2 + dx**2 <= r**2
    if kind == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * r
    if kind == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.1 * r
    if kind == "triangle":  # apex up
        return (dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= 0.6 * (dy + r))
    if kind == "cross":
        arm = max(0.3 * r, 0.6)
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    if kind == "ring":
        d2 = dy**2 + dx**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    raise ValueError(f"unknown shape {kind!r}")


def _contrasting_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(foreground, background) RGB colours whose mean absolute difference is at least 0.3."""
    while True:
        fg, bg = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        if np.abs(fg - bg).mean() >= 0.3:
            return fg, bg


def _paint(mask: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """[3, S, S] image: `fg` where mask, `bg` elsewhere (mask may be soft, in [0, 1])."""
    m = mask.astype(np.float64)[None]
    return m * fg[:, None, None] + (1 - m) * bg[:, None, None]


def _finish(rng: np.random.Generator, img: np.ndarray, sigma: float) -> np.ndarray:
    return np.clip(img + rng.normal(0.0, sigma, img.shape), 0.0, 1.0)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


# ---------------------------------------------------------------- procedural tasks
def _gen_shapes(rng, n, size):
    labels = rng.integers(0, len(SHAPES), n)
    out = np.empty((n, 3, size, size))
    for i, y in enumerate(labels):
        r = rng.uniform(0.2, 0.34) * size
        cy, cx = rng.uniform(r, size - r, 2)
        fg, bg = _contrasting_colours(rng)
        out[i] = _finish(rng, _paint(_shape_mask(SHAPES[y], size, cy, cx, r), fg, bg), 0.08)
    return out, labels


def _gen_stripes(rng, n, size):
    labels = rng.integers(0, 8, n)
    yy, xx = _coords(size)
    out = np.empty((n, 3, size, size))
    for i, y in enumerate(labels):
        theta = y * np.pi / 8 + rng.uniform(-np.pi / 32, np.pi / 32)
        freq = rng.uniform(1.5, 3.5)  # cycles per image width
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) / size
                                  + rng.uniform(0, 2 * np.pi))  # fmt: skip
        fg, bg = _contrasting_colours(rng)
        out[i] = _finish(rng, _paint(wave, fg, bg), 0.1)
    return out, labels


def _gen_counting(rng, n, size):
    labels = rng.integers(0, 6, n)  # label c means c + 1 dots
    out = np.empty((n, 3, size, size))
    r = max(0.09 * size, 1.0)
    for i, y in enumerate(labels):
        bg = rng.uniform(0, 1, 3)
        img = np.broadcast_to(bg[:, None, None], (3, size, size)).copy()
        centres: list[np.ndarray] = []
        while len(centres) < y + 1:
            c = rng.uniform(r + 0.5, size - r - 0.5, 2)
            if all(np.linalg.norm(c - o) >= 3.2 * r for o in centres):
                centres.append(c)
        for c in centres:
            fg = bg
            while np.abs(fg - bg).mean() < 0.3:
                fg = rng.uniform(0, 1, 3)
            m = _shape_mask("circle", size, c[0], c[1], r)
            img = np.where(m[None], fg[:, None, None], img)
        out[i] = _finish(rng, img, 0.06)
    return out, labels


def _gen_colours(rng, n, size):
    labels = rng.integers(0, 8, n)
    out = np.empty((n, 3, size, size))
    for i, y in enumerate(labels):
        hue = (y / 8 + rng.uniform(-1 / 32, 1 / 32)) % 1.0
        fg = _hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
        bg = np.full(3, rng.uniform(0.0, 1.0))
        r = rng.uniform(0.2, 0.34) * size
        cy, cx = rng.uniform(r, size - r, 2)
        mask = _shape_mask(SHAPES[rng.integers(len(SHAPES))], size, cy, cx, r)
        out[i] = _finish(rng, _paint(mask, fg, bg), 0.08)
    return out, labels


def _gen_position(rng, n, size):
    labels = rng.integers(0, 9, n)
    out = np.empty((n, 3, size, size))
    cell = size / 3
    r = 0.13 * size
    for i, y in enumerate(labels):
        fg, bg = _contrasting_colours(rng)
        img = _paint(np.zeros((size, size), bool), fg, bg)
        cells = [y] + list(rng.choice([c for c in range(9) if c != y], 2, replace=False))
        for j, c in enumerate(cells):
            cy = (c // 3 + 0.5) * cell + rng.uniform(-0.12, 0.12) * cell
            cx = (c % 3 + 0.5) * cell + rng.uniform(-0.12, 0.12) * cell
            kind = "cross" if j == 0 else "square"
            colour = fg if j == 0 else rng.uniform(0, 1, 3)
            m = _shape_mask(kind, size, cy, cx, r if j == 0 else 0.8 * r)
            img = np.where(m[None], colour[:, None, None], img)
        out[i] = _finish(rng, img, 0.06)
    return out, labels


# ---------------------------------------------------------------- tasks from bundled data
def _digits_pool() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images / 16.0, d.target  # [1797, 8, 8] in [0, 1], [1797]


def _gen_digits(rng, n, size, indices):
    images, targets = _digits_pool()
    if size % 8:
        raise ValueError(f"digits needs an image size that is a multiple of 8, got {size}")
    pick = rng.choice(indices, n, replace=len(indices) < n)
    out = np.empty((n, 3, size, size))
    up = size // 8
    for i, k in enumerate(pick):
        ink = np.kron(images[k], np.ones((up, up)))
        ink = np.roll(ink, tuple(rng.integers(-up, up + 1, 2)), axis=(0, 1))
        fg, bg = _contrasting_colours(rng)
        out[i] = _finish(rng, _paint(ink, fg, bg), 0.05)
    return out, targets[pick]


def _digits_partition(seed: int, num_eval: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (train indices, eval indices) of sklearn's 1797 digits."""
    perm = np.random.default_rng([seed, 7001]).permutation(1797)
    if num_eval >= 1797:
        raise ValueError(f"digits has 1797 samples; num_eval={num_eval} leaves none for training")
    return perm[num_eval:], perm[:num_eval]


def _gen_mnist1d(rng, n, size):
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = -(-n // 10) * 10
    args.train_split = 1.0
    args.seed = int(rng.integers(2**31 - 1))
    # mnist1d draws from the global `random` / `np.random` streams: keep the caller's streams untouched
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        ds = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    signals, labels = ds["x"][:n], ds["y"][:n]  # [n, 40] (zero mean, unit std over the set), [n]
    grid = np.linspace(0, signals.shape[1] - 1, size)
    cols = np.stack([np.interp(grid, np.arange(signals.shape[1]), s) for s in signals])  # [n, S]
    rows = np.arange(size)[None, :, None] + 0.5  # [1, S(row), 1]
    centre = size / 2 - cols[:, None, :] * size / 7.0  # [n, 1, S(col)]: value 0 in the middle
    line = np.exp(-((rows - centre) ** 2) / (2 * 0.7**2))  # [n, S, S]
    out = np.empty((n, 3, size, size))
    for i in range(n):
        fg, bg = _contrasting_colours(rng)
        out[i] = _finish(rng, _paint(line[i], fg, bg), 0.05)
    return out, labels


def _texture_sources() -> list[np.ndarray]:
    import skimage.color
    import skimage.data

    out = []
    for name in TEXTURE_IMAGES:
        img = np.asarray(getattr(skimage.data, name)(), np.float64)
        if img.ndim == 3:
            img = skimage.color.rgb2gray(img[..., :3] / 255.0)
        else:
            img = img / 255.0
        out.append(img)
    return out


def _gen_textures(rng, n, size, part):
    sources = _texture_sources()
    labels = rng.integers(0, len(TEXTURE_IMAGES), n)
    out = np.empty((n, 3, size, size))
    for i, y in enumerate(labels):
        src = sources[y]
        h, w = src.shape
        cut = int(h * _TRAIN_REGION)
        lo, hi = (0, cut) if part == "train" else (cut, h)
        scale = int(rng.integers(1, 4))  # crop of scale * S pixels, block-averaged down to S
        c = scale * size
        if hi - lo < c:
            scale, c = 1, size
        y0 = int(rng.integers(lo, hi - c + 1))
        x0 = int(rng.integers(0, w - c + 1))
        crop = src[y0 : y0 + c, x0 : x0 + c].reshape(size, scale, size, scale).mean((1, 3))
        if rng.uniform() < 0.5:
            crop = crop[:, ::-1]
        crop = np.clip((crop - crop.mean()) * rng.uniform(0.7, 1.3) + rng.uniform(0.35, 0.65), 0, 1)
        tint = rng.uniform(0.6, 1.0, 3)
        out[i] = _finish(rng, crop[None] * tint[:, None, None], 0.03)
    return out, labels


# ---------------------------------------------------------------- public API
def _generate(task: str, rng: np.random.Generator, n: int, size: int, part: str, seed: int, num_eval: int):
    if task == "digits":
        train_idx, eval_idx = _digits_partition(seed, num_eval)
        return _gen_digits(rng, n, size, train_idx if part == "train" else eval_idx)
    if task == "mnist1d":
        return _gen_mnist1d(rng, n, size)
    if task == "textures":
        return _gen_textures(rng, n, size, part)
    fn = {
        "shapes": _gen_shapes,
        "stripes": _gen_stripes,
        "counting": _gen_counting,
        "colours": _gen_colours,
        "position": _gen_position,
    }[task]
    return fn(rng, n, size)


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
    train = _generate(
        task, np.random.default_rng([seed, k, 0]), num_train, image_size, "train", seed, num_eval
    )
    pool = _generate(task, np.random.default_rng([seed, k, 1]), num_eval, image_size, "eval", seed, num_eval)
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
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp_", suffix=".npz")
    os.close(fd)
    try:
        np.savez_compressed(tmp, **{f"{s}/{k}": v for s, arrays in parts.items() for k, v in arrays.items()})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_task(path: str) -> dict:
    """Inverse of `save_task`."""
    with np.load(path) as f:
        out: dict = {}
        for name in f.files:
            split, key = name.split("/")
            out.setdefault(split, {})[key] = f[name]
    return out
