"""Hugging Face (PyTorch-named) tensors <-> our stacked param layout: the family tables.

A family's mapping is a list of `Entry`s. Each names one HF tensor (with `{l}` for the block index when the
entry is per block), the leaf (or leaves) of our params it feeds, and a `kind` that converts between the two
orientations (`layouts.py`: `copy`, `linear`, `patch`, `leading1`).

An entry with several leaves splits the HF tensor into equal parts along the last axis of our orientation
(GPT-2's fused `c_attn` [D, 3D] -> q, k, v when ours are separate) and concatenates them back when saving.

Our expected shapes come from `jax.eval_shape` of the family's `init` (`param_shapes`, no memory), so every
HF tensor's shape can be checked against the config before it is used. Reading a checkpoint with the tables:
`param_load.py`; writing one: `param_save.py`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import ml_dtypes
import numpy as np

from hm3_jax import models
from hm3_jax.io.layouts import hf_shape
from hm3_jax.models.config import ModelConfig

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
    modules' names; `check_covers` still requires every leaf of our params to be mapped exactly once.
    """
    for cand in candidates:
        try:
            node = leaf_at(shapes, _leaf(cand))
        except (KeyError, TypeError):
            continue
        if not leaf or not isinstance(node, dict):
            return cand
    raise AssertionError(f"internal: none of {candidates} in the family's params")


# Spellings of the MLP's two dense layers in our GPT-2 and ViT params (`_pick` takes the one that exists).
_MLP_IN_SLOTS = ("blocks/up", "blocks/fc", "blocks/mlp_in")
_MLP_OUT_SLOTS = ("blocks/down", "blocks/proj", "blocks/mlp_out")


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
    entries += _dense_entries(pre + "mlp.c_fc", _pick(shapes, *_MLP_IN_SLOTS), "copy")
    entries += _dense_entries(pre + "mlp.c_proj", _pick(shapes, *_MLP_OUT_SLOTS), "copy")
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
    entries += _dense_entries(pre + "intermediate.dense", _pick(shapes, *_MLP_IN_SLOTS), "linear")
    entries += _dense_entries(pre + "output.dense", _pick(shapes, *_MLP_OUT_SLOTS), "linear")
    entries += _norm_entries("vit.layernorm", _pick(shapes, "final/norm", "final/layernorm"))
    if config.num_labels > 0:
        entries += _dense_entries("classifier", _pick(shapes, "head", "head/classifier"), "linear")
    return FamilyMapping(tuple(entries), "vit.", ignored=(r"(vit\.)?pooler\..*",))


def _has(shapes: dict, path: str) -> bool:
    try:
        leaf_at(shapes, _leaf(path))
        return True
    except KeyError:
        return False


_FAMILIES: dict[str, Callable[[ModelConfig], FamilyMapping]] = {"llama": _llama, "gpt2": _gpt2, "vit": _vit}


def family_mapping(config: ModelConfig) -> FamilyMapping:
    """The HF <-> ours mapping for `config` (which tensors exist depends on biases and tying)."""
    if config.family not in _FAMILIES:
        raise NotImplementedError(f"no Hugging Face mapping for family {config.family!r} yet")
    return _FAMILIES[config.family](config)


def hf_names(entry: Entry, num_layers: int) -> list[str]:
    return [entry.hf.format(l=l) for l in range(num_layers)] if entry.per_block else [entry.hf]


def leaf_at(tree: dict, path: Path):
    for key in path:
        tree = tree[key]
    return tree


def set_leaf(tree: dict, path: Path, value) -> None:
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


def leaf_paths(tree: dict, prefix: Path = ()) -> list[Path]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out.extend(leaf_paths(value, prefix + (key,)))
        else:
            out.append(prefix + (key,))
    return out


def check_covers(mapping: FamilyMapping, shapes: dict, config: ModelConfig) -> None:
    mapped = {leaf for entry in mapping.entries for leaf in entry.leaves}
    ours = set(leaf_paths(shapes))
    if mapped != ours:
        raise AssertionError(
            f"internal: HF mapping of family {config.family!r} does not match its params: "
            f"unmapped leaves {sorted(ours - mapped)}, unknown leaves {sorted(mapped - ours)}"
        )


def entry_hf_shape(entry: Entry, shapes: dict, config: ModelConfig) -> tuple[int, ...]:
    """HF shape of one tensor of `entry` (per block: without the L axis)."""
    parts = []
    for leaf in entry.leaves:
        shape = tuple(leaf_at(shapes, leaf).shape)
        parts.append(shape[1:] if entry.per_block else shape)
    ours = parts[0][:-1] + (sum(p[-1] for p in parts),)
    return hf_shape(entry.kind, ours, config)
