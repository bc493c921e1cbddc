"""Hugging Face `config.json` <-> `ModelConfig`.

Reads the `architectures` entry of a local `config.json` and maps the HF field names onto `ModelConfig`
(see the correspondence table in `hm3_jax/models/config.py`). Only the architectures in
`SUPPORTED_ARCHITECTURES` are accepted; nothing is ever imported from the checkpoint directory: a `config.json`
with a remote-code pointer (`auto_map`, `custom_pipelines`) is refused by `read_hf_config`, and
`hf_dict_from_config` never writes one.

RoPE settings are read in both forms transformers writes: 4.x's top-level `rope_theta` + `rope_scaling`
and 5.x's `rope_parameters: {rope_type, rope_theta, ...}` (both may be present when they agree). Any field that
changes the forward pass of the architecture's transformers class and that hm3_jax does not implement (a RoPE
type other than `default`/`linear`/`llama3`, `partial_rotary_factor != 1`, Qwen2 sliding windows on some layers
only, an unsupported `hidden_act`, ...) is a `ValueError` naming the field and the file, never a silent default.

Architecture -> family:

| HF architecture              | family  | notes                                                          |
| ---------------------------- | ------- | -------------------------------------------------------------- |
| `LlamaForCausalLM`           | `llama` | HF `attention_bias` biases q, k, v and o                         |
| `MistralForCausalLM`         | `llama` | `sliding_window` kept; no biases (HF ignores `*_bias` flags)     |
| `Qwen2ForCausalLM`           | `llama` | q/k/v biased, o not (`attention_out_bias=False`); sliding window |
|                              |         | only when every layer slides (`layer_types`/`max_window_layers`) |
| `GPT2LMHeadModel`            | `gpt2`  | LM head tied to `wte`                                          |
| `ViTModel`                   | `vit`   | `num_labels=0`: outputs are the final hidden states             |
| `ViTForImageClassification`  | `vit`   | `num_labels=len(id2label)`: outputs are class logits            |
"""

from __future__ import annotations

import json
import os
from typing import Any

from hm3_jax.models.config import ROPE_SCALING_KEYS, ROPE_TYPES, ModelConfig, rope_scaling_from_dict

CONFIG_NAME = "config.json"

# Keys that make transformers import Python code shipped with a checkpoint (`trust_remote_code`).
REMOTE_CODE_KEYS = ("auto_map", "custom_pipelines")
# What no config hm3_jax writes carries: those pointers, and the flag that asks to trust them. A saved or merged
# model does not come with that code, and nobody reviewed it.
NEVER_WRITTEN_KEYS = (*REMOTE_CODE_KEYS, "trust_remote_code")
# Nested `rope_parameters` (transformers 5, per layer type) use these keys.
_LAYER_TYPES = ("full_attention", "sliding_attention")

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "GPT2LMHeadModel",
    "ViTModel",
    "ViTForImageClassification",
)

_MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "GPT2LMHeadModel": "gpt2",
    "ViTModel": "vit",
    "ViTForImageClassification": "vit",
}

# HF defaults of the fields we read, per architecture (used when config.json omits them). Taken from the
# `__init__` signatures of transformers' LlamaConfig, MistralConfig, Qwen2Config, GPT2Config and ViTConfig.
_LLAMA_DEFAULTS = {
    "LlamaForCausalLM": dict(
        rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=2048, hidden_act="silu"
    ),
    "MistralForCausalLM": dict(
        rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=4096 * 32, hidden_act="silu"
    ),
    "Qwen2ForCausalLM": dict(
        rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=32768, hidden_act="silu"
    ),
}


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's `architectures` entry is not one we implement."""


def _require(hf: dict[str, Any], key: str, where: str) -> Any:
    if key not in hf or hf[key] is None:
        raise ValueError(f"{where}: config.json has no {key!r}, which {hf.get('architectures')} needs")
    return hf[key]


