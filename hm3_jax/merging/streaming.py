"""Streaming merges of Hugging Face checkpoints: tensor by tensor, bounded memory, atomic output directory.

`merge_checkpoints` reads one tensor of every input lazily (safetensors `safe_open`, numpy), merges it with
the same kernels and per-leaf weight rules as the in-memory `merge` (`api.py`), and appends it to an output
shard whose header was written up front (`safetensors_stream.ShardWriter`), so peak memory is a few tensors,
never a model. The elementwise methods (`chunked.CHUNKED_METHODS`: linear, task_arithmetic, ties, dare_linear,
dare_ties) run on flat chunks of `chunk_elements` (`chunked.merge_chunked`): DARE's survivors are drawn for the whole
tensor with the in-memory kernel's key and shape, TIES' exact top-k cut (k-th largest magnitude and the tie
index, `kernels.host_topk_threshold`, numpy) is computed on the host before the chunks, so the kept set is
the in-memory radix select's and the output is bitwise the in-memory merge's. slerp, consensus and pcb
(whole-tensor norms and masks) merge each tensor whole with `api.merge_tensor`. Everything is written into a temporary sibling directory that is renamed to
`out` only when the merge is complete; on any error it is deleted, so an interrupted merge never leaves a
directory that looks done.

Tensor names are Hugging Face's (no conversion to the stacked layout). Per-block weights use the layer index
in the name (`model.layers.3.`, `h.3.`, `encoder.layer.3.`, see `groups.layer_index`); tensors without one
(embeddings, final norm, head) get the mean of a per-block vector. A weight may also be a function of the
tensor name (`name -> number or [L] vector`), which is how mergekit's filters and gradients arrive from a YAML
config (`mergekit_config.TensorSetting`). Tensors outside the blocks sit at one end of the model
(`shell_end`): "pre" (embeddings, before block 0) or "post" (final norm and head, after the last block). Tensor `i` in sorted-name order draws its
DARE masks from `fold_in(key, i)`, exactly as `merge` does on the flat `{name: array}` dict, so the
streaming and the in-memory merge give identical tensors.

Vocabularies: a model whose tokenizer differs from the base's (added tokens, other ids) is refused, naming it and
`tokenizer_source: base`. With `tokenizer_source` the base's own directory (the YAML's `tokenizer_source: base`),
its token tables (`is_token_table`: input embeddings and LM heads, `[V, D]` rows indexed by token id) are
re-indexed onto the base's ids before merging, as `hm3_jax.io.vocab.align_to_base_vocab` does on params:

    row_b = model_row[model_id(token(b))]  if the model has token(b),  else  base_row[b]

(`vocab.source_rows`), so every input has the base's row count and the output the base's `vocab_size`."""

from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import tqdm
from absl import logging

from hm3_jax.io import atomic, hf_config, param_load, vocab
from hm3_jax.merging import api, chunked
from hm3_jax.merging.groups import GroupFn, check_leaf_weights, default_param_group, layer_index, leaf_weights
from hm3_jax.merging.safetensors_stream import (
    Checkpoint,
    ShardWriter,
    dtype_from_name,
    plan_shards,
    shard_file_names,
    write_index,
)

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "vocab.txt",
)
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
DEFAULT_CHUNK_ELEMENTS = chunked.DEFAULT_CHUNK_ELEMENTS


# HF names of tables indexed by token id (`<...>.<part>.weight`, [V, D]): input embeddings and LM heads
_TOKEN_TABLE_PARTS = frozenset(
    {"embed_tokens", "lm_head", "wte", "embed_out", "word_embeddings", "tok_embeddings"}
)
_HEAD_PARTS = frozenset({"lm_head", "embed_out", "head", "classifier", "score", "pooler"})
_PRE_MARKERS = ("embed", "wte", "wpe", "cls_token", "mask_token")
_NAME_SPLIT = re.compile(r"[./]+")


