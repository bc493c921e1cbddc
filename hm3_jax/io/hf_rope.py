"""RoPE settings of a Llama-family `config.json`, in both forms transformers writes.

transformers 4.x: top-level `rope_theta` + `rope_scaling` (`{rope_type|type, factor, ...}` or null);
transformers 5.x: `rope_parameters: {rope_type, rope_theta, [partial_rotary_factor], factor, ...}`, possibly
nested per layer type (`LAYER_TYPES`). Both may be present when they agree. A RoPE type other than
`default`/`linear`/`llama3` or `partial_rotary_factor != 1` is a `ValueError` naming the field and the file.
"""

from __future__ import annotations

from typing import Any

from hm3_jax.models.config import ROPE_SCALING_KEYS, ROPE_TYPES, rope_scaling_from_dict

# Nested `rope_parameters` (transformers 5, per layer type) and Qwen2's `layer_types` use these keys.
LAYER_TYPES = ("full_attention", "sliding_attention")


def _rope_scaling_items(
    scaling: dict[str, Any] | None, field: str, where: str
) -> tuple[tuple[str, Any], ...] | None:
    """Normalises one RoPE dict (`rope_scaling` or `rope_parameters` without `rope_theta`) for `ModelConfig`.

    `type` is read as `rope_type`; `default` becomes None (plain RoPE); for `linear`/`llama3` only the keys
    transformers' RoPE functions read are kept (`ROPE_SCALING_KEYS`; the others do not change the maths),
    numbers as float (int for `original_max_position_embeddings`). `field` names the source in errors.
    """
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"{where}: {field} must be an object, got {scaling!r}")
    items = dict(scaling)
    rope_type = items.get("rope_type", items.get("type"))
    if rope_type is None:
        raise ValueError(f"{where}: {field} has no 'rope_type' ({scaling!r})")
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"{where}: {field}.rope_type={rope_type!r} is not implemented by hm3_jax (supported: "
            f"{', '.join(ROPE_TYPES)}); loading it with plain RoPE would silently change the model"
        )
    if rope_type == "default":
        return None
    missing = [k for k in ROPE_SCALING_KEYS[rope_type] if items.get(k) is None]
    if missing:
        raise ValueError(f"{where}: {field} of rope_type {rope_type!r} lacks {missing}")
    kept = {"rope_type": rope_type}
    for key in ROPE_SCALING_KEYS[rope_type]:
        kept[key] = int(items[key]) if key == "original_max_position_embeddings" else float(items[key])
    return rope_scaling_from_dict(kept)


def _single_rope_parameters(params: Any, where: str) -> dict[str, Any]:
    """transformers 5's `rope_parameters`, collapsed to one dict (nested per layer type only when all agree)."""
    if not isinstance(params, dict):
        raise ValueError(f"{where}: rope_parameters must be an object, got {params!r}")
    nested = [k for k in params if k in LAYER_TYPES and isinstance(params[k], dict)]
    if not nested:
        return params
    if len(nested) != len(params) or any(params[k] != params[nested[0]] for k in nested):
        raise ValueError(
            f"{where}: rope_parameters differ per layer type ({params!r}); hm3_jax uses one RoPE for every layer"
        )
    return params[nested[0]]


def _agree(values: dict[str, Any], where: str) -> Any:
    """The one value of a setting given in several fields ({field: value}, None = absent); error if they differ."""
    given = {k: v for k, v in values.items() if v is not None}
    if any(v != next(iter(given.values())) for v in given.values()):
        listed = " and ".join(f"{k}={v!r}" for k, v in given.items())
        raise ValueError(f"{where}: {listed} disagree; remove one of them or make them equal")
    return next(iter(given.values()), None)


def rope_from_hf(hf: dict[str, Any], default_theta: float, where: str) -> tuple[float, Any]:
    """`(rope_theta, rope_scaling items)` from either RoPE form of a Llama-family `config.json`.

    transformers 4: top-level `rope_theta` and `rope_scaling` (`{rope_type|type, factor, ...}` or null);
    transformers 5: `rope_parameters = {rope_type, rope_theta, [partial_rotary_factor], factor, ...}`.
    Both may be present; a setting given in both must agree (error naming both fields otherwise).
    """
    params = hf.get("rope_parameters")
    new_theta = new_scaling = new_partial = None
    if params is not None:
        params = dict(_single_rope_parameters(params, where))
        new_theta = params.pop("rope_theta", None)
        new_partial = params.pop("partial_rotary_factor", None)
        params.setdefault("rope_type", params.pop("type", "default"))
        new_scaling = _rope_scaling_items(params, "rope_parameters", where)
    old_theta = hf.get("rope_theta")
    theta = _agree(
        {
            "rope_theta": None if old_theta is None else float(old_theta),
            "rope_parameters.rope_theta": None if new_theta is None else float(new_theta),
        },
        where,
    )
    old_scaling = hf.get("rope_scaling")
    old_partial = old_scaling.get("partial_rotary_factor") if isinstance(old_scaling, dict) else None
    if isinstance(old_scaling, dict):
        old_scaling = {k: v for k, v in old_scaling.items() if k != "partial_rotary_factor"}
    old_items = _rope_scaling_items(old_scaling, "rope_scaling", where)
    if params is not None and old_scaling is not None and old_items != new_scaling:
        raise ValueError(
            f"{where}: rope_scaling={hf['rope_scaling']!r} and rope_parameters={hf['rope_parameters']!r} "
            "disagree; remove one of them or make them equal"
        )
    partial = _agree(
        {
            "partial_rotary_factor": hf.get("partial_rotary_factor"),
            "rope_parameters.partial_rotary_factor": new_partial,
            "rope_scaling.partial_rotary_factor": old_partial,
        },
        where,
    )
    if partial is not None and float(partial) != 1.0:
        raise ValueError(
            f"{where}: partial_rotary_factor={partial} (RoPE on part of each head) is not implemented by hm3_jax"
        )
    return (default_theta if theta is None else theta), (new_scaling if params is not None else old_items)