def architecture_of(hf: dict[str, Any], where: str = "config.json") -> str:
    """The single supported architecture named in an HF config dict (error listing the supported ones)."""
    archs = hf.get("architectures")
    if not archs:
        raise UnsupportedArchitectureError(
            f"{where}: no 'architectures' entry; "
            f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{where}: architecture {archs} is not supported; supported architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (remote code is never run)"
        )
    return archs[0]


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
    nested = [k for k in params if k in _LAYER_TYPES and isinstance(params[k], dict)]
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


def _llama_rope(hf: dict[str, Any], default_theta: float, where: str) -> tuple[float, Any]:
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


def _qwen2_sliding_window(hf: dict[str, Any], num_layers: int, max_positions: int, where: str) -> int | None:
    """The window of a Qwen2 `config.json`, as transformers' Qwen2 applies it.

    Qwen2 slides only the layers whose `layer_types[i] == "sliding_attention"` (default: `i >=
    max_window_layers`), and only with `use_sliding_window: true`. hm3_jax applies one window to every layer:
    all layers sliding -> that window; none -> None; a mix is an error unless the window is at least
    `max_position_embeddings` (then no sequence up to that length is affected).
    """
    window = hf.get("sliding_window")
    if not hf.get("use_sliding_window", False) or window is None:
        return None
    layer_types = hf.get("layer_types")
    if layer_types is None:
        first = int(hf.get("max_window_layers", 28))  # Qwen2Config's default
        sliding = [i >= first for i in range(num_layers)]
        field = f"max_window_layers={first}"
    else:
        if len(layer_types) != num_layers or not set(layer_types) <= set(_LAYER_TYPES):
            raise ValueError(
                f"{where}: layer_types must list {num_layers} entries of {_LAYER_TYPES}, got {layer_types!r}"
            )
        sliding = [t == "sliding_attention" for t in layer_types]
        field = "layer_types"
    if not any(sliding):
        return None
    if all(sliding):
        return int(window)
    if int(window) >= max_positions:
        return None
    raise ValueError(
        f"{where}: use_sliding_window=true with sliding_window={window} on layers "
        f"{[i for i, s in enumerate(sliding) if s]} only ({field}) is not implemented by hm3_jax, which applies "
        "one window to every layer"
    )


