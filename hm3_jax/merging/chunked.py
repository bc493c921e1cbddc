"""Chunked merges of one large tensor: the elementwise merge methods on flat chunks, bitwise the whole-tensor merge.

Once DARE's survivors and TIES' exact top-k thresholds of a tensor are known, `linear`, `task_arithmetic`,
`ties`, `dare_linear` and `dare_ties` are elementwise (`CHUNKED_METHODS`), so a tensor can be merged in flat
chunks of `chunk_elements` (`merge_chunked`): the survivors are drawn for the whole tensor with the in-memory
kernel's key and shape (`kernels.dare_keep_mask`), the k-th largest magnitude and its tie index are found on
the host (`topk.host_topk_threshold`, numpy), and `merge_chunk` merges chunk after chunk. The peak is K + 1
float32 copies of one chunk on the device (plus the host's `[K, n]` survivors and magnitude bits), not of the
tensor. Used by the streaming merge of checkpoints (`streaming.py`, every tensor) and by the in-memory `merge`
(`api.py`) for non-stacked leaves whose K + 1 float32 copies exceed `api.CHUNKED_MERGE_BYTES` (a 151936 x 896
embedding of Qwen2.5-0.5B with three experts: 2.2 GB of float32 copies, and several times that in the TIES
kernel's temporaries).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax.merging import kernels, topk

DEFAULT_CHUNK_ELEMENTS = 1 << 21
_MIN_BUCKET = 4096


# Methods whose merge is elementwise once the DARE survivors and the exact top-k thresholds of a tensor are
# known, so the streaming merge can run them on flat chunks (`merge_chunk`).
CHUNKED_METHODS = frozenset({"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"})


def _inputs32(base, thetas):
    base32 = base.astype(jnp.float32)
    stacked_thetas = jnp.stack([t.astype(jnp.float32) for t in thetas])  # [K, ...]
    bad = jnp.stack([~jnp.all(jnp.isfinite(base32))] + [~jnp.all(jnp.isfinite(t)) for t in stacked_thetas])
    return base32, stacked_thetas, bad


@functools.partial(jax.jit, static_argnames=("kernel", "out_dtype"))
def merge_chunk(kernel, out_dtype, base, thetas, weights, keep, trim, offset):
    """A flat chunk `[C]` of one (non-stacked) tensor for a `CHUNKED_METHODS` kernel: as `merge_tensor`, with
    the DARE survivors `keep` (bool `[K, C]` or None) and the top-k thresholds `trim` (uint32 `[K, 2]`, for
    the whole tensor, or None) given; `offset` is the chunk's first flat index. Returns the merged chunk
    and the non-finite flags `[1 + K]`."""
    base32, stacked_thetas, bad = _inputs32(base, thetas)
    extra = {}
    if keep is not None:
        extra["keep"] = keep
    if trim is not None:
        extra["trim"] = trim
        extra["offset"] = offset
    out = kernel(jax.random.key(0), base32, stacked_thetas, weights, **extra)
    return out.astype(out_dtype), bad


@functools.partial(jax.jit, static_argnames=("kernel",))
def trim_magnitude_bits(kernel, base, thetas, keep):
    """The uint32 bit patterns of `|delta_k|` (`[K, C]`) that the kernel's TIES trim ranks, for a flat chunk:
    `delta_k = theta_k - base` (after DARE with the survivors `keep` for `dare_ties`), computed with the
    kernel's own operations so that host thresholds (`topk.host_topk_threshold`) match the in-memory
    radix select exactly. Also returns the non-finite flags `[1 + K]`."""
    base32, stacked_thetas, bad = _inputs32(base, thetas)
    deltas = stacked_thetas - base32
    if kernel.method == "dare_ties":
        hp = dict(kernel.hparams)
        deltas = kernels.dare_deltas(None, deltas, hp["drop_rate"], hp["rescale"], keep)
        deltas = deltas - jnp.zeros_like(base32)  # as `dare_ties` calls `ties` with a zero base
    return jax.lax.bitcast_convert_type(jnp.abs(deltas), jnp.uint32), bad


@functools.partial(jax.jit, static_argnames=("drop_rate", "shape"))
def keep_mask(key, drop_rate, shape):
    return kernels.dare_keep_mask(key, drop_rate, shape)


def _padded(flat: np.ndarray, start: int, stop: int, length: int, fill=0) -> np.ndarray:
    """`flat[start:stop]` padded with `fill` to `length` entries (a view when no padding is needed)."""
    piece = flat[start:stop]
    if piece.size == length:
        return piece
    out = np.full(length, fill, flat.dtype)
    out[: piece.size] = piece
    return out


def _workspace_buffer(workspace: dict, name: str, dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A `shape` view of a buffer kept in `workspace` across tensors (grown when too small), so that large
    tensors do not pay fresh page faults for every temporary."""
    size = int(np.prod(shape))
    buffer = workspace.get(name)
    if buffer is None or buffer.dtype != np.dtype(dtype) or buffer.size < size:
        buffer = workspace[name] = np.empty(size, dtype)
    return buffer[:size].reshape(shape)


