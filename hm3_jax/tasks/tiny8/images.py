"""tiny8's images: what each of the eight tasks draws, and which feature of the image is its label.

The vision analogue of the paper's eight CLIP tasks (SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD):
eight tasks with their own label spaces, all rendered as RGB images of one size (default 16 x 16) so one
ViT encoder reads every task. Nothing is downloaded: the sources are code, scikit-learn's bundled `digits`,
matplotlib's bundled DejaVu fonts and scikit-image's bundled sample photographs.

| task | classes | what decides the label |
| --- | --- | --- |
| digits   | 10 | sklearn's 8x8 handwritten digit (resized to 10-13 px, placed at random, tinted light on dark) |
| letters  | 8  | one of the capitals A E G K M R S X in one of five DejaVu fonts, rotated +-12 degrees, 9-13 px |
| textures | 8  | which scikit-image photograph a grey crop (random scale, flip, contrast, tint) comes from |
| shapes   | 6  | circle, square, triangle, cross, ring, diamond (random size, place, colours) |
| stripes  | 8  | grating orientation in 22.5 degree bins (random frequency, phase, colours) |
| counting | 6  | number of dots, 1-6 |
| colours  | 10 | hue bin (36 degrees) of a ring, with two small squares of other hues as distractors |
| position | 9  | 3x3 grid cell holding a cross, with two square distractors elsewhere |

Colours are drawn light on dark (`contrasting_colours`): a figure of brightness 0.65-1 on a ground of
0-0.35, each tinted per channel. With free hues and polarity the ViT did not learn digits in our budget.


Every generator is `generate_images(task, rng, n, size, part, seed, num_eval)` -> (float images [n, 3, S, S] in
[0, 1], int labels [n]); `part` ("train" or "eval") picks disjoint sources (`hm3_jax.tasks.tiny8.data`).
scikit-learn, SciPy, matplotlib, Pillow and scikit-image are imported inside the generators that read them:
importing them costs seconds, which a run that loads a built zoo never needs.
"""

from __future__ import annotations

import os

import numpy as np

TASKS = ("digits", "letters", "textures", "shapes", "stripes", "counting", "colours", "position")
NUM_CLASSES = {
    "digits": 10,
    "letters": 8,
    "textures": 8,
    "shapes": 6,
    "stripes": 8,
    "counting": 6,
    "colours": 10,
    "position": 9,
}
LETTERS = "AEGKMRSX"
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
TEXTURE_IMAGES = ("brick", "grass", "gravel", "camera", "coins", "moon", "page", "astronaut")
TILE = 4  # textures: photographs are cut into tiles of 4S x 4S pixels; a crop lies inside one tile


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