def config_from_hf_dict(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Maps an HF config dict (the parsed `config.json`) to a `ModelConfig`.

    Args:
      hf: the parsed `config.json` (RoPE in the transformers 4 or 5 form, see `_llama_rope`).
      where: names the source in error messages.
    Returns:
      the `ModelConfig`. Raises `UnsupportedArchitectureError` for an architecture we do not implement and
      `ValueError` naming the field and `where` for a missing required field or a feature we do not implement
      (e.g. RoPE type `yarn`, `partial_rotary_factor` < 1, GPT-2's `scale_attn_by_inverse_layer_idx`).
    """
    try:
        return _config_from_hf_dict(hf, where)
    except UnsupportedArchitectureError:
        raise
    except (ValueError, TypeError) as e:
        if str(e).startswith(where):
            raise
        raise ValueError(f"{where}: {e}") from e


def _config_from_hf_dict(hf: dict[str, Any], where: str) -> ModelConfig:
    arch = architecture_of(hf, where)
    req = lambda key: _require(hf, key, where)
    if arch in _LLAMA_DEFAULTS:
        defaults = _LLAMA_DEFAULTS[arch]
        get = lambda key: hf[key] if hf.get(key) is not None else defaults[key]
        num_heads = int(req("num_attention_heads"))
        num_layers = int(req("num_hidden_layers"))
        max_positions = int(get("max_position_embeddings"))
        # transformers' Qwen2 and Mistral hard-code their biases and ignore `attention_bias` / `mlp_bias`.
        if arch == "Qwen2ForCausalLM":
            q_bias, o_bias, mlp_bias = True, False, False
        elif arch == "MistralForCausalLM":
            q_bias = o_bias = mlp_bias = False
        else:
            q_bias = o_bias = bool(hf.get("attention_bias", False))
            mlp_bias = bool(hf.get("mlp_bias", False))
        sliding_window = None
        if arch == "MistralForCausalLM":
            sliding_window = hf.get("sliding_window")
        elif arch == "Qwen2ForCausalLM":
            sliding_window = _qwen2_sliding_window(hf, num_layers, max_positions, where)
        rope_theta, rope_scaling = _llama_rope(hf, defaults["rope_theta"], where)
        head_dim = hf.get("head_dim")
        if head_dim is not None and int(head_dim) * num_heads == int(req("hidden_size")):
            head_dim = None  # the default; None keeps configs from different sources equal (hashing, caches)
        return ModelConfig(
            family="llama",
            vocab_size=int(req("vocab_size")),
            hidden_size=int(req("hidden_size")),
            intermediate_size=int(req("intermediate_size")),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=None if head_dim is None else int(head_dim),
            max_position_embeddings=max_positions,
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            norm_eps=float(get("rms_norm_eps")),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=q_bias,
            attention_out_bias=o_bias,
            mlp_bias=mlp_bias,
            hidden_act=str(get("hidden_act")),
            sliding_window=None if sliding_window is None else int(sliding_window),
        )
    if arch == "GPT2LMHeadModel":
        for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if hf.get(flag, False):
                raise ValueError(f"{where}: GPT-2 with {flag}=true is not supported")
        if not hf.get("scale_attn_weights", True):
            raise ValueError(f"{where}: GPT-2 with scale_attn_weights=false is not supported")
        hidden = int(req("n_embd"))
        return ModelConfig(
            family="gpt2",
            vocab_size=int(req("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(hf.get("n_inner") or 4 * hidden),
            num_layers=int(req("n_layer")),
            num_heads=int(req("n_head")),
            max_position_embeddings=int(req("n_positions")),
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            tie_word_embeddings=True,
            hidden_act=str(hf.get("activation_function", "gelu_new")),
        )
    # ViT
    num_labels = 0
    if arch == "ViTForImageClassification":
        id2label = hf.get("id2label")
        num_labels = len(id2label) if id2label else int(hf.get("num_labels", 2))
    return ModelConfig(
        family="vit",
        hidden_size=int(req("hidden_size")),
        intermediate_size=int(req("intermediate_size")),
        num_layers=int(req("num_hidden_layers")),
        num_heads=int(req("num_attention_heads")),
        image_size=int(hf.get("image_size", 224)),
        patch_size=int(hf.get("patch_size", 16)),
        num_channels=int(hf.get("num_channels", 3)),
        num_labels=num_labels,
        norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        hidden_act=str(hf.get("hidden_act", "gelu")),
        attention_bias=bool(hf.get("qkv_bias", True)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
    )


_SIGNATURE_FIELDS = {
    "llama": (
        "vocab_size hidden_size intermediate_size num_layers num_heads kv_heads head_size "
        "max_position_embeddings "
        "rope_theta rope_scaling norm_eps tie_word_embeddings attention_bias attention_out_bias mlp_bias "
        "hidden_act sliding_window"
    ).split(),
    "gpt2": "vocab_size hidden_size intermediate_size num_layers num_heads max_position_embeddings norm_eps "
    "hidden_act".split(),
    "vit": "hidden_size intermediate_size num_layers num_heads image_size patch_size num_channels num_labels "
    "norm_eps hidden_act attention_bias".split(),
}


def config_signature(config: ModelConfig) -> tuple:
    """The fields of `config` that its family's forward pass reads (resolved `kv_heads`/`head_size`).

    Two configs with equal signatures describe the same function; fields a family ignores (e.g. a ViT's
    `vocab_size`) are left out, so `config_from_hf_dict(hf_dict_from_config(c))` matches `c` in signature.
    """
    return (config.family,) + tuple(getattr(config, name) for name in _SIGNATURE_FIELDS[config.family])


def read_hf_config(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """Reads `<path>/config.json`.

    Returns:
      `(config, hf_dict)`: the `ModelConfig` and the raw parsed JSON (kept so that saving can preserve fields
      we do not model, such as token ids and label names).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        what = "is not a directory" if os.path.exists(path) else "does not exist"
        raise FileNotFoundError(
            f"checkpoint directory {path!r} {what} (expected a local Hugging Face directory)"
        )
    cfg_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(
            f"{path!r} has no {CONFIG_NAME}; a Hugging Face checkpoint directory needs one"
        )
    hf = read_config_dict(cfg_file)
    check_no_remote_code(hf, cfg_file)
    return config_from_hf_dict(hf, where=cfg_file), hf


def read_config_dict(cfg_file: str) -> dict[str, Any]:
    """The JSON object in a config.json file (ValueError naming the file when it is not valid JSON or not an
    object)."""
    with open(cfg_file, encoding="utf-8") as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file}: not valid JSON ({e})") from e
    if not isinstance(hf, dict):
        raise ValueError(f"{cfg_file}: expected a JSON object, got {type(hf).__name__}")
    return hf


def check_no_remote_code(hf: dict[str, Any], where: str = "config.json") -> None:
    """Refuses a config dict that points transformers at code shipped with the checkpoint (`auto_map`, ...).

    hm3_jax never imports or runs checkpoint code. Raises `ValueError` naming `where` and the key, saying how
    to proceed when `architectures` names a supported architecture (delete the key).
    """
    found = [key for key in REMOTE_CODE_KEYS if hf.get(key)]
    if found:
        raise ValueError(
            f"{where}: has {' and '.join(repr(k) for k in found)} ({hf[found[0]]!r}), which points transformers at "
            "Python code shipped with the checkpoint (trust_remote_code); hm3_jax never runs checkpoint code and "
            "refuses it. If 'architectures' names a supported architecture "
            f"({', '.join(SUPPORTED_ARCHITECTURES)}) and the weights follow it, delete "
            f"{' and '.join(repr(k) for k in found)} from config.json and load again."
        )


def without_remote_code(hf: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`hf` (a config.json or tokenizer_config.json dict) without `NEVER_WRITTEN_KEYS`, and the keys dropped."""
    dropped = [key for key in NEVER_WRITTEN_KEYS if key in hf]
    return {k: v for k, v in hf.items() if k not in NEVER_WRITTEN_KEYS}, dropped


def default_architecture(config: ModelConfig) -> str:
    """The HF architecture that represents `config` exactly."""
    if config.family == "gpt2":
        return "GPT2LMHeadModel"
    if config.family == "vit":
        return "ViTForImageClassification" if config.num_labels > 0 else "ViTModel"
    if config.attention_bias and not config.attention_out_bias and not config.mlp_bias:
        return "Qwen2ForCausalLM"
    if config.sliding_window is not None:
        return "MistralForCausalLM"
    return "LlamaForCausalLM"


def hf_dict_from_config(config: ModelConfig, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Builds the `config.json` dict for `config`, the inverse of `config_from_hf_dict`.

    Args:
      config: the model's config.
      base: an HF dict to start from (e.g. the one the model was loaded with), so that fields we do not model
        (token ids, `id2label`, `torch_dtype`, ...) survive a load/save round trip. Its
        architecture is kept when it describes `config` exactly; otherwise
        `default_architecture(config)` is written.
    Returns:
      a JSON-serialisable dict; `config_from_hf_dict(result)` is checked to have `config`'s signature
      (`config_signature`) before returning. `NEVER_WRITTEN_KEYS` of `base` (`auto_map`,
      `trust_remote_code`, ...) are never copied.
    """
    arch = default_architecture(config)
    if base is not None:
        base, _ = without_remote_code(base)  # never written back
        try:
            if config_signature(config_from_hf_dict(base)) == config_signature(config):
                return dict(base)
        except ValueError:
            pass
        base_archs = base.get("architectures") or []
        if base_archs and base_archs[0] in SUPPORTED_ARCHITECTURES:
            candidate = _build(config, base_archs[0], base)
            try:
                if config_signature(config_from_hf_dict(candidate)) == config_signature(config):
                    return candidate
            except ValueError:
                pass
    out = _build(config, arch, base if base is not None else {})
    back = config_from_hf_dict(out)
    if config_signature(back) != config_signature(config):
        raise ValueError(
            f"config cannot be expressed as a Hugging Face {arch} config.json "
            f"(it would read back as {back}, expected {config})"
        )
    return out


_OWN_KEYS = {
    "llama": (
        "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads "
        "head_dim max_position_embeddings rope_theta rope_scaling rope_parameters partial_rotary_factor "
        "rms_norm_eps tie_word_embeddings attention_bias mlp_bias "
        "hidden_act sliding_window use_sliding_window max_window_layers layer_types"
    ).split(),
    "gpt2": "vocab_size n_embd n_inner n_layer n_head n_positions layer_norm_epsilon "
    "activation_function".split(),
    "vit": (
        "hidden_size intermediate_size num_hidden_layers num_attention_heads image_size patch_size "
        "num_channels "
        "layer_norm_eps hidden_act qkv_bias id2label label2id num_labels"
    ).split(),
}


def _build(config: ModelConfig, arch: str, base: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in base.items() if k not in _OWN_KEYS[config.family]}
    out["architectures"] = [arch]
    out["model_type"] = _MODEL_TYPES[arch]
    if config.family == "llama":
        out.update(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.kv_heads,
            head_dim=config.head_size,  # transformers' LlamaConfig writes it too
            max_position_embeddings=config.max_position_embeddings,
            rope_theta=config.rope_theta,
            rope_scaling=None if config.rope_scaling is None else dict(config.rope_scaling),
            rms_norm_eps=config.norm_eps,
            tie_word_embeddings=config.tie_word_embeddings,
            hidden_act=config.hidden_act,
        )
        if arch == "Qwen2ForCausalLM":
            # Qwen2 slides layers i >= max_window_layers: 0 = every layer, as hm3_jax does.
            sliding = config.sliding_window is not None
            out.update(
                use_sliding_window=sliding,
                sliding_window=config.sliding_window,
                max_window_layers=0 if sliding else config.num_layers,
                layer_types=["sliding_attention" if sliding else "full_attention"] * config.num_layers,
            )
        else:
            out.update(attention_bias=config.attention_bias, mlp_bias=config.mlp_bias)
            if arch == "MistralForCausalLM":
                out["sliding_window"] = config.sliding_window
    elif config.family == "gpt2":
        out.update(
            vocab_size=config.vocab_size,
            n_embd=config.hidden_size,
            n_inner=config.intermediate_size,
            n_layer=config.num_layers,
            n_head=config.num_heads,
            n_positions=config.max_position_embeddings,
            layer_norm_epsilon=config.norm_eps,
            activation_function=config.hidden_act,
            tie_word_embeddings=True,
        )
    else:
        out.update(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            image_size=config.image_size,
            patch_size=config.patch_size,
            num_channels=config.num_channels,
            layer_norm_eps=config.norm_eps,
            hidden_act=config.hidden_act,
            qkv_bias=config.attention_bias,
            initializer_range=config.initializer_range,
        )
        if config.num_labels > 0:
            old = base.get("id2label") or {}
            if len(old) == config.num_labels:
                id2label = {str(k): v for k, v in old.items()}
            else:
                id2label = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
            out["id2label"] = id2label
            out["label2id"] = {v: int(k) for k, v in id2label.items()}
    return out