def shell_end(name: str) -> str:
    """Which end of the model a tensor outside the blocks belongs to: `"pre"` or `"post"`.

    mergekit's architectures list them as `pre_weights` (embeddings: `model.embed_tokens`, `wte`, `wpe`,
    ViT's `embeddings.*`) and `post_weights` (final norm and head: `model.norm`, `ln_f`, `lm_head`,
    `classifier`); a passthrough merge takes the pre weights from the first slice's model and the post weights
    from the last slice's, and a gradient is evaluated at `t = 0` for pre and `t = 1` for post weights. Here:
    a name with a head-like part (`lm_head`, `embed_out`, `head`, `classifier`, `score`, `pooler`) is post,
    else a name with a part containing `embed`, `wte`, `wpe`, `cls_token` or `mask_token` is pre, else post.
    """
    parts = [p for p in _NAME_SPLIT.split(name.lower()) if p]
    if any(p in _HEAD_PARTS for p in parts):
        return "post"
    if any(m in p for p in parts for m in _PRE_MARKERS):
        return "pre"
    return "post"


def is_token_table(name: str) -> bool:
    """Whether HF tensor `name` has one row per token id (`model.embed_tokens.weight`, `lm_head.weight`,
    GPT-2's `transformer.wte.weight`, ...): a `.weight` outside the blocks whose module is a token table."""
    parts = name.split(".")
    return (
        layer_index(name) is None
        and len(parts) >= 2
        and parts[-1] == "weight"
        and parts[-2] in _TOKEN_TABLE_PARTS
    )


def _has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, n)) for n in TOKENIZER_FILES)


def _same_tokenizer_files(a: str, b: str) -> bool:
    """Both directories hold the same tokenizer files with the same bytes (then the vocabularies are equal)."""
    for name in TOKENIZER_FILES:
        fa, fb = os.path.join(a, name), os.path.join(b, name)
        if os.path.isfile(fa) != os.path.isfile(fb):
            return False
        if os.path.isfile(fa) and not filecmp.cmp(fa, fb, shallow=False):
            return False
    return True


def _vocab_maps(reference: Checkpoint, inputs: Sequence[Checkpoint], align: bool) -> list:
    """Per input, None when its token rows already line up with the reference's token ids, else
    `(reference vocab, its vocab)` (`vocab.vocab_of`) for `_rows_onto`.

    Vocabularies are compared only when both directories hold tokenizer files (else the shape check speaks);
    equal tokenizer files and row counts are the same vocabulary without loading them. A different vocabulary
    without `align` is a ValueError naming the model and `tokenizer_source: base` (`vocab.check_same_vocab`).
    """
    tables = [n for n in reference.names if is_token_table(n)]
    ref_vocab, out = None, []
    for ckpt in inputs:
        rows_differ = any(n in ckpt.names and ckpt.shape(n)[0] != reference.shape(n)[0] for n in tables)
        if (
            not tables
            or not (_has_tokenizer(reference.path) and _has_tokenizer(ckpt.path))
            or (not rows_differ and _same_tokenizer_files(reference.path, ckpt.path))
        ):
            out.append(None)
            continue
        if not align:
            name = os.path.basename(os.path.normpath(ckpt.path))
            try:
                vocab.check_same_vocab(reference.path, ckpt.path, name)
            except ValueError as err:
                raise ValueError(
                    f"{err} (streaming.merge_checkpoints: tokenizer_source=<the base directory>; "
                    "experiments.merge: `tokenizer_source: base` in the YAML or --tokenizer_source=<base dir>)"
                ) from None
            out.append(None)
            continue
        if ref_vocab is None:
            ref_vocab = vocab.vocab_of(reference.path)
        model_vocab = vocab.vocab_of(ckpt.path)
        out.append(None if model_vocab == ref_vocab and not rows_differ else (ref_vocab, model_vocab))
        if out[-1] is not None:
            logging.info(
                "tokenizer_source base: %s's token rows mapped onto %s's ids (%d tokens only it has, dropped)",
                ckpt.path, reference.path, len(set(model_vocab) - set(ref_vocab)),
            )  # fmt: skip
    return out


