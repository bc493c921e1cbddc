"""Exact top-k magnitude masks (TIES' "trim"): which `k = floor(density * n)` entries of a tensor have the
largest `|x|`, ties going to the lower flat index.

`topk_threshold` finds the cut as a pair `(t, cut)` of the magnitude bits (a radix select on the device, or
numpy's partition on the host, `host_topk_threshold`); `mask_from_threshold` applies a pair elementwise, also
to a flat chunk of a larger tensor (the streaming and chunked merges); `topk_magnitude_mask` is both in one.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


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
