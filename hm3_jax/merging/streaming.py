"""Streaming merges of Hugging Face checkpoints: tensor by tensor, bounded memory, atomic output directory.

`merge_checkpoints` reads one tensor of every input lazily (`safetensors_stream.Checkpoint`), merges it with
the same kernels and per-leaf weight rules as the in-memory `merge` (`api.py`), and appends it to an output
shard whose header was written up front (`safetensors_stream.write_shards`), so peak memory is a few tensors,
never a model. The elementwise methods (`chunked.CHUNKED_METHODS`: linear, task_arithmetic, ties,
dare_linear, dare_ties) run on flat chunks of `chunk_elements` (`chunked.merge_chunked`): DARE's survivors
are drawn for the whole tensor with the in-memory kernel's key and shape, TIES' exact top-k cut (k-th
largest magnitude and the tie index, `topk.host_topk_threshold`, numpy) is computed on the host before the
chunks, so the kept set is the in-memory radix select's and the output is bitwise the in-memory merge's.
slerp, consensus and pcb (whole-tensor norms and masks) merge each tensor whole with `api.merge_tensor`.
Everything is written into a temporary sibling directory that is renamed to `out` only when the merge is
complete (`checkpoint_output.py`); on any error it is deleted, so an interrupted merge never leaves a
directory that looks done.

Tensor names are Hugging Face's (no conversion to the stacked layout). Per-block weights use the layer index
in the name (`model.layers.3.`, `h.3.`, `encoder.layer.3.`, see `groups.layer_index`); tensors without one
(embeddings, final norm, head) get the mean of a per-block vector. A weight may also be a function of the
tensor name (`name -> number or [L] vector`), which is how mergekit's filters and gradients arrive from a YAML
config (`mergekit_config.TensorSetting`). Tensor `i` in sorted-name order draws its DARE masks from
`fold_in(key, i)`, exactly as `merge` does on the flat `{name: array}` dict, so the streaming and the
in-memory merge give identical tensors.

Vocabularies: a model whose tokenizer differs from the base's (added tokens, other ids) is refused, naming it
and `tokenizer_source: base`. With `tokenizer_source` the base's own directory (the YAML's
`tokenizer_source: base`), its token tables (`checkpoint_vocab.is_token_table`: input embeddings and LM
heads, `[V, D]` rows indexed by token id) are re-indexed onto the base's ids before merging
(`checkpoint_vocab.rows_onto`), so every input has the base's row count and the output the base's
`vocab_size`. Layer stacking without arithmetic: `passthrough.py`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import tqdm

from hm3_jax.io import atomic
from hm3_jax.merging import api, chunked
from hm3_jax.merging.checkpoint_output import (
    DEFAULT_MAX_SHARD_BYTES,
    atomic_output,
    check_against_config,
    check_output_options,
    commit_output,
    copy_side_files,
)
from hm3_jax.merging.checkpoint_vocab import is_token_table, rows_onto, vocab_maps
from hm3_jax.merging.groups import GroupFn, check_leaf_weights, default_param_group, leaf_weights
from hm3_jax.merging.methods import check_merge_call, check_weights_arg, make_kernel
from hm3_jax.merging.safetensors_stream import (
    Checkpoint,
    dtype_from_name,
    is_float,
    output_dtype,
    write_shards,
)

DEFAULT_CHUNK_ELEMENTS = chunked.DEFAULT_CHUNK_ELEMENTS


def _check_same_architecture(reference: Checkpoint, others: Sequence[Checkpoint], row_maps=None) -> None:
    """Same tensor names and shapes; token tables of inputs mapped onto the reference's ids (`row_maps[k]`
    not None, `checkpoint_vocab.vocab_maps`) need only the same row width."""
    for k, ckpt in enumerate(others):
        mapped = row_maps is not None and row_maps[k] is not None
        ref_names, names = set(reference.names), set(ckpt.names)
        if ref_names != names:
            missing = sorted(ref_names - names)
            what = (
                f"tensor {missing[0]!r} missing"
                if missing
                else f"unexpected tensor {sorted(names - ref_names)[0]!r}"
            )
            raise ValueError(
                f"checkpoint {ckpt.path!r} has a different architecture than {reference.path!r}: {what}"
            )
        for name in reference.names:
            skip = 1 if mapped and is_token_table(name) else 0
            if reference.shape(name)[skip:] != ckpt.shape(name)[skip:]:
                raise ValueError(
                    f"checkpoint {ckpt.path!r} differs from {reference.path!r} at tensor {name!r}: shape "
                    f"{ckpt.shape(name)} vs {reference.shape(name)}"
                )


def merge_checkpoints(
    method: str,
    base: str | None,
    models: Sequence[str],
    out: str,
    *,
    key: jax.Array | None = None,
    weights: Sequence[Any] | None = None,
    dtype: str | None = None,
    group_fn: GroupFn = default_param_group,
    tokenizer_source: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    **hparams: Any,
) -> dict[str, Any]:
    """Merges Hugging Face checkpoint directories tensor by tensor into the directory `out`.

    Args:
      method, key, group_fn, **hparams: as for `api.merge` (same methods, hyperparameters, checks).
      weights: as for `api.merge` (per model: a number, an `[L]` per-block vector or a per-group mapping),
        or per model a function `tensor_name -> number or [L] vector` (e.g. `mergekit_config.TensorSetting`:
        mergekit's gradients and filters), called once per tensor.
      base: base checkpoint directory (None only for `linear`; config and tokenizer then come from models[0]).
      models: K fine-tuned checkpoint directories with the base's tensor names and shapes.
      out: output directory; must not exist unless `overwrite`.
      dtype: output dtype of floating tensors (`"bfloat16"`, `"float16"`, `"float32"`); default each
        tensor's base dtype. Arithmetic is float32 either way.
      tokenizer_source: directory whose tokenizer files are copied (default the base). The base's own
        directory (YAML `tokenizer_source: base`) also maps models with other vocabularies onto the base's
        token ids (module docstring); without it such a model is an error.
      max_shard_bytes: output shard size limit.
      progress: tqdm bar over tensors.
      chunk_elements: flat chunk length for the elementwise methods (linear, task_arithmetic, ties,
        dare_linear, dare_ties); the others merge each tensor whole. Does not change the result.
    Returns:
      `{"out": path, "num_tensors", "bytes_read", "bytes_written"}`.
    Raises:
      ValueError: as `api.merge`, plus a tensor that differs between checkpoints, NaN/Inf in an input
        (naming tensor and checkpoint), a model whose vocabulary differs from the base's without
        `tokenizer_source` the base, weights that are NaN/Inf or sum to 0 under `normalize`, a config.json
        that disagrees with the weights (`check_against_config`), and an output path that cannot be
        written. Everything but a NaN/Inf in a tensor is found before anything is written; nothing is
        left at `out` on error.
    """
    models = list(models)
    check_merge_call(method, models, key, has_base=base is not None)
    check_weights_arg(method, weights, len(models))
    check_output_options(tokenizer_source, max_shard_bytes)
    t = hparams.get("t")
    kernel = make_kernel(method, len(models), **hparams)
    per_leaf_weights = [t] if method == "slerp" else weights
    out_dtype = dtype_from_name(dtype) if dtype else None
    if key is None:
        key = jax.random.key(0)  # unused by the deterministic methods

    inputs = [Checkpoint(p) for p in models]
    reference = Checkpoint(base) if base is not None else inputs[0]
    tmp = None
    try:
        align = tokenizer_source is not None and os.path.realpath(tokenizer_source) == os.path.realpath(
            reference.path
        )
        row_maps = vocab_maps(reference, inputs, align)
        _check_same_architecture(reference, inputs, row_maps)
        names = reference.names
        entries = [
            (name, output_dtype(reference.dtype(name), out_dtype), reference.shape(name)) for name in names
        ]
        what = "t" if method == "slerp" else "weights"
        leaf_ws = {}  # every tensor's per-model weights, checked before anything is written
        for name, _, shape in entries:
            if is_float(reference.dtype(name)):
                w = leaf_weights(
                    _weights_for(per_leaf_weights, name), name, shape, len(models), group_fn, what
                )
                check_leaf_weights(w, name, what, kernel.divides_by_weights)
                leaf_ws[name] = w
        source = base if base is not None else models[0]
        check_against_config(source, {}, entries)
        tmp = atomic_output(out, overwrite)
        bytes_read = 0
        bar = tqdm.tqdm(total=len(names), desc=f"merge {method}", unit="tensor", disable=not progress)
        index = {name: i for i, name in enumerate(names)}
        workspace: dict[str, np.ndarray] = {}

        def merged_tensor(name: str, dtype_out: np.dtype) -> np.ndarray:
            nonlocal bytes_read
            base_arr = reference.get(name)
            arrays = [ckpt.get(name) for ckpt in inputs]
            bytes_read += base_arr.nbytes * (base is not None) + sum(a.nbytes for a in arrays)
            if is_token_table(name):  # onto the base's token ids (`tokenizer_source: base`)
                arrays = [
                    a if m is None else rows_onto(a, m, base_arr)
                    for a, m in zip(arrays, row_maps, strict=True)
                ]
            if not is_float(base_arr.dtype):
                return base_arr
            leaf_w = leaf_ws[name]
            leaf_key = jax.random.fold_in(key, index[name])
            if method in chunked.CHUNKED_METHODS:
                merged, bad = chunked.merge_chunked(
                    kernel, dtype_out, leaf_key, base_arr, arrays, leaf_w, chunk_elements, workspace
                )
            else:
                merged, bad = api.merge_tensor(
                    kernel, np.dtype(dtype_out), False, leaf_key, base_arr, arrays, leaf_w
                )
                bad = np.asarray(bad)
            if bad.any():
                which = int(np.argmax(bad))
                culprit = reference.path if which == 0 else inputs[which - 1].path
                arr = base_arr if which == 0 else arrays[which - 1]
                kind = "NaN" if np.isnan(arr.astype(np.float32)).any() else "Inf"
                raise ValueError(f"{kind} in checkpoint {culprit!r} at tensor {name!r}")
            return np.asarray(merged)

        bytes_written = write_shards(tmp, entries, max_shard_bytes, merged_tensor, lambda: bar.update(1))
        bar.close()
        copy_side_files(tmp, source, tokenizer_source or source, dtype)
        commit_output(tmp, out, overwrite)
        tmp = None
    finally:
        for ckpt in [reference, *inputs]:
            ckpt.close()
        if tmp is not None:
            atomic.discard(tmp)
    return {
        "out": os.path.abspath(out),
        "num_tensors": len(names),
        "bytes_read": bytes_read,
        "bytes_written": bytes_written,
    }


def _weights_for(weights: Sequence[Any] | None, name: str) -> Sequence[Any] | None:
    """Per-model weight specs of tensor `name`: functions of the name (mergekit settings) are evaluated."""
    if weights is None:
        return None
    return [w(name) if callable(w) else w for w in weights]
