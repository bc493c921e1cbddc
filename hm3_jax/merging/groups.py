"""Names of parameters: group (attention / MLP / embeddings / norm), block index, and per-leaf merge weights.

Every merge weight in `hm3_jax.merging` is given per model, and each model's weight is one of:

* a number: the same weight for every tensor;
* a 1-D vector `[L]` over the transformer blocks (a "per-block" weight): a leaf under the top-level `"blocks"`
  key of our stacked layout (DESIGN.md: every leaf there is `[L, ...]`) gets `vector[l]` for its block `l`;
  a Hugging Face tensor whose name contains a layer index (`model.layers.3.`, `h.3.`, `encoder.layer.3.`,
  `blocks.3.`, `layers.3.`; see `layer_index`) gets `vector[3]`; every other tensor (embeddings, final norm,
  output head) gets the mean of the vector;
* a mapping from a parameter group to a number or an `[L]` vector (a "per-group" weight), with an optional
  `"default"` entry for groups it does not name. A tensor whose group is missing and without a `"default"`
  is an error that names the tensor and the group.

Groups are a function of the name (`default_param_group`), so they work on our stacked pytrees (the llama
layout of `hm3_jax/models/llama.py`: `q/k/v/o` are attention, `gate/up/down` MLP, `embed`/`head` embeddings,
`*norm*` norm) and on Hugging Face tensor names (`self_attn.q_proj`, `mlp.down_proj`, `attn.c_attn`,
`embed_tokens`, `lm_head`, `input_layernorm`, ...). Pass your own `group_fn(name) -> str` to change it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

GROUPS = ("embeddings", "attention", "mlp", "norm", "other")

_ATTENTION_PARTS = frozenset(
    {"q", "k", "v", "o", "q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "qkv", "c_attn"}
    | {"wq", "wk", "wv", "wo", "out_proj", "qkv_proj"}
)
_MLP_PARTS = frozenset(
    {"gate", "up", "down", "gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "w1", "w2", "w3"}
    | {"gate_up_proj", "dense_h_to_4h", "dense_4h_to_h"}
)
_EMBED_PARTS = frozenset({"wte", "wpe", "lm_head", "head", "tok_embeddings", "embedding", "patch_embeddings"})
# `model.layers.3.`, `h.3.`, `encoder.layer.3.`, `transformer.blocks.3.`; also `/blocks/3/` in pytree paths.
_LAYER_RE = re.compile(r"(?:^|[./])(?:layers|layer|h|blocks|block)[./](\d+)(?:[./]|$)")
_SPLIT_RE = re.compile(r"[./\[\]'\"]+")

GroupFn = Callable[[str], str]


def default_param_group(name: str) -> str:
    """Parameter group of a leaf from its name: one of `GROUPS`.

    Checked in this order, on the name's parts split at `.` and `/` (lower-cased): a part containing `norm`
    (or `ln_1`, `ln_2`, `ln_f`) is `"norm"` (so `post_attention_layernorm` is a norm, not attention); a part
    containing `embed` or one of `wte, wpe, lm_head, head, tok_embeddings` is `"embeddings"`; a part
    containing `attn`/`attention` or one of `q, k, v, o, q_proj, ..., query, key, value, c_attn` is
    `"attention"`; a part containing `mlp`/`ffn`/`feed_forward`/`intermediate` or one of
    `gate, up, down, *_proj, fc1, fc2, c_fc, w1..w3` is `"mlp"`; anything else is `"other"`.

    Examples: `blocks/q/kernel` -> attention, `model.layers.0.mlp.down_proj.weight` -> mlp,
    `embed/embedding` -> embeddings, `model.layers.0.input_layernorm.weight` -> norm.
    """
    parts = [p for p in _SPLIT_RE.split(name.lower()) if p]
    if any("norm" in p or p in ("ln_1", "ln_2", "ln_f") for p in parts):
        return "norm"
    if any("embed" in p or p in _EMBED_PARTS for p in parts):
        return "embeddings"
    if any("attn" in p or "attention" in p or p in _ATTENTION_PARTS for p in parts):
        return "attention"
    if any(
        "mlp" in p or "ffn" in p or "feed_forward" in p or "intermediate" in p or p in _MLP_PARTS
        for p in parts
    ):
        return "mlp"
    return "other"


def layer_index(name: str) -> int | None:
    """Block index parsed from a Hugging Face tensor name, or None for tensors outside the blocks.

    Recognised: `<prefix>.layers.<i>.`, `.layer.<i>.` (BERT/ViT `encoder.layer.3.`), `h.<i>.` (GPT-2),
    `blocks.<i>.`/`block.<i>.`, at the start of the name or after a `.`/`/`.
    """
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def path_name(path: Sequence[Any]) -> str:
    """`"a/b/0"` from a jax key path (DictKey, SequenceKey, GetAttrKey, FlattenedIndexKey)."""
    parts = []
    for entry in path:
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def is_stacked(name: str) -> bool:
    """True for leaves of the stacked layout (`blocks/...`), whose leading axis is the block index."""
    return name == "blocks" or name.startswith("blocks/")


def _resolve_one(spec: Any, name: str, shape: tuple[int, ...], stacked: bool, group_fn: GroupFn, what: str):
    """One model's weight for one leaf: a scalar, or `[L]` for a stacked leaf with a per-block vector."""
    if isinstance(spec, Mapping):
        group = group_fn(name)
        if group in spec:
            spec = spec[group]
        elif "default" in spec:
            spec = spec["default"]
        else:
            raise ValueError(
                f"{what}: no value for parameter group {group!r} of tensor {name!r} and no 'default' entry "
                f"(groups given: {sorted(spec)})"
            )
    value = spec if isinstance(spec, jax.Array) else jnp.asarray(np.asarray(spec, dtype=np.float32))
    value = value.astype(jnp.float32)
    if value.ndim == 0:
        return value
    if value.ndim != 1:
        raise ValueError(
            f"{what}: a weight must be a number or a 1-D per-block vector, got shape {value.shape}"
        )
    if stacked:
        if not shape or shape[0] != value.shape[0]:
            raise ValueError(
                f"{what}: per-block vector of length {value.shape[0]} does not match the {shape[:1]} stacked "
                f"blocks of tensor {name!r}"
            )
        return value
    index = layer_index(name)
    if index is None:
        return jnp.mean(value)
    if index >= value.shape[0]:
        raise ValueError(
            f"{what}: tensor {name!r} is block {index} but the per-block vector has length {value.shape[0]}"
        )
    return value[index]


