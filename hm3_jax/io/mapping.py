"""Hugging Face (PyTorch-named) tensors <-> our stacked param layout, tensor by tensor.

A family's mapping is a list of `Entry`s. Each names one HF tensor (with `{l}` for the block index when the
entry is per block), the leaf (or leaves) of our params it feeds, and a `Kind` that converts between the two
orientations:

| kind       | HF layout                       | ours              | used for                             |
| ---------- | ------------------------------- | ----------------- | ------------------------------------ |
| `copy`     | same                            | same              | norms, biases, embeddings, Conv1D    |
| `linear`   | `nn.Linear.weight` [out, in]    | kernel [in, out]  | every projection except GPT-2's      |
| `patch`    | `nn.Conv2d.weight` [D, C, p, p] | kernel [p*p*C, D] | ViT patch embedding                  |
| `leading1` | [1, ..., N, D]                  | [N, D] (or [D])   | ViT `cls_token`, position embeddings |

An entry with several leaves splits the HF tensor into equal parts along the last axis of our orientation
(GPT-2's fused `c_attn` [D, 3D] -> q, k, v when ours are separate) and concatenates them back when saving.

Our expected shapes come from `jax.eval_shape` of the family's `init` (no memory), so every HF tensor's
shape is checked against the config before it is used; a mismatch raises an error that names the tensor.
Loading fills one preallocated numpy buffer per leaf (block leaves `[L, ...]` are filled slice by slice) and
moves it to a device array as soon as it is complete, so peak host memory is the model plus one leaf, never
two copies.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections.abc import Callable, Iterator

import jax
import ml_dtypes
import numpy as np

from hm3_jax import models
from hm3_jax.io.safetensors_io import CheckpointError, TensorReader
from hm3_jax.models.config import ModelConfig

log = logging.getLogger(__name__)

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor <-> one or more of our leaves.

    hf: HF tensor name, `{l}` stands for the block index (then every leaf is under "blocks").
    leaves: our leaf paths, e.g. `("blocks", "q", "kernel")`; several = split along our last axis.
    kind: "copy", "linear", "patch" or "leading1".
    """

    hf: str
    leaves: tuple[Path, ...]
    kind: str = "copy"

    @property
    def per_block(self) -> bool:
        return "{l}" in self.hf


def _leaf(path: str) -> Path:
    return tuple(path.split("/"))


def _e(hf: str, *leaves: str, kind: str = "copy") -> Entry:
    return Entry(hf, tuple(_leaf(x) for x in leaves), kind)


# ----------------------------------------------------------------------------------------------------
# Orientation conversions (HF -> ours and back); `*_shape` give the HF shape of an array of our shape.


def _to_ours(kind: str, x: np.ndarray, ours_shape: tuple[int, ...]) -> np.ndarray:
    if kind == "copy":
        return x
    if kind == "linear":
        return x.T
    if kind == "patch":
        if len(ours_shape) == 4:  # [D, C, p, p] -> [p, p, C, D] (flax/lax conv layout)
            return x.transpose(2, 3, 1, 0)
        # [D, C, p, p] -> [p*p*C, D], flattened in (patch row, column, channel) order as hm3_jax.models.vit
        return x.transpose(2, 3, 1, 0).reshape(-1, x.shape[0])
    if kind == "leading1":
        return x.reshape(ours_shape)
    raise ValueError(f"unknown mapping kind {kind!r}")