def merge_chunked(kernel, dtype_out, leaf_key, base_arr, arrays, leaf_w, chunk_elements, workspace):
    """One tensor of a `CHUNKED_METHODS` merge in flat chunks of `chunk_elements`: the DARE survivors
    are drawn for the whole tensor exactly as the in-memory kernel draws them, the exact top-k thresholds
    of the TIES trim are computed on the host (`topk.host_topk_threshold`, the same kept set as the
    in-memory radix select), and `merge_chunk` applies the now elementwise merge chunk by chunk.
    Chunks are padded to a power-of-two length (at least `_MIN_BUCKET`) so that tensors share compiled code.

    Returns `(merged [shape] dtype_out, bad [1 + K])`; `merged` is None when an input is not finite.
    `merged` is a view of a `workspace` buffer: valid until the next call with the same workspace."""
    hp = dict(kernel.hparams)
    num_models, n, shape = len(arrays), base_arr.size, base_arr.shape
    length = min(chunk_elements, max(_MIN_BUCKET, 1 << max(n - 1, 0).bit_length()))
    starts = range(0, n, length)
    flat_base = base_arr.reshape(-1)
    flats = [a.reshape(-1) for a in arrays]
    weights = np.asarray(leaf_w, np.float32)

    def inputs(start):
        stop = min(start + length, n)
        return _padded(flat_base, start, stop, length), [_padded(f, start, stop, length) for f in flats]

    keep = None
    if kernel.method in ("dare_linear", "dare_ties"):
        rates = kernels.per_model(hp["drop_rate"], num_models)
        if any(p > 0.0 for p in rates):
            keep = _workspace_buffer(workspace, "keep", bool, (num_models, n))
            keep.fill(True)
            # dispatch every model's draw before waiting for any, so XLA can run them concurrently
            drawn = {
                i: keep_mask(jax.random.fold_in(leaf_key, i), p, shape)
                for i, p in enumerate(rates)
                if p > 0.0
            }
            for i, mask in drawn.items():
                keep[i] = np.asarray(mask).reshape(-1)

    def keep_chunk(start):
        if keep is None:
            return None
        stop = min(start + length, n)
        return np.stack([_padded(k, start, stop, length, True) for k in keep])

    bad_any = np.zeros(num_models + 1, bool)
    trim = None
    if kernel.method in ("ties", "dare_ties"):
        densities = kernels.per_model(hp["density"], num_models)
        if any(int(d * n) < n for d in densities):
            bits = _workspace_buffer(workspace, "bits", np.uint32, (num_models, n))
            for start in starts:
                stop = min(start + length, n)
                b, bad = trim_magnitude_bits(kernel, *inputs(start), keep_chunk(start))
                bits[:, start:stop] = np.asarray(b)[:, : stop - start]
                bad_any |= np.asarray(bad)
            if bad_any.any():
                return None, bad_any
            scratch = _workspace_buffer(workspace, "scratch", np.uint32, (n,))
            trim = np.stack([topk.host_topk_threshold(bits[i], d, scratch) for i, d in enumerate(densities)])
    out = _workspace_buffer(workspace, "out", dtype_out, (n,))
    for start in starts:
        stop = min(start + length, n)
        merged, bad = merge_chunk(
            kernel, np.dtype(dtype_out), *inputs(start), weights, keep_chunk(start), trim, np.uint32(start)
        )
        out[start:stop] = np.asarray(merged)[: stop - start]
        bad_any |= np.asarray(bad)
    if bad_any.any():
        return None, bad_any
    return out.reshape(shape), bad_any
