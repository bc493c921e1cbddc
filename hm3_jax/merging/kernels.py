"""Per-tensor merge kernels: float32 arithmetic on one tensor of every model.

Every kernel has the signature `kernel(key, base, thetas, weights) -> merged` (after its hyperparameters are
bound with `functools.partial`):

* `key`: a PRNG key for this tensor (DARE only; ignored otherwise),
* `base`: float32 `[...]`, the base model's tensor (ignored by `linear`),
* `thetas`: float32 `[K, ...]`, the K fine-tuned models' tensors,
* `weights`: float32 `[K]`, one weight per model for this tensor,

and returns float32 `[...]`. A tensor is the unit that magnitude trimming, SLERP and PCB's normalisations act
on, as in mergekit (which works on Hugging Face tensors one by one); the pytree functions in `api.py` vmap
these kernels over the leading axis of stacked `blocks/...` leaves so that each block is its own tensor
there too.

Notation: task vector `delta_k = theta_k - base`; `w_k` the k-th weight.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _bcast(weights: jax.Array, ndim: int) -> jax.Array:
    """`[K]` -> `[K, 1, ..., 1]` to broadcast against a `[K, ...]` stack of `ndim` dims."""
    return weights.reshape(weights.shape + (1,) * (ndim - 1))


def _sum_models(x: jax.Array) -> jax.Array:
    """`sum_k x[k]` over the leading (model) axis, as `x[0] + x[1] + ...` in that order: XLA's CPU reduce
    over a non-minor axis is about 20x slower than these elementwise adds."""
    total = x[0]
    for k in range(1, x.shape[0]):
        total = total + x[k]
    return total


def per_model(value: float | Sequence[float], num_models: int) -> tuple[float, ...]:
    """A hyperparameter given once or per model as one float per model: `(value,) * num_models` for a scalar,
    else `value` as floats (kernels, the streaming merger and its host thresholds share this reading)."""
    if isinstance(value, int | float):
        return (float(value),) * num_models
    return tuple(float(v) for v in value)


def _suffix_counts(hist: jax.Array) -> jax.Array:
    """`out[b] = sum_{c >= b} hist[c]` for a `[65536]` int32 histogram, as two small int32 matmuls against
    triangular matrices (cheaper to compile on CPU than a 65536-long cumsum)."""
    rows = hist.reshape(256, 256)
    upper = (jnp.arange(256)[:, None] >= jnp.arange(256)[None, :]).astype(jnp.int32)  # [c, b] = c >= b
    within = jnp.dot(rows, upper, preferred_element_type=jnp.int32)  # [r, b] = sum_{c >= b} rows[r, c]
    totals = within[:, 0]
    strictly_after = (jnp.arange(256)[:, None] > jnp.arange(256)[None, :]).astype(jnp.int32)  # [r', r]
    later_rows = jnp.dot(totals, strictly_after, preferred_element_type=jnp.int32)  # [r]
    return (within + later_rows[:, None]).reshape(-1)


def _kth_largest(keys: jax.Array, valid: jax.Array, k: jax.Array) -> jax.Array:
    """The k-th largest of the uint32 `keys` where `valid` (1-based k), by a two-pass 16-bit radix select."""
    high = (keys >> 16).astype(jnp.int32)
    hist = jnp.zeros((1 << 16,), jnp.int32).at[jnp.where(valid, high, 1 << 16)].add(1, mode="drop")
    at_least = _suffix_counts(hist)
    bin_high = jnp.sum(at_least >= k) - 1
    above = jnp.where(bin_high < (1 << 16) - 1, at_least[jnp.minimum(bin_high + 1, (1 << 16) - 1)], 0)
    low = (keys & 0xFFFF).astype(jnp.int32)
    in_bin = valid & (high == bin_high)
    hist_low = jnp.zeros((1 << 16,), jnp.int32).at[jnp.where(in_bin, low, 1 << 16)].add(1, mode="drop")
    bin_low = jnp.sum(_suffix_counts(hist_low) >= k - above) - 1
    return (bin_high.astype(jnp.uint32) << 16) | bin_low.astype(jnp.uint32)


def host_select() -> bool:
    """Whether `topk_threshold` selects on the host (`host_topk_threshold` through `jax.pure_callback`): on the
    CPU backend, where numpy's partition is exact, needs no compilation, and is faster than the radix select
    (whose XLA:CPU program takes ~9 s to compile per tensor shape and density, measured on 2 cores); on
    accelerators the radix select keeps the data on the device. `HM3_DEVICE_TOPK=1` forces the radix select."""
    return jax.default_backend() == "cpu" and os.environ.get("HM3_DEVICE_TOPK", "") in ("", "0")


def topk_threshold(x: jax.Array, density: float, on_host: bool | None = None) -> jax.Array:
    """The exact cut of `topk_magnitude_mask(x, density)` as uint32 `[2]` = `(t, cut)`: an entry with
    magnitude bits `b` (the float32 bit pattern of `|x|`) at flat index `i` is kept iff
    `b > t or (b == t and i < cut)` (`mask_from_threshold`). Requires `0 < floor(density * n) < n`.

    `t` is the k-th largest magnitude, found by a two-pass radix select on the bit pattern (for non-negative
    floats the uint32 order is the value order), O(n) instead of a sort; the ties at `t` go to the lower flat
    indices, found by a second radix select on the (reversed) flat index of the tied entries.
    `host_topk_threshold` computes the same pair with numpy (the streaming merge uses it); `on_host` (default
    `host_select()`) computes it that way here too, through a host callback (the same pair, tested).
    """
    n = x.size
    k = int(density * n)
    bits = lax.bitcast_convert_type(jnp.abs(x).astype(jnp.float32), jnp.uint32).reshape(-1)
    if host_select() if on_host is None else on_host:
        return jax.pure_callback(
            lambda b: np.asarray(host_topk_threshold(np.asarray(b), density), np.uint32),
            jax.ShapeDtypeStruct((2,), jnp.uint32),
            bits,
            vmap_method="sequential",
        )
    everything = jnp.ones(bits.shape, bool)
    threshold = _kth_largest(bits, everything, jnp.int32(k))
    equal = bits == threshold
    remaining = k - jnp.sum(bits > threshold, dtype=jnp.int32)
    reversed_index = ~jnp.arange(n, dtype=jnp.uint32)  # larger key = lower flat index
    index_threshold = _kth_largest(reversed_index, equal, remaining)
    # reversed_index >= index_threshold  <=>  i <= ~index_threshold  <=>  i < ~index_threshold + 1
    return jnp.stack([threshold, ~index_threshold + jnp.uint32(1)])


def host_topk_threshold(
    magnitude_bits: np.ndarray, density: float, scratch: np.ndarray | None = None
) -> np.ndarray:
    """`topk_threshold` on the host: `magnitude_bits` is the flat uint32 bit pattern of `|x|` (float32).

    Exact (`np.partition`, O(n)); `density >= 1` gives a pair that keeps everything and `k = 0` one that keeps
    nothing, as `topk_magnitude_mask` does. `scratch`: a reusable uint32 buffer of at least n entries for the
    partition (default a new copy). Returns uint32 `[2]`.
    """
    n = magnitude_bits.size
    k = int(density * n)
    if k >= n:
        return np.array([0, 0xFFFFFFFF], np.uint32)
    if k <= 0:
        return np.array([0xFFFFFFFF, 0], np.uint32)
    if scratch is None:
        threshold = np.partition(magnitude_bits, n - k)[n - k]
    else:
        work = scratch[:n]
        np.copyto(work, magnitude_bits)
        work.partition(n - k)
        threshold = work[n - k]
    remaining = k - int(np.count_nonzero(magnitude_bits > threshold))
    cut = int(np.flatnonzero(magnitude_bits == threshold)[remaining - 1]) + 1
    return np.array([threshold, cut], np.uint32)


def mask_from_threshold(x: jax.Array, trim: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    """Elementwise top-k mask from a `topk_threshold` pair; `offset` is the flat index of `x`'s first entry
    (when `x` is a flat chunk of a larger tensor). Returns bool like `x`."""
    bits = lax.bitcast_convert_type(jnp.abs(x).astype(jnp.float32), jnp.uint32)
    index = (jnp.arange(x.size, dtype=jnp.uint32) + jnp.asarray(offset, jnp.uint32)).reshape(x.shape)
    return (bits > trim[0]) | ((bits == trim[0]) & (index < trim[1]))


def topk_magnitude_mask(x: jax.Array, density: float) -> jax.Array:
    """Boolean mask of the `k = floor(density * x.size)` entries of largest `|x|` (TIES "trim", Eq. 1 of
    Yadav et al. 2023; mergekit's `sparsify.magnitude`).

    Exactly k entries are kept; ties at the threshold go to the lower flat index, so the result is
    deterministic (see `topk_threshold`).

    Args:
      x: float32 `[...]`.
      density: fraction kept, in (0, 1]; `density >= 1` keeps everything.
    Returns:
      bool `[...]`.
    """
    n = x.size
    k = int(density * n)
    if k >= n:
        return jnp.ones(x.shape, bool)
    if k <= 0:
        return jnp.zeros(x.shape, bool)
    return mask_from_threshold(x, topk_threshold(x, density))


def dare(
    key: jax.Array, delta: jax.Array, drop_rate: float, rescale: bool = True, keep: jax.Array | None = None
) -> jax.Array:
    """DARE drop-and-rescale (Yu et al. 2024, Eq. 2):
    `m ~ Bernoulli(p)`, `delta' = (1 - m) * delta / (1 - p)`.

    Args:
      key: PRNG key.
      delta: float32 `[...]` task vector.
      drop_rate: p in [0, 1). `p = 0` returns `delta` unchanged.
      rescale: divide survivors by `1 - p` (mergekit's `rescale`, default on for DARE).
      keep: the survivors `1 - m`, bool like `delta`, if already drawn (`dare_keep_mask`, the streaming merge
        draws it once per tensor and applies it chunk by chunk); default drawn here from `key`.
    """
    if drop_rate <= 0.0:
        return delta
    if keep is None:
        keep = dare_keep_mask(key, drop_rate, delta.shape)
    kept = delta / (1.0 - drop_rate) if rescale else delta
    return jnp.where(keep, kept, 0.0)


def dare_keep_mask(key: jax.Array, drop_rate: float, shape: tuple[int, ...]) -> jax.Array:
    """DARE's survivors `1 - m`, `m ~ Bernoulli(drop_rate)`: bool `shape`."""
    return jax.random.bernoulli(key, 1.0 - drop_rate, shape)


def elect_sign_mask(weighted_deltas: jax.Array, consensus: str = "sum") -> jax.Array:
    """TIES "elect" (Yadav et al. 2023, Eq. 2): `gamma = sign(sum_k w_k delta_k)` (0 counts as +), and the
    mask `sign(w_k delta_k) == gamma` (entries trimmed to 0 never agree). `consensus="count"` elects by the
    number of positive vs negative entries instead (mergekit's `count`).

    Args:
      weighted_deltas: float32 `[K, ...]`.
    Returns:
      bool `[K, ...]`.
    """
    signs = jnp.sign(weighted_deltas)
    if consensus == "sum":
        total = _sum_models(weighted_deltas)
    elif consensus == "count":
        total = _sum_models(signs)
    else:
        raise ValueError(f"consensus must be 'sum' or 'count', got {consensus!r}")
    elected = jnp.where(total >= 0, 1.0, -1.0)
    return signs == elected


def _weighted_sum(weighted: jax.Array, weights: jax.Array, normalize: bool) -> jax.Array:
    """`sum_k w_k x_k`, divided by `sum_k w_k` if `normalize` (a sum below 1e-8 in magnitude divides by 1)."""
    merged = _sum_models(weighted)
    if normalize:
        divisor = jnp.sum(weights)
        merged = merged / jnp.where(jnp.abs(divisor) < 1e-8, 1.0, divisor)
    return merged


def _disjoint_merge(weighted: jax.Array, weights: jax.Array, mask: jax.Array, normalize: bool) -> jax.Array:
    """TIES "disjoint merge" (Eq. 3): `sum_k m_k w_k delta_k / sum_k m_k w_k` (0 divisor -> 1)."""
    merged = _sum_models(jnp.where(mask, weighted, 0.0))
    if normalize:
        divisor = _sum_models(jnp.where(mask, _bcast(weights, mask.ndim), 0.0))
        merged = merged / jnp.where(divisor == 0, 1.0, divisor)
    return merged


def linear(key, base, thetas, weights, *, normalize: bool = True):
    """Weighted average (Wortsman et al. 2022, model soups): `sum_k w_k theta_k / sum_k w_k`.

    The base model is not used (mergekit's `linear`); `normalize=False` drops the division.
    """
    del key, base
    return _weighted_sum(thetas * _bcast(weights, thetas.ndim), weights, normalize)


def task_arithmetic(key, base, thetas, weights, *, scale: float = 1.0, normalize: bool = False):
    """Task arithmetic (Ilharco et al. 2023, Eq. 1): `base + scale * sum_k w_k delta_k`
    (divided by `sum_k w_k` if `normalize`)."""
    del key
    deltas = thetas - base
    return base + scale * _weighted_sum(deltas * _bcast(weights, deltas.ndim), weights, normalize)


def ties(
    key,
    base,
    thetas,
    weights,
    *,
    density: float | Sequence[float] = 1.0,
    scale: float = 1.0,
    normalize: bool = True,
    consensus: str = "sum",
    trim: jax.Array | None = None,
    offset: jax.Array | int = 0,
):
    """TIES-merging (Yadav et al. 2023, Eqs. 1-3): trim each `delta_k` to its top-`density` magnitudes,
    elect a sign per entry from `sum_k w_k delta_k`, and take the disjoint (weighted) mean of the agreeing
    entries: `base + scale * sum_k m_k w_k delta_k / sum_k m_k w_k`.

    `density` is the fraction kept (a float or one per model); `normalize=False` skips the division
    (mergekit's `normalize`, default True for TIES).

    `trim` (uint32 `[K, 2]`, one `topk_threshold` pair per model) and `offset` let the streaming merge apply
    the trim to a flat chunk of a tensor whose exact thresholds were computed beforehand; everything else
    is elementwise, so a chunk gives the same entries as the whole tensor.
    """
    del key
    deltas = thetas - base
    if trim is None:
        densities = per_model(density, deltas.shape[0])
        masks = [topk_magnitude_mask(d, dens) for d, dens in zip(deltas, densities, strict=True)]
    else:
        masks = [mask_from_threshold(d, trim[i], offset) for i, d in enumerate(deltas)]
    trimmed = jnp.stack([jnp.where(m, d, 0.0) for m, d in zip(masks, deltas, strict=True)])
    weighted = trimmed * _bcast(weights, trimmed.ndim)
    mask = elect_sign_mask(weighted, consensus)
    return base + scale * _disjoint_merge(weighted, weights, mask, normalize)


def dare_deltas(key, deltas, drop_rate, rescale, keep=None):
    """`DARE_{p_k}(delta_k)` for every model k of `deltas` `[K, ...]`: model k's drop mask is drawn with
    `fold_in(key, k)`, or read from `keep[k]` when `keep` `[K, ...]` is given (key then unused); `drop_rate` is
    one rate or one per model (`per_model`). Shared by `dare_linear`, `dare_ties` and the streaming merger's
    TIES thresholds (`api.trim_magnitude_bits`)."""
    rates = per_model(drop_rate, deltas.shape[0])
    return jnp.stack(
        [
            dare(
                None if (keep is not None or p <= 0.0) else jax.random.fold_in(key, i),
                d,
                p,
                rescale,
                None if keep is None else keep[i],
            )
            for i, (d, p) in enumerate(zip(deltas, rates, strict=True))
        ]
    )


def dare_linear(
    key,
    base,
    thetas,
    weights,
    *,
    drop_rate: float | Sequence[float] = 0.0,
    scale: float = 1.0,
    normalize: bool = False,
    rescale: bool = True,
    keep: jax.Array | None = None,
):
    """DARE + task arithmetic (Yu et al. 2024): `base + scale * sum_k w_k DARE_p(delta_k)`.

    The k-th model's drop mask is drawn with `fold_in(key, k)` (`keep` `[K, ...]`: already drawn).
    """
    deltas = dare_deltas(key, thetas - base, drop_rate, rescale, keep)
    return base + scale * _weighted_sum(deltas * _bcast(weights, deltas.ndim), weights, normalize)


def dare_ties(
    key,
    base,
    thetas,
    weights,
    *,
    drop_rate: float | Sequence[float] = 0.0,
    density: float | Sequence[float] = 1.0,
    scale: float = 1.0,
    normalize: bool = False,
    rescale: bool = True,
    consensus: str = "sum",
    keep: jax.Array | None = None,
    trim: jax.Array | None = None,
    offset: jax.Array | int = 0,
):
    """DARE + TIES (HM3_SPEC Eq. 5; Yu et al. 2024): `delta_k' = DARE_p(delta_k)`, then TIES on `delta_k'`
    (trim to top-`density`, elect signs, disjoint merge):
    `base + scale * sum_k m_k w_k delta_k' [/ sum m_k w_k]`.

    Differs from mergekit's `dare_ties` only in naming: here `drop_rate` is DARE's p and `density` is the TIES
    trim (default 1 = no trim, which is mergekit's `dare_ties`, whose `density` is our `1 - drop_rate`).
    The k-th model's drop mask is drawn with `fold_in(key, k)` (`keep`, `trim`, `offset`: as in `dare_linear`
    and `ties`, for the streaming merge's chunks).
    """
    deltas = dare_deltas(key, thetas - base, drop_rate, rescale, keep)
    return (
        ties(
            None,
            jnp.zeros_like(base),
            deltas,
            weights,
            density=density,
            scale=1.0,
            normalize=normalize,
            consensus=consensus,
            trim=trim,
            offset=offset,
        )
        * scale
        + base
    )


def slerp(key, base, thetas, weights, *, dot_threshold: float = 0.9995, eps: float = 1e-8):
    """Spherical linear interpolation between `v0 = base` and `v1 = thetas[0]` at `t = weights[0]`
    (Shoemake 1985; mergekit's `slerp`): with `cos(theta0) = <v0/|v0|, v1/|v1|>`,
    `out = sin((1-t) theta0)/sin(theta0) v0 + sin(t theta0)/sin(theta0) v1`, falling back to
    `(1-t) v0 + t v1` when `|cos(theta0)| > dot_threshold`. The whole tensor is one vector.
    """
    del key
    v0, v1 = base, thetas[0]
    t = weights[0]
    norm0 = jnp.linalg.norm(v0.reshape(-1))
    norm1 = jnp.linalg.norm(v1.reshape(-1))
    u0 = jnp.where(norm0 > eps, v0 / jnp.where(norm0 > eps, norm0, 1.0), v0)
    u1 = jnp.where(norm1 > eps, v1 / jnp.where(norm1 > eps, norm1, 1.0), v1)
    dot = jnp.sum(u0 * u1)
    lerp = (1.0 - t) * v0 + t * v1
    colinear = jnp.abs(dot) > dot_threshold
    theta0 = jnp.arccos(jnp.where(colinear, 0.0, dot))
    sin0 = jnp.where(colinear, 1.0, jnp.sin(theta0))
    s0 = jnp.sin(theta0 - theta0 * t) / sin0
    s1 = jnp.sin(theta0 * t) / sin0
    return jnp.where(colinear, lerp, s0 * v0 + s1 * v1)


def consensus(
    key,
    base,
    thetas,
    weights,
    *,
    base_method: str = "task_arithmetic",
    k: int = 2,
    tall_lambda: float | Sequence[float] = 0.4,
    density: float | Sequence[float] = 1.0,
    scale: float = 1.0,
    normalize: bool | None = None,
    consensus: str = "sum",
):
    """Consensus merging with TALL masks (Wang et al., ICML 2024, Eqs. 4 and 6).

    With weighted task vectors `tau_t = w_t delta_t` and the multi-task vector `tau_MTL = sum_t tau_t`:
    TALL mask `m_t = 1{|tau_t| >= lambda_t |tau_MTL - tau_t|}`; consensus mask `m = 1{sum_t m_t >= k}`
    (drops "selfish" weights used by fewer than k tasks and "catastrophic" ones used by none);
    result `base + scale * m * merged_delta`, where `merged_delta` is the `base_method`'s merged task vector
    (`"task_arithmetic"`: `sum_t tau_t`; `"ties"`: the TIES merge with `density`).
    `normalize` defaults to the base method's default (False for task arithmetic, True for TIES).
    """
    del key
    deltas = thetas - base
    num_models = deltas.shape[0]
    weighted = deltas * _bcast(weights, deltas.ndim)
    tau_mtl = _sum_models(weighted)
    lambdas = jnp.asarray(per_model(tall_lambda, num_models), jnp.float32)
    tall = jnp.abs(weighted) >= _bcast(lambdas, deltas.ndim) * jnp.abs(tau_mtl - weighted)
    keep = _sum_models(tall.astype(jnp.int32)) >= k
    zeros = jnp.zeros_like(base)
    if base_method == "task_arithmetic":
        merged = task_arithmetic(None, zeros, deltas, weights, normalize=bool(normalize))
    elif base_method == "ties":
        norm = True if normalize is None else normalize
        merged = ties(None, zeros, deltas, weights, density=density, normalize=norm, consensus=consensus)
    else:
        raise ValueError(f"consensus base_method must be 'task_arithmetic' or 'ties', got {base_method!r}")
    return base + scale * jnp.where(keep, merged, 0.0)


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows of `[K, n]` divided by their L2 norm (torch `F.normalize(dim=1)`)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def pcb(key, base, thetas, weights, *, density: float = 0.2, scale: float = 1.0):
    """Parameter Competition Balancing (Du et al., NeurIPS 2024, Sec. 3.2, Eqs. 2-6), per tensor.

    With `delta_i = w_i (theta_i - base)` flattened to `[n]` and N models:
    intra-balancing `beta_intra_i = softmax(N * Norm(delta_i * delta_i))`,
    inter-balancing `beta_inter_i = sum_j softmax(Norm(delta_i * delta_j))`,
    `beta_i = beta_intra_i * beta_inter_i`; drop: `m_i` keeps the top-`density` fraction of `beta_i`;
    `hat_beta_i = m_i * beta_i`; merge: `base + scale * sum_i hat_beta_i delta_i / sum_i hat_beta_i`
    (elementwise; 0 where every `hat_beta_i` is 0). `Norm` is L2 normalisation over the tensor, as in
    mergekit. mergekit divides by the scalar `sum(hat_beta)` over all entries instead of the paper's
    elementwise sum; we follow the paper's Eq. 6.
    """
    del key
    deltas = (thetas - base) * _bcast(weights, thetas.ndim)
    num_models = deltas.shape[0]
    flat = deltas.reshape(num_models, -1)  # [N, n]
    b_intra = jax.nn.softmax(num_models * _l2_normalize(flat * flat), axis=-1)
    b_inter = jnp.sum(jax.nn.softmax(_l2_normalize(flat[:, None, :] * flat[None, :, :]), axis=-1), axis=1)
    beta = b_intra * b_inter  # [N, n], positive
    mask = jnp.stack([topk_magnitude_mask(b, density) for b in beta])
    beta_hat = jnp.where(mask, beta, 0.0)
    total = jnp.sum(beta_hat, axis=0)
    merged = jnp.sum(beta_hat * flat, axis=0) / jnp.where(total > 0, total, 1.0)
    return base + scale * merged.reshape(base.shape)