def contrasting_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(foreground, background) RGB colours: a light tinted figure on a dark tinted ground.

    Brightness fg in [0.65, 1], bg in [0, 0.35], each times a random tint in [0.6, 1]^3 per channel. The
    polarity is fixed and the colours vary moderately: with free hues and polarity a from-scratch ViT of this
    size did not learn digits within the step budget (train loss stayed at ln 10 for 400 steps).
    """
    fg = rng.uniform(0.65, 1.0) * rng.uniform(0.6, 1.0, 3)
    bg = rng.uniform(0.0, 0.35) * rng.uniform(0.6, 1.0, 3)
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
        fg, bg = contrasting_colours(rng)
        out[i] = _finish(rng, _paint(_shape_mask(SHAPES[y], size, cy, cx, r), fg, bg), 0.08)
    return out, labels


def _gen_stripes(rng, n, size):
    labels = rng.integers(0, 8, n)
    yy, xx = _coords(size)
    out = np.empty((n, 3, size, size))
    for i, y in enumerate(labels):
        theta = y * np.pi / 8 + rng.uniform(-np.pi / 32, np.pi / 32)
        freq = rng.uniform(1.5, 3.5)  # cycles per image width
        wave = 0.5 + 0.5 * np.sin(
            2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) / size + rng.uniform(0, 2 * np.pi)
        )
        fg, bg = contrasting_colours(rng)
        out[i] = _finish(rng, _paint(wave, fg, bg), 0.1)
    return out, labels


def _gen_counting(rng, n, size):
    labels = rng.integers(0, 6, n)  # label c means c + 1 dots
    out = np.empty((n, 3, size, size))
    r = max(0.09 * size, 1.0)
    for i, y in enumerate(labels):
        _, bg = contrasting_colours(rng)
        img = np.broadcast_to(bg[:, None, None], (3, size, size)).copy()
        centres: list[np.ndarray] = []
        tries = 0
        while len(centres) < y + 1:
            if tries == 100:  # the dots placed so far leave no room: start this image's layout again
                centres, tries = [], 0
            tries += 1
            c = rng.uniform(r + 0.5, size - r - 0.5, 2)
            if all(np.linalg.norm(c - o) >= 3.2 * r for o in centres):
                centres.append(c)
        for c in centres:
            fg, _ = contrasting_colours(rng)
            m = _shape_mask("circle", size, c[0], c[1], r)
            img = np.where(m[None], fg[:, None, None], img)
        out[i] = _finish(rng, img, 0.06)
    return out, labels


def _gen_colours(rng, n, size):
    """Hue bin (10 bins of 36 degrees, +-9 degrees jitter) of a ring, with two smaller filled squares of other
    hue bins as distractors, on a dark grey ground: the encoder must find the ring and read its hue."""
    bins = NUM_CLASSES["colours"]
    labels = rng.integers(0, bins, n)
    out = np.empty((n, 3, size, size))
    for i, y in enumerate(labels):
        img = _paint(np.zeros((size, size), bool), np.zeros(3), np.full(3, rng.uniform(0.0, 0.3)))
        r = rng.uniform(0.24, 0.32) * size
        others = rng.choice([b for b in range(bins) if b != y], 2, replace=False)
        disc = np.zeros((size, size), bool)  # the ring's disc: distractors are drawn outside it
        for j, b in enumerate([y, *others]):
            hue = (b / bins + rng.uniform(-0.25, 0.25) / bins) % 1.0
            colour = _hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0))
            rr = r if j == 0 else 0.55 * r
            cy, cx = rng.uniform(rr, size - rr, 2)
            m = _shape_mask("ring" if j == 0 else "square", size, cy, cx, rr) & ~disc
            if j == 0:
                disc = _shape_mask("circle", size, cy, cx, r)
            img = np.where(m[None], colour[:, None, None], img)
        out[i] = _finish(rng, img, 0.05)
    return out, labels


def _gen_position(rng, n, size):
    labels = rng.integers(0, 9, n)
    out = np.empty((n, 3, size, size))
    cell = size / 3
    r = 0.13 * size
    for i, y in enumerate(labels):
        fg, bg = contrasting_colours(rng)
        img = _paint(np.zeros((size, size), bool), fg, bg)
        cells = [y] + list(rng.choice([c for c in range(9) if c != y], 2, replace=False))
        for j, c in enumerate(cells):
            cy = (c // 3 + 0.5) * cell + rng.uniform(-0.12, 0.12) * cell
            cx = (c % 3 + 0.5) * cell + rng.uniform(-0.12, 0.12) * cell
            kind = "cross" if j == 0 else "square"
            colour = fg if j == 0 else contrasting_colours(rng)[0]
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
    from scipy.ndimage import zoom

    images, targets = _digits_pool()
    pick = rng.choice(indices, n, replace=len(indices) < n)
    out = np.empty((n, 3, size, size))
    for i, k in enumerate(pick):
        side = int(rng.integers(round(0.62 * size), round(0.82 * size) + 1))  # 10..13 px at S = 16
        ink = np.clip(zoom(images[k], side / 8.0, order=1), 0.0, 1.0)[:side, :side]
        y0, x0 = rng.integers(0, size - ink.shape[0] + 1), rng.integers(0, size - ink.shape[1] + 1)
        canvas = np.zeros((size, size))
        canvas[y0 : y0 + ink.shape[0], x0 : x0 + ink.shape[1]] = ink
        fg, bg = contrasting_colours(rng)
        out[i] = _finish(rng, _paint(canvas, fg, bg), 0.05)
    return out, targets[pick]


def digits_partition(seed: int, num_eval: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (train indices, eval indices) of sklearn's 1797 digits."""
    perm = np.random.default_rng([seed, 7001]).permutation(1797)
    if num_eval >= 1797:
        raise ValueError(f"digits has 1797 samples; num_eval={num_eval} leaves none for training")
    return perm[num_eval:], perm[:num_eval]


_LETTER_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSerif-Bold.ttf",
)


