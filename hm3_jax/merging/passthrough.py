"""Plain layer stacking of Hugging Face checkpoints (mergekit's `passthrough` with `slices`): a
"frankenmerge" without arithmetic, tensor by tensor, into an atomic output directory (`checkpoint_output.py`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import tqdm

from hm3_jax.io import atomic
from hm3_jax.merging.checkpoint_output import (
    DEFAULT_MAX_SHARD_BYTES,
    atomic_output,
    check_against_config,
    check_output_options,
    commit_output,
    copy_side_files,
)
from hm3_jax.merging.groups import layer_index, shell_end
from hm3_jax.merging.safetensors_stream import (
    Checkpoint,
    dtype_from_name,
    is_float,
    output_dtype,
    write_shards,
)

_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def passthrough_checkpoints(
    slices: Sequence[tuple[str, int, int]],
    out: str,
    *,
    base: str | None = None,
    dtype: str | None = None,
    tokenizer_source: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Plain layer stacking (mergekit's `passthrough` with `slices`): a "frankenmerge" without arithmetic.

    As mergekit (`MergePlanner.plan`: `pre_weights` from `slices[0]`, `post_weights` from `slices[-1]`), the
    output is

        pre weights (embeddings)       <- the FIRST slice's model
        block i, i = 0 .. sum(end - start) - 1  <- block `start + j` of the slice that covers it, in order
        post weights (final norm, head) <- the LAST slice's model

    (`shell_end` says which end a tensor outside the blocks belongs to). An empty slice (`start == end`)
    adds no block; put one first or last to take the embeddings or the head from a model that gives no block.

    Args:
      slices: `(checkpoint_dir, start, end)` triples, `0 <= start <= end <= L` of that checkpoint.
      base: checkpoint whose config.json and tokenizer are copied (default the first slice's); its tensors
        are not used (as mergekit's passthrough ignores `base_model`).
      dtype: output dtype of floating tensors; default unchanged.
    Returns:
      `{"out", "num_tensors", "num_layers"}`. config.json's layer count is set to the new number of blocks.
    """
    if not slices:
        raise ValueError("passthrough: the list of slices is empty")
    check_output_options(tokenizer_source, max_shard_bytes)
    out_dtype = dtype_from_name(dtype) if dtype else None
    shell_dir = base or slices[0][0]
    opened: dict[str, Checkpoint] = {}

    def ckpt(path):
        if path not in opened:
            opened[path] = Checkpoint(path)
        return opened[path]

    plan = []  # (out_name, checkpoint, in_name)
    for end, source in (("pre", ckpt(slices[0][0])), ("post", ckpt(slices[-1][0]))):
        for name in source.names:
            if layer_index(name) is None and shell_end(name) == end:
                plan.append((name, source, name))
    new_layer = 0
    for path, start, end in slices:
        source = ckpt(path)
        by_layer: dict[int, list[str]] = {}
        for name in source.names:
            idx = layer_index(name)
            if idx is not None:
                by_layer.setdefault(idx, []).append(name)
        if not 0 <= start <= end or (end > start and end - 1 not in by_layer):
            raise ValueError(
                f"passthrough: layer_range [{start}, {end}) is outside the {len(by_layer)} layers of {path!r}"
            )
        for layer in range(start, end):
            for name in by_layer[layer]:
                plan.append((_rename_layer(name, layer, new_layer), source, name))
            new_layer += 1
    plan.sort(key=lambda item: item[0])
    tmp = None
    try:
        entries = [
            (out_name, output_dtype(source.dtype(in_name), out_dtype), source.shape(in_name))
            for out_name, source, in_name in plan
        ]
        updates = _layer_count_updates(shell_dir, new_layer)
        check_against_config(shell_dir, updates, entries)
        tmp = atomic_output(out, overwrite)
        lookup = {out_name: (source, in_name) for out_name, source, in_name in plan}
        bar = tqdm.tqdm(total=len(plan), desc="passthrough", unit="tensor", disable=not progress)

        def copied_tensor(out_name: str, dtype_out: np.dtype) -> np.ndarray:
            source, in_name = lookup[out_name]
            array = source.get(in_name)
            if is_float(array.dtype) and not np.all(np.isfinite(array.astype(np.float32))):
                raise ValueError(f"NaN or Inf in checkpoint {source.path!r} at tensor {in_name!r}")
            return array.astype(dtype_out)

        write_shards(tmp, entries, max_shard_bytes, copied_tensor, lambda: bar.update(1))
        bar.close()
        copy_side_files(tmp, shell_dir, tokenizer_source or shell_dir, dtype, updates)
        commit_output(tmp, out, overwrite)
        tmp = None
    finally:
        for source in opened.values():
            source.close()
        if tmp is not None:
            atomic.discard(tmp)
    return {"out": os.path.abspath(out), "num_tensors": len(plan), "num_layers": new_layer}


def _layer_count_updates(shell_dir: str, num_layers: int) -> dict:
    """The config.json entries a passthrough output changes: its layer count (under the key the config uses)."""
    config_path = os.path.join(shell_dir, "config.json")
    if not os.path.isfile(config_path):
        return {}
    with open(config_path) as f:
        config = json.load(f)
    return {k: num_layers for k in _LAYER_COUNT_KEYS if k in config} or {"num_hidden_layers": num_layers}


def _rename_layer(name: str, old: int, new: int) -> str:
    """`model.layers.7.mlp...` -> `model.layers.2.mlp...` (only the layer-index occurrence)."""
    return re.sub(
        rf"(^|[./])(layers|layer|h|blocks|block)([./]){old}([./]|$)",
        lambda m: f"{m.group(1)}{m.group(2)}{m.group(3)}{new}{m.group(4)}",
        name,
        count=1,
    )