def leaf_weights(
    weights: Sequence[Any] | None,
    name: str,
    shape: tuple[int, ...],
    num_models: int,
    group_fn: GroupFn = default_param_group,
    what: str = "weights",
) -> jax.Array:
    """Per-model weights of one leaf.

    Args:
      weights: None (all ones) or a sequence of `num_models` weight specs (see the module docstring).
      name: the leaf's name (`path_name` of a pytree path, or a Hugging Face tensor name).
      shape: the leaf's shape (used for stacked `blocks/...` leaves).
      num_models: K.
      group_fn: name -> group.
      what: the hyperparameter's name, for error messages.
    Returns:
      float32 `[K]`, or `[L, K]` for a stacked leaf (a scalar weight is broadcast over the blocks).
    """
    stacked = is_stacked(name)
    if weights is None:
        out = jnp.ones((num_models,), jnp.float32)
        return jnp.broadcast_to(out, (shape[0], num_models)) if stacked else out
    if len(weights) != num_models:
        raise ValueError(f"{what}: got {len(weights)} values for {num_models} models")
    per_model = [_resolve_one(w, name, shape, stacked, group_fn, what) for w in weights]
    if stacked:
        return jnp.stack([jnp.broadcast_to(w, (shape[0],)) for w in per_model], axis=1)
    return jnp.stack(per_model)


def check_leaf_weights(leaf_w: Any, name: str, what: str = "weights", normalize: bool = False) -> None:
    """Refuses the per-model weights of one leaf (`leaf_weights`' `[K]` or `[L, K]`) that cannot merge: a NaN or
    Inf entry, or, when the merge divides by their sum (`normalize`), weights that sum to 0 (the kernels would
    divide by 1 instead: a silently different merge). Traced weights (under jit) are not checked.

    Raises:
      ValueError naming `what`, the tensor `name` and the values.
    """
    if isinstance(leaf_w, jax.core.Tracer):
        return
    w = np.asarray(leaf_w, np.float64)  # [K] or [L, K]
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{what} of tensor {name!r} are not finite numbers: {w.tolist()}")
    if normalize and np.any(np.abs(w.sum(-1)) < 1e-8):
        raise ValueError(
            f"{what} of tensor {name!r} sum to 0 ({w.tolist()}), and this merge divides by their sum "
            "(normalize); change the weights or set normalize false"
        )


# Parts of HF tensor names outside the blocks: head-like parts (post) and embedding markers (pre), see `shell_end`.
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
