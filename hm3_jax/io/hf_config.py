"""Hugging Face `config.json` -> `ModelConfig` (the way back: `hf_config_write.hf_dict_from_config`).

Reads the `architectures` entry of a local `config.json` and maps the HF field names onto `ModelConfig`
(see the correspondence table in `hm3_jax/models/config.py`). Only the architectures in
`SUPPORTED_ARCHITECTURES` are accepted; nothing is ever imported from the checkpoint directory: a `config.json`
with a remote-code pointer (`auto_map`, `custom_pipelines`) is refused by `read_hf_config`, and
`hf_config_write.hf_dict_from_config` never writes one.

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

from hm3_jax.io.hf_rope import LAYER_TYPES, rope_from_hf
from hm3_jax.models.config import ModelConfig

CONFIG_NAME = "config.json"

# Keys that make transformers import Python code shipped with a checkpoint (`trust_remote_code`).
REMOTE_CODE_KEYS = ("auto_map", "custom_pipelines")
# What no config hm3_jax writes carries: those pointers, and the flag that asks to trust them. A saved or merged
# model does not come with that code, and nobody reviewed it.
NEVER_WRITTEN_KEYS = (*REMOTE_CODE_KEYS, "trust_remote_code")

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "GPT2LMHeadModel",
    "ViTModel",
    "ViTForImageClassification",
)

MODEL_TYPES = {
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
        if len(layer_types) != num_layers or not set(layer_types) <= set(LAYER_TYPES):
            raise ValueError(
                f"{where}: layer_types must list {num_layers} entries of {LAYER_TYPES}, got {layer_types!r}"
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
      hf: the parsed `config.json` (RoPE in the transformers 4 or 5 form, see `hf_rope.rope_from_hf`).
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
        rope_theta, rope_scaling = rope_from_hf(hf, defaults["rope_theta"], where)
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