def glyph(letter: str, font_file: str, angle: float) -> np.ndarray:
    """float [h, w] in [0, 1]: `letter` rendered at 64 px in `font_file` (matplotlib's bundled DejaVu fonts),
    rotated by `angle` degrees and cropped to its ink."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", font_file), 64)
    img = Image.new("L", (96, 96), 0)
    ImageDraw.Draw(img).text((48, 48), letter, fill=255, font=font, anchor="mm")
    img = img.rotate(angle, resample=Image.BILINEAR)
    a = np.asarray(img, np.float64) / 255.0
    rows, cols = np.nonzero(a.max(1) > 0.1)[0], np.nonzero(a.max(0) > 0.1)[0]
    return a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _gen_letters(rng, n, size):
    """Upper-case letters (LETTERS) in one of five DejaVu fonts, rotated +-12 degrees, 9-13 px high at S = 16,
    randomly placed, light on dark."""
    from PIL import Image

    labels = rng.integers(0, len(LETTERS), n)
    out = np.empty((n, 3, size, size))
    cache: dict = {}
    for i, y in enumerate(labels):
        font = _LETTER_FONTS[rng.integers(len(_LETTER_FONTS))]
        angle = float(np.round(rng.uniform(-12, 12)))
        if (y, font, angle) not in cache:
            cache[(y, font, angle)] = glyph(LETTERS[y], font, angle)
        g = cache[(y, font, angle)]
        h = int(rng.integers(round(0.56 * size), round(0.81 * size) + 1))
        w = max(2, min(size, int(round(h * g.shape[1] / g.shape[0]))))
        ink = (
            np.asarray(Image.fromarray((g * 255).astype(np.uint8)).resize((w, h), Image.BOX), np.float64)
            / 255
        )
        y0, x0 = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
        canvas = np.zeros((size, size))
        canvas[y0 : y0 + h, x0 : x0 + w] = ink
        fg, bg = contrasting_colours(rng)
        out[i] = _finish(rng, _paint(canvas, fg, bg), 0.05)
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


def _texture_tiles(shape: tuple[int, int], size: int, part: str) -> list[tuple[int, int]]:
    """(row, column) of the 4S x 4S tiles of a photograph that belong to `part`.

    Tile (i, j) is an evaluation tile when (i + 2 j) % 3 == 0 (a third of the tiles, spread over the whole
    photograph, so both parts see every region's content), else a train tile.
    """
    tile = TILE * size
    grid = [(i, j) for i in range(shape[0] // tile) for j in range(shape[1] // tile)]
    out = [(i, j) for i, j in grid if ((i + 2 * j) % 3 == 0) == (part != "train")]
    if not out:
        raise ValueError(f"a {shape} photograph has no {part} tile of {tile} px")
    return out


def _gen_textures(rng, n, size, part):
    sources = _texture_sources()
    labels = rng.integers(0, len(TEXTURE_IMAGES), n)
    out = np.empty((n, 3, size, size))
    for i, y in enumerate(labels):
        src = sources[y]
        tiles = _texture_tiles(src.shape, size, part)
        ty, tx = tiles[rng.integers(len(tiles))]
        scale = int(rng.integers(1, 4))  # crop of scale * S pixels, block-averaged down to S
        c = scale * size
        tile = TILE * size
        y0 = ty * tile + int(rng.integers(0, tile - c + 1))
        x0 = tx * tile + int(rng.integers(0, tile - c + 1))
        crop = src[y0 : y0 + c, x0 : x0 + c].reshape(size, scale, size, scale).mean((1, 3))
        if rng.uniform() < 0.5:
            crop = crop[:, ::-1]
        crop = np.clip((crop - crop.mean()) * rng.uniform(0.7, 1.3) + rng.uniform(0.35, 0.65), 0, 1)
        tint = rng.uniform(0.6, 1.0, 3)
        out[i] = _finish(rng, crop[None] * tint[:, None, None], 0.03)
    return out, labels


# ---------------------------------------------------------------- public API
def generate_images(
    task: str, rng: np.random.Generator, n: int, size: int, part: str, seed: int, num_eval: int
):
    """(float images [n, 3, S, S] in [0, 1], int labels [n]) of `task`, drawn from `part`'s sources ("train" or
    "eval"; digits: `digits_partition(seed, num_eval)`)."""
    if task == "digits":
        train_idx, eval_idx = digits_partition(seed, num_eval)
        return _gen_digits(rng, n, size, train_idx if part == "train" else eval_idx)
    if task == "textures":
        return _gen_textures(rng, n, size, part)
    fn = {
        "letters": _gen_letters,
        "shapes": _gen_shapes,
        "stripes": _gen_stripes,
        "counting": _gen_counting,
        "colours": _gen_colours,
        "position": _gen_position,
    }[task]
    return fn(rng, n, size)