def _to_hf(kind: str, x: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
    if kind == "copy":
        return x
    if kind == "linear":
        return x.T
    if kind == "patch":
        if x.ndim == 4:
            return x.transpose(3, 2, 0, 1)
        d, c, p, _ = hf_shape
        return x.reshape(p, p, c, d).transpose(3, 2, 0, 1)
    if kind == "leading1":
        return x.reshape(hf_shape)
    raise ValueError(f"unknown mapping kind {kind!r}")


def _hf_shape(kind: str, ours_shape: tuple[int, ...], config: ModelConfig) -> tuple[int, ...]:
    if kind == "copy":
        return ours_shape
    if kind == "linear":
        return tuple(reversed(ours_shape))
    if kind == "patch":
        p = config.patch_size
        return (ours_shape[-1], config.num_channels, p, p)
    if kind == "leading1":
        return (1,) * (3 - len(ours_shape)) + ours_shape
    raise ValueError(f"unknown mapping kind {kind!r}")


# ----------------------------------------------------------------------------------------------------
# Family tables. Canonical names are those of the architecture's full model (e.g. LlamaForCausalLM);
# `base_prefix` is what a checkpoint of the bare base model (LlamaModel, GPT2Model, ViTModel) lacks.


@dataclasses.dataclass(frozen=True)
class FamilyMapping:
    entries: tuple[Entry, ...]
    base_prefix: str  # e.g. "model." -- dropped or added to find a tensor saved by the base/head class
    ignored: tuple[str, ...] = ()  # regexes of HF tensors that hold no parameters we use (buffers, pooler)
    tied: tuple[str, ...] = ()  # HF names that duplicate another tensor when embeddings are tied


def _llama(config: ModelConfig) -> FamilyMapping:
    pre = "model.layers.{l}."
    entries = [
        _e("model.embed_tokens.weight", "embed/embedding"),
        _e(pre + "input_layernorm.weight", "blocks/attn_norm/scale"),
        _e(pre + "post_attention_layernorm.weight", "blocks/mlp_norm/scale"),
        _e("model.norm.weight", "final/norm/scale"),
    ]
    for ours, hf in (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj")):
        entries.append(_e(pre + hf + ".weight", f"blocks/{ours}/kernel", kind="linear"))
        if config.attention_bias:
            entries.append(_e(pre + hf + ".bias", f"blocks/{ours}/bias"))
    entries.append(_e(pre + "self_attn.o_proj.weight", "blocks/o/kernel", kind="linear"))
    if config.attention_out_bias:
        entries.append(_e(pre + "self_attn.o_proj.bias", "blocks/o/bias"))
    for ours in ("gate", "up", "down"):
        entries.append(_e(pre + f"mlp.{ours}_proj.weight", f"blocks/{ours}/kernel", kind="linear"))
        if config.mlp_bias:
            entries.append(_e(pre + f"mlp.{ours}_proj.bias", f"blocks/{ours}/bias"))
    tied = ()
    if config.tie_word_embeddings:
        tied = ("lm_head.weight",)
    else:
        entries.append(_e("lm_head.weight", "head/kernel", kind="linear"))
    return FamilyMapping(tuple(entries), "model.", ignored=(r".*rotary_emb\.inv_freq$",), tied=tied)


def _pick(shapes: dict, *candidates: str, leaf: bool = False) -> str:
    """The first of `candidates` (paths like "blocks/fc") that exists in our params (and is a leaf if asked).

    The GPT-2 and ViT tables accept a few spellings of the same slot, so the mapping follows the model
    modules' names; `_check_covers` still requires every leaf of our params to be mapped exactly once.
    """
    for cand in candidates:
        try:
            node = _get(shapes, _leaf(cand))
        except (KeyError, TypeError):
            continue
        if not leaf or not isinstance(node, dict):
            return cand
    raise AssertionError(f"internal: none of {candidates} in the family's params")


def _dense_entries(hf: str, ours: str, kind: str, bias: bool = True) -> list[Entry]:
    out = [_e(hf + ".weight", ours + "/kernel", kind=kind)]
    if bias:
        out.append(_e(hf + ".bias", ours + "/bias"))
    return out


def _norm_entries(hf: str, ours: str) -> list[Entry]:
    return [_e(hf + ".weight", ours + "/scale"), _e(hf + ".bias", ours + "/bias")]


def _gpt2(config: ModelConfig) -> FamilyMapping:
    shapes = param_shapes(config, np.float32)
    pre = "transformer.h.{l}."
    entries = [
        _e("transformer.wte.weight", "embed/embedding"),
        _e(
            "transformer.wpe.weight",
            _pick(shapes, "embed/position/embedding", "embed/position", "embed/wpe", leaf=True),
        ),
    ]
    entries += _norm_entries(pre + "ln_1", _pick(shapes, "blocks/attn_norm", "blocks/ln_1"))
    # HF's Conv1D is [in, out] already: a plain copy. c_attn fuses q|k|v along its output axis.
    if _has(shapes, "blocks/qkv"):
        entries += _dense_entries(pre + "attn.c_attn", "blocks/qkv", "copy")
    else:
        entries.append(
            _e(pre + "attn.c_attn.weight", "blocks/q/kernel", "blocks/k/kernel", "blocks/v/kernel")
        )
        entries.append(_e(pre + "attn.c_attn.bias", "blocks/q/bias", "blocks/k/bias", "blocks/v/bias"))
    entries += _dense_entries(pre + "attn.c_proj", _pick(shapes, "blocks/o", "blocks/attn_proj"), "copy")
    entries += _norm_entries(pre + "ln_2", _pick(shapes, "blocks/mlp_norm", "blocks/ln_2"))
    entries += _dense_entries(
        pre + "mlp.c_fc", _pick(shapes, "blocks/up", "blocks/fc", "blocks/mlp_in"), "copy"
    )
    entries += _dense_entries(
        pre + "mlp.c_proj", _pick(shapes, "blocks/down", "blocks/proj", "blocks/mlp_out"), "copy"
    )
    entries += _norm_entries("transformer.ln_f", _pick(shapes, "final/norm", "final/ln_f"))
    return FamilyMapping(
        tuple(entries),
        "transformer.",
        ignored=(r".*\.attn\.bias$", r".*\.attn\.masked_bias$"),
        tied=("lm_head.weight",),
    )


def _vit(config: ModelConfig) -> FamilyMapping:
    shapes = param_shapes(config, np.float32)
    pre = "vit.encoder.layer.{l}."
    patch = _pick(shapes, "embed/patch", "embed/patch_embedding", "embed/projection")
    entries = [
        _e("vit.embeddings.cls_token", _pick(shapes, "embed/cls_token", "embed/cls"), kind="leading1"),
        _e(
            "vit.embeddings.position_embeddings",
            _pick(shapes, "embed/position_embeddings", "embed/position", "embed/pos"),
            kind="leading1",
        ),
        _e("vit.embeddings.patch_embeddings.projection.weight", patch + "/kernel", kind="patch"),
        _e("vit.embeddings.patch_embeddings.projection.bias", patch + "/bias"),
    ]
    entries += _norm_entries(pre + "layernorm_before", _pick(shapes, "blocks/attn_norm", "blocks/norm1"))
    for ours, hf in (("q", "query"), ("k", "key"), ("v", "value")):
        entries += _dense_entries(
            pre + f"attention.attention.{hf}", f"blocks/{ours}", "linear", config.attention_bias
        )
    entries += _dense_entries(pre + "attention.output.dense", "blocks/o", "linear")
    entries += _norm_entries(pre + "layernorm_after", _pick(shapes, "blocks/mlp_norm", "blocks/norm2"))
    entries += _dense_entries(
        pre + "intermediate.dense", _pick(shapes, "blocks/up", "blocks/fc", "blocks/mlp_in"), "linear"
    )
    entries += _dense_entries(
        pre + "output.dense", _pick(shapes, "blocks/down", "blocks/proj", "blocks/mlp_out"), "linear"
    )
    entries += _norm_entries("vit.layernorm", _pick(shapes, "final/norm", "final/layernorm"))
    if config.num_labels > 0:
        entries += _dense_entries("classifier", _pick(shapes, "head", "head/classifier"), "linear")
    return FamilyMapping(tuple(entries), "vit.", ignored=(r"(vit\.)?pooler\..*",))


def _has(shapes: dict, path: str) -> bool:
    try:
        _get(shapes, _leaf(path))
        return True
    except KeyError:
        return False


_FAMILIES: dict[str, Callable[[ModelConfig], FamilyMapping]] = {"llama": _llama, "gpt2": _gpt2, "vit": _vit}


def family_mapping(config: ModelConfig) -> FamilyMapping:
    """The HF <-> ours mapping for `config` (which tensors exist depends on biases and tying)."""
    if config.family not in _FAMILIES:
        raise NotImplementedError(f"no Hugging Face mapping for family {config.family!r} yet")
    return _FAMILIES[config.family](config)


def _names(entry: Entry, num_layers: int) -> list[str]:
    return [entry.hf.format(l=l) for l in range(num_layers)] if entry.per_block else [entry.hf]


def _get(tree: dict, path: Path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: Path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def param_shapes(config: ModelConfig, dtype) -> dict:
    """Our params' `ShapeDtypeStruct` tree for `config`, from the family's `init` under `jax.eval_shape`."""
    return _param_shapes(config, np.dtype(dtype).name)


@functools.lru_cache(maxsize=64)
def _param_shapes(config: ModelConfig, dtype_name: str) -> dict:
    dtype = ml_dtypes.bfloat16 if dtype_name == "bfloat16" else np.dtype(dtype_name)
    return jax.eval_shape(lambda key: models.init(config, key, dtype=dtype), jax.random.key(0))


def _leaf_paths(tree: dict, prefix: Path = ()) -> list[Path]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out.extend(_leaf_paths(value, prefix + (key,)))
        else:
            out.append(prefix + (key,))
    return out


def _check_covers(mapping: FamilyMapping, shapes: dict, config: ModelConfig) -> None:
    mapped = {leaf for entry in mapping.entries for leaf in entry.leaves}
    ours = set(_leaf_paths(shapes))
    if mapped != ours:
        raise AssertionError(
            f"internal: HF mapping of family {config.family!r} does not match its params: "
            f"unmapped leaves {sorted(ours - mapped)}, unknown leaves {sorted(mapped - ours)}"
        )


def _entry_hf_shape(entry: Entry, shapes: dict, config: ModelConfig) -> tuple[int, ...]:
    """HF shape of one tensor of `entry` (per block: without the L axis)."""
    parts = []
    for leaf in entry.leaves:
        shape = tuple(_get(shapes, leaf).shape)
        parts.append(shape[1:] if entry.per_block else shape)
    ours = parts[0][:-1] + (sum(p[-1] for p in parts),)
    return _hf_shape(entry.kind, ours, config)


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
    _check_covers(mapping, shapes, config)
    _check_tensors(mapping, shapes, config, names, shape_fn)


def _check_tensors(mapping, shapes, config, names, shape_fn) -> dict[tuple[int, int], str]:
    """`check_tensors` on a resolved mapping; returns `{(entry index, block): stored name}`."""
    resolve = _Resolver(names, mapping.base_prefix)
    num_layers = config.num_layers
    stored: dict[tuple[int, int], str] = {}
    missing = []
    for i, entry in enumerate(mapping.entries):
        expected = _entry_hf_shape(entry, shapes, config)
        for l, name in enumerate(_names(entry, num_layers)):
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


def load_params(config: ModelConfig, reader: TensorReader, dtype, progress=None) -> dict:
    """Reads every tensor our layout needs from `reader` into a params tree of `dtype`.

    Args:
      config: the model config (from `config.json`).
      reader: an open `TensorReader` over the checkpoint's safetensors files.
      dtype: float32 or bfloat16; every leaf is cast to it.
      progress: optional wrapper over the entry iterator (e.g. tqdm).
    Returns:
      params `{"embed", "blocks", "final", "head"}` of device arrays.
    Raises:
      CheckpointError naming the tensor when one is missing, its shape disagrees with the config or it holds
      NaN/Inf (with its file), and listing tensors the checkpoint holds that the architecture does not use.
    """
    mapping = family_mapping(config)
    np_dtype = (
        np.dtype(ml_dtypes.bfloat16) if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16) else np.dtype(dtype)
    )
    shapes = param_shapes(config, np_dtype)
    _check_covers(mapping, shapes, config)
    # Names and shapes of everything first (headers only), so a bad checkpoint fails before any copy.
    stored = _check_tensors(mapping, shapes, config, reader.names(), reader.shape)
    num_layers = config.num_layers

    params: dict = {}
    entries: Iterator = iter(enumerate(mapping.entries))
    if progress is not None:
        entries = progress(entries)
    for i, entry in entries:
        if not entry.per_block and len(entry.leaves) == 1:
            # A whole leaf in one tensor (embeddings, head): cast the read array itself, no second buffer.
            leaf_shape = tuple(_get(shapes, entry.leaves[0]).shape)
            x = _to_ours(entry.kind, reader.get(stored[(i, 0)]), leaf_shape).astype(np_dtype, copy=False)
            _set(params, entry.leaves[0], jax.device_put(np.ascontiguousarray(x)))
            del x
            continue
        buffers = [np.empty(_get(shapes, leaf).shape, np_dtype) for leaf in entry.leaves]
        sizes = [b.shape[-1] for b in buffers]
        for l in range(num_layers if entry.per_block else 1):
            name = stored[(i, l)]
            x = _to_ours(entry.kind, reader.get(name), _ours_joined_shape(buffers, entry.per_block))
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
            _set(params, leaf, jax.device_put(buf))
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


def hf_tensor_specs(
    config: ModelConfig, params: dict, prefix_base: bool = True
) -> list[tuple[str, tuple, np.dtype]]:
    """`(hf_name, hf_shape, dtype)` of every tensor `params` saves to, in a stable order (blocks by index).

    Raises a ValueError naming the leaf when `params` does not match `config`'s layout (missing leaf, wrong
    shape, mixed dtypes within a split entry).
    """
    mapping = family_mapping(config)
    expected = param_shapes(config, np.float32)
    _check_covers(mapping, expected, config)
    for leaf in _leaf_paths(expected):
        try:
            value = _get(params, leaf)
        except (KeyError, TypeError):
            raise ValueError(f"params have no leaf {'/'.join(leaf)}, which config requires") from None
        if tuple(value.shape) != tuple(_get(expected, leaf).shape):
            raise ValueError(
                f"params leaf {'/'.join(leaf)} has shape {tuple(value.shape)}, config implies "
                f"{tuple(_get(expected, leaf).shape)}"
            )
    # Order as PyTorch's state_dict: embeddings, blocks 0..L-1, then final norm and head; entries of a family
    # table list the embeddings first.
    globals_ = [e for e in mapping.entries if not e.per_block]
    blocks = [e for e in mapping.entries if e.per_block]
    first = [e for e in globals_ if e.leaves[0][0] == "embed"]
    last = [e for e in globals_ if e.leaves[0][0] != "embed"]
    specs = [_spec(e, None, params, expected, config, mapping, prefix_base) for e in first]
    for l in range(config.num_layers):
        specs.extend(_spec(e, l, params, expected, config, mapping, prefix_base) for e in blocks)
    specs.extend(_spec(e, None, params, expected, config, mapping, prefix_base) for e in last)
    return specs


def _spec(entry, l, params, expected, config, mapping, prefix_base):
    name = entry.hf if l is None else entry.hf.format(l=l)
    if not prefix_base and name.startswith(mapping.base_prefix):
        name = name[len(mapping.base_prefix) :]
    dtypes = {np.dtype(_get(params, leaf).dtype) for leaf in entry.leaves}
    if len(dtypes) != 1:
        raise ValueError(f"leaves {entry.leaves} that form HF tensor {name} have different dtypes {dtypes}")
    return (name, _entry_hf_shape(entry, expected, config), dtypes.pop())


def hf_tensor_fn(config: ModelConfig, params: dict, prefix_base: bool = True) -> Callable[[str], np.ndarray]:
    """`hf_name -> np.ndarray` in HF layout, built lazily from `params` (one tensor at a time)."""
    mapping = family_mapping(config)
    expected = param_shapes(config, np.float32)
    lookup = {}
    for entry in mapping.entries:
        for l, name in enumerate(_names(entry, config.num_layers)):
            if not prefix_base and name.startswith(mapping.base_prefix):
                name = name[len(mapping.base_prefix) :]
            lookup[name] = (entry, l if entry.per_block else None)

    def tensor_fn(name: str) -> np.ndarray:
        entry, l = lookup[name]
        parts = []
        for leaf in entry.leaves:
            value = _get(params, leaf)
            parts.append(np.asarray(value[l] if l is not None else value))
        joined = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
        return _to_hf(entry.kind, joined, _entry_hf_shape(entry, expected, config))

    return tensor_fn