def _rows_onto(rows: np.ndarray, vocabs: tuple, reference_rows: np.ndarray) -> np.ndarray:
    """A model's token table `rows` [V_m, D] re-indexed onto the reference's ids: [V_b, D] whose row b is
    `rows[src[b]]`, or `reference_rows[b]` where `src[b] = -1` (`src = vocab.source_rows`)."""
    ref_vocab, model_vocab = vocabs
    src = vocab.source_rows(ref_vocab, model_vocab, reference_rows.shape[0], rows.shape[0])  # [V_b]
    out = np.asarray(rows)[np.maximum(src, 0)]
    missing = src < 0
    out[missing] = np.asarray(reference_rows)[missing].astype(out.dtype)
    return out


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or np.dtype(dtype).name == "bfloat16"


def _atomic_output(out: str, overwrite: bool) -> str:
    """The temporary sibling directory of `out` the merge writes into (`_finish` renames it to `out`).

    Raises FileExistsError (`out` exists without `overwrite`) or ValueError naming `out` and why it cannot be
    written (a read-only directory, a path below a file), before anything is written."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"output directory {out!r} exists (pass overwrite=True / --overwrite)")
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        return atomic.make_temp_dir(out)
    except OSError as e:
        raise ValueError(
            f"output directory {out!r} cannot be written: {_why_unwritable(parent, e)}"
        ) from None


def _why_unwritable(directory: str, err: OSError) -> str:
    """Why `directory` cannot hold a new directory, naming the path at fault (not a temp file's name)."""
    existing = directory
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing!r} is a file, not a directory"
    if not os.access(existing, os.W_OK):
        return f"no permission to write in {existing!r}"
    return err.strerror or str(err)


def _finish(tmp: str, out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"output directory {os.path.abspath(out)!r} appeared during the merge")
    atomic.commit_directory(tmp, out, overwrite)


def _copy_side_files(
    tmp: str, config_source: str, tokenizer_source: str, dtype_name: str | None, updates=None
):
    """config.json (with `torch_dtype` and `updates` applied) and tokenizer files, without remote-code keys.

    `hf_config.NEVER_WRITTEN_KEYS` (`auto_map`, `trust_remote_code`, ...) would make transformers import code
    shipped with the source checkpoint, which the merged weights do not come with and nobody reviewed, so a
    merge never writes them (from config.json or tokenizer_config.json)."""
    changes = {**({"torch_dtype": dtype_name} if dtype_name else {}), **(updates or {})}
    for name in CONFIG_FILES:
        src = os.path.join(config_source, name)
        if os.path.isfile(src):
            _copy_side_file(src, os.path.join(tmp, name), changes if name == "config.json" else {})
    for name in TOKENIZER_FILES:
        src = os.path.join(tokenizer_source, name)
        if os.path.isfile(src):
            _copy_side_file(src, os.path.join(tmp, name), {})


def _copy_side_file(src: str, dst: str, changes: dict) -> None:
    """Copies `src` to `dst`; a JSON config (`*config.json`) is rewritten with `changes` and without
    `hf_config.NEVER_WRITTEN_KEYS` when either applies (a tokenizer config that is not JSON is copied as is)."""
    config, dropped = None, []
    if src.endswith("config.json"):
        try:
            with open(src) as f:
                config, dropped = hf_config.without_remote_code(json.load(f))
        except (ValueError, AttributeError):  # not JSON, or not an object
            config = None
    if config is None or not (dropped or changes):
        shutil.copy2(src, dst)
        return
    if dropped:
        logging.warning(
            "%s: %s dropped from the merged %s (remote code)", src, dropped, os.path.basename(src)
        )
    with open(dst, "w") as f:
        json.dump({**config, **changes}, f, indent=2)


