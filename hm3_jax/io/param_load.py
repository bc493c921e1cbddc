"""Reading a Hugging Face checkpoint into our params with the family tables (`mapping.py`).

Names and shapes of every tensor are checked against the config first (headers only, `check_tensors`), so a
bad checkpoint fails before any copy; a mismatch raises an error that names the tensor. Loading fills one
preallocated numpy buffer per leaf (block leaves `[L, ...]` are filled slice by slice) and moves it to a device
array as soon as it is complete, so peak host memory is the model plus one leaf, never two copies.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator

import jax
import ml_dtypes
import numpy as np

from hm3_jax.io.layouts import to_ours
from hm3_jax.io.mapping import (
    check_covers,
    entry_hf_shape,
    family_mapping,
    hf_names,
    leaf_at,
    param_shapes,
    set_leaf,
)
from hm3_jax.io.safetensors_io import CheckpointError, TensorReader
from hm3_jax.models.config import ModelConfig

log = logging.getLogger(__name__)


class _Resolver:
    """Finds the stored name of a canonical HF name (with or without the base-model prefix)."""

    def __init__(self, names: list[str], base_prefix: str):
        self.names = set(names)
        self.base_prefix = base_prefix

    def __call__(self, canonical: str) -> str | None:
        candidates = [canonical]
        if self.base_prefix and canonical.startswith(self.base_prefix):
            candidates.append(canonical[len(self.base_prefix) :])
        else:
            candidates.append(self.base_prefix + canonical)
        return next((c for c in candidates if c in self.names), None)


def check_tensors(config: ModelConfig, names: list[str], shape_fn: Callable[[str], tuple[int, ...]]) -> None:
    """Checks a checkpoint's tensor names and shapes (headers only) against its config, as `load_params` does.

    Args:
      config: the model config (from `config.json`).
      names: the checkpoint's tensor names; shape_fn: name -> its shape.
    Raises:
      CheckpointError naming the tensor and the config fields when a tensor is missing, unexpected, beyond
      `num_layers`, or shaped otherwise than `config` implies (e.g. hidden_size 48 with 32-wide tensors).
    """
    mapping = family_mapping(config)
    shapes = param_shapes(config, np.float32)
    check_covers(mapping, shapes, config)
    _check_tensors(mapping, shapes, config, names, shape_fn)


def _check_tensors(mapping, shapes, config, names, shape_fn) -> dict[tuple[int, int], str]:
    """`check_tensors` on a resolved mapping; returns `{(entry index, block): stored name}`."""
    resolve = _Resolver(names, mapping.base_prefix)
    num_layers = config.num_layers
    stored: dict[tuple[int, int], str] = {}
    missing = []
    for i, entry in enumerate(mapping.entries):
        expected = entry_hf_shape(entry, shapes, config)
        for l, name in enumerate(hf_names(entry, num_layers)):
            found = resolve(name)
            if found is None:
                missing.append(name)
                continue
            shape = shape_fn(found)
            if tuple(shape) != expected:
                raise CheckpointError(
                    f"tensor {found!r} has shape {list(shape)}, but config.json implies {list(expected)} "
                    f"(family {config.family}, hidden_size={config.hidden_size}, "
                    f"intermediate_size={config.intermediate_size}, num_layers={config.num_layers})"
                )
            stored[(i, l)] = found
    if missing:
        raise CheckpointError(
            f"checkpoint is missing {len(missing)} tensor(s) that config.json requires, e.g. {missing[:5]}"
        )
    used = set(stored.values())
    tied = {t for name in mapping.tied if (t := resolve(name)) is not None}
    ignored = [n for n in names if any(re.fullmatch(p, n) for p in mapping.ignored)]
    unexpected = sorted(set(names) - used - tied - set(ignored))
    if any(k >= num_layers for k in _block_indices(names)):
        raise CheckpointError(
            f"checkpoint has blocks beyond num_layers={num_layers} (config.json): e.g. {unexpected[:5]}"
        )
    if unexpected:
        raise CheckpointError(
            f"checkpoint has {len(unexpected)} tensor(s) that a {config.family} model with this config "
            f"does not use: {unexpected[:10]}"
        )
    if ignored:
        log.info("ignoring %d tensors that hold no parameters we use: %s", len(ignored), ignored[:5])
    return stored


def load_params(
    config: ModelConfig, reader: TensorReader, dtype, progress=None, on_host: bool = False
) -> dict:
    """Reads every tensor our layout needs from `reader` into a params tree of `dtype`.

    Args:
      config: the model config (from `config.json`).
      reader: an open `TensorReader` over the checkpoint's safetensors files.
      dtype: float32 or bfloat16; every leaf is cast to it.
      progress: optional wrapper over the entry iterator (e.g. tqdm).
      on_host: keep every leaf a host (numpy) array instead of placing it on the default device (a run on a
        mesh places only the shards of its pools; docs/scaling.md "Session 12: device 0 holds shards only").
    Returns:
      params `{"embed", "blocks", "final", "head"}` of device arrays (numpy arrays when `on_host`).
    Raises:
      CheckpointError naming the tensor when one is missing, its shape disagrees with the config or it holds
      NaN/Inf (with its file), and listing tensors the checkpoint holds that the architecture does not use.
    """
    mapping = family_mapping(config)
    np_dtype = (
        np.dtype(ml_dtypes.bfloat16) if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16) else np.dtype(dtype)
    )
    shapes = param_shapes(config, np_dtype)
    check_covers(mapping, shapes, config)
    # Names and shapes of everything first (headers only), so a bad checkpoint fails before any copy.
    stored = _check_tensors(mapping, shapes, config, reader.names(), reader.shape)
    num_layers = config.num_layers
    put = (lambda x: x) if on_host else jax.device_put

    params: dict = {}
    entries: Iterator = iter(enumerate(mapping.entries))
    if progress is not None:
        entries = progress(entries)
    for i, entry in entries:
        if not entry.per_block and len(entry.leaves) == 1:
            # A whole leaf in one tensor (embeddings, head): cast the read array itself, no second buffer.
            leaf_shape = tuple(leaf_at(shapes, entry.leaves[0]).shape)
            x = to_ours(entry.kind, reader.get(stored[(i, 0)]), leaf_shape).astype(np_dtype, copy=False)
            set_leaf(params, entry.leaves[0], put(np.ascontiguousarray(x)))
            del x
            continue
        buffers = [np.empty(leaf_at(shapes, leaf).shape, np_dtype) for leaf in entry.leaves]
        sizes = [b.shape[-1] for b in buffers]
        for l in range(num_layers if entry.per_block else 1):
            name = stored[(i, l)]
            x = to_ours(entry.kind, reader.get(name), _ours_joined_shape(buffers, entry.per_block))
            offset = 0
            for buf, size in zip(buffers, sizes, strict=True):
                part = x[..., offset : offset + size]
                if entry.per_block:
                    buf[l] = part
                else:
                    buf[...] = part
                offset += size
            del x
        for leaf, buf in zip(entry.leaves, buffers, strict=True):
            set_leaf(params, leaf, put(buf))
        del buffers
    for key in ("embed", "blocks", "final", "head"):
        params.setdefault(key, {})
    return params


def _ours_joined_shape(buffers: list[np.ndarray], per_block: bool) -> tuple[int, ...]:
    shape = buffers[0].shape[1:] if per_block else buffers[0].shape
    return tuple(shape[:-1]) + (sum(b.shape[-1] for b in buffers),)


def _block_indices(names: list[str]) -> set[int]:
    out = set()
    for name in names:
        m = re.search(r"(?:^|\.)(?:layers|h|layer)\.(\d+)\.", name)
        if m:
            out.add(int(m.group(1)))
    return out