def _check_same_architecture(reference: Checkpoint, others: Sequence[Checkpoint], vocab_maps=None) -> None:
    """Same tensor names and shapes; token tables of inputs mapped onto the reference's ids (`vocab_maps[k]`
    not None) need only the same row width."""
    for k, ckpt in enumerate(others):
        mapped = vocab_maps is not None and vocab_maps[k] is not None
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
        that disagrees with the weights (`_check_against_config`), and an output path that cannot be
        written. Everything but a NaN/Inf in a tensor is found before anything is written; nothing is
        left at `out` on error.
    """
    if method not in api.METHODS:
        raise ValueError(f"unknown merge method {method!r}; known methods: {', '.join(api.known_methods())}")
    models = list(models)
    if not models:
        raise ValueError(f"{method}: the list of models to merge is empty")
    if method in api.RANDOM_METHODS and key is None:
        raise ValueError(f"{method} draws random drop masks: pass an explicit PRNG key")
    if base is None and method != "linear":
        raise ValueError(f"{method} needs a base model (only linear works without one)")
    if method == "slerp" and weights is not None:
        raise ValueError("slerp takes its interpolation factor as t=..., not weights")
    if weights is not None and len(weights) != len(models):
        raise ValueError(f"weights: got {len(weights)} values for {len(models)} models")
    _check_output_options(tokenizer_source, max_shard_bytes)
    t = hparams.get("t")
    kernel = api.make_kernel(method, len(models), **hparams)
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
        vocab_maps = _vocab_maps(reference, inputs, align)
        _check_same_architecture(reference, inputs, vocab_maps)
        names = reference.names
        entries = []
        for name in names:
            src_dtype = reference.dtype(name)
            floating = _is_float(src_dtype)
            entries.append(
                (
                    name,
                    out_dtype if (out_dtype is not None and floating) else src_dtype,
                    reference.shape(name),
                )
            )
        what = "t" if method == "slerp" else "weights"
        leaf_ws = {}  # every tensor's per-model weights, checked before anything is written
        for name, _, shape in entries:
            if _is_float(reference.dtype(name)):
                w = leaf_weights(
                    _weights_for(per_leaf_weights, name), name, shape, len(models), group_fn, what
                )
                check_leaf_weights(w, name, what, kernel.divides_by_weights)
                leaf_ws[name] = w
        source = base if base is not None else models[0]
        _check_against_config(source, {}, entries)
        shards = plan_shards(entries, max_shard_bytes)
        files = shard_file_names(len(shards))
        tmp = _atomic_output(out, overwrite)
        bytes_read = bytes_written = 0
        bar = tqdm.tqdm(total=len(names), desc=f"merge {method}", unit="tensor", disable=not progress)
        index = {name: i for i, name in enumerate(names)}
        workspace: dict[str, np.ndarray] = {}
        for shard, file in zip(shards, files, strict=True):
            writer = ShardWriter(os.path.join(tmp, file), shard)
            for name, dtype_out, _ in shard:
                base_arr = reference.get(name)
                arrays = [ckpt.get(name) for ckpt in inputs]
                bytes_read += base_arr.nbytes * (base is not None) + sum(a.nbytes for a in arrays)
                if is_token_table(name):  # onto the base's token ids (`tokenizer_source: base`)
                    arrays = [
                        a if m is None else _rows_onto(a, m, base_arr)
                        for a, m in zip(arrays, vocab_maps, strict=True)
                    ]
                if not _is_float(base_arr.dtype):
                    merged = base_arr
                else:
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
                        source = reference.path if which == 0 else inputs[which - 1].path
                        arr = base_arr if which == 0 else arrays[which - 1]
                        kind = "NaN" if np.isnan(arr.astype(np.float32)).any() else "Inf"
                        raise ValueError(f"{kind} in checkpoint {source!r} at tensor {name!r}")
                    merged = np.asarray(merged)
                writer.write(name, merged)
                bytes_written += merged.nbytes
                bar.update(1)
            writer.close()
        bar.close()
        write_index(tmp, shards, files, bytes_written)
        _copy_side_files(tmp, source, tokenizer_source or source, dtype)
        _finish(tmp, out, overwrite)
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


def _check_output_options(tokenizer_source: str | None, max_shard_bytes: int) -> None:
    """A `tokenizer_source` that is not a directory, or a shard size below one byte, is a ValueError naming it
    (before anything is written; a missing tokenizer directory would otherwise give a merge without one)."""
    if tokenizer_source is not None and not os.path.isdir(tokenizer_source):
        raise ValueError(f"tokenizer_source {tokenizer_source!r} is not a directory")
    if max_shard_bytes < 1:
        raise ValueError(f"the shard size limit must be positive, got {max_shard_bytes} bytes")


def _weights_for(weights: Sequence[Any] | None, name: str) -> Sequence[Any] | None:
    """Per-model weight specs of tensor `name`: functions of the name (mergekit settings) are evaluated."""
    if weights is None:
        return None
    return [w(name) if callable(w) else w for w in weights]


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
    _check_output_options(tokenizer_source, max_shard_bytes)
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
        entries = []
        for out_name, source, in_name in plan:
            src_dtype = source.dtype(in_name)
            floating = _is_float(src_dtype)
            entries.append(
                (
                    out_name,
                    out_dtype if (out_dtype is not None and floating) else src_dtype,
                    source.shape(in_name),
                )
            )
        updates = _layer_count_updates(shell_dir, new_layer)
        _check_against_config(shell_dir, updates, entries)
        shards = plan_shards(entries, max_shard_bytes)
        files = shard_file_names(len(shards))
        tmp = _atomic_output(out, overwrite)
        lookup = {out_name: (source, in_name) for out_name, source, in_name in plan}
        bar = tqdm.tqdm(total=len(plan), desc="passthrough", unit="tensor", disable=not progress)
        total = 0
        for shard, file in zip(shards, files, strict=True):
            writer = ShardWriter(os.path.join(tmp, file), shard)
            for out_name, dtype_out, _ in shard:
                source, in_name = lookup[out_name]
                array = source.get(in_name)
                if _is_float(array.dtype) and not np.all(np.isfinite(array.astype(np.float32))):
                    raise ValueError(f"NaN or Inf in checkpoint {source.path!r} at tensor {in_name!r}")
                array = array.astype(dtype_out)
                writer.write(out_name, array)
                total += array.nbytes
                bar.update(1)
            writer.close()
        bar.close()
        write_index(tmp, shards, files, total)
        _copy_side_files(tmp, shell_dir, tokenizer_source or shell_dir, dtype, updates)
        _finish(tmp, out, overwrite)
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


def _check_against_config(config_source: str, updates: dict, entries: Sequence[tuple]) -> None:
    """The output's tensors (`entries`: `(name, dtype, shape)`) agree with the config.json it will carry
    (`config_source`'s, with `updates`), so the merged checkpoint loads (`load_pretrained` makes the same
    check). A config of an architecture hm3_jax does not model is not checked (the merge itself needs none).

    Raises:
      ValueError naming the config.json, the tensor and the config fields (e.g. hidden_size 48, tensors 32).
    """
    config_path = os.path.join(config_source, "config.json")
    if not os.path.isfile(config_path):
        return
    hf = hf_config.read_config_dict(config_path)
    hf, _ = hf_config.without_remote_code(hf)  # dropped from the output
    try:
        config = hf_config.config_from_hf_dict({**hf, **updates}, where=config_path)
    except ValueError as e:  # an architecture or feature we do not model: nothing to check against
        logging.info("%s: weights not checked against it (%s)", config_path, e)
        return
    shapes = {name: tuple(shape) for name, _, shape in entries}
    try:
        param_load.check_tensors(config, sorted(shapes), shapes.__getitem__)
    except ValueError as e:
        raise ValueError(f"{config_path} disagrees with the weights to be written: {e}") from None


def _rename_layer(name: str, old: int, new: int) -> str:
    """`model.layers.7.mlp...` -> `model.layers.2.mlp...` (only the layer-index occurrence)."""
    return re.sub(
        rf"(^|[./])(layers|layer|h|blocks|block)([./]){old}([./]|$)",
        lambda m: f"{m.group(1)}{m.group(2)}{m.group(3)}{new}{m.group(4)}",
        name,
        count=1,
    )
