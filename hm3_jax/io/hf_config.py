"""Hugging Face `config.json` <-> `ModelConfig`.

Reads the `architectures` entry of a local `config.json` and maps the HF field names onto `ModelConfig`
(see the correspondence table in `hm3_jax/models/config.py`). Only the architectures in
`SUPPORTED_ARCHITECTURES` are accepted; nothing is ever imported from the checkpoint directory
(no `trust_remote_code`, no `auto_map`).

Architecture -> family:

| HF architecture              | family  | notes                                                          |
| ---------------------------- | ------- | -------------------------------------------------------------- |
| `LlamaForCausalLM`           | `llama` | HF `attention_bias` biases q, k, v and o                         |
| `MistralForCausalLM`         | `llama` | `sliding_window` kept in the config                             |
| `Qwen2ForCausalLM`           | `llama` | q/k/v biased, o not (`attention_out_bias=False`)                |
| `GPT2LMHeadModel`            | `gpt2`  | LM head tied to `wte`                                          |
| `ViTModel`                   | `vit`   | `num_labels=0`: outputs are the final hidden states             |
| `ViTForImageClassification`  | `vit`   | `num_labels=len(id2label)`: outputs are class logits            |
"""

from __future__ import annotations

import json
import os
from typing import Any

from hm3_jax.models.config import ModelConfig, rope_scaling_from_dict

CONFIG_NAME = "config.json"

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


def config_from_hf_dict(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Maps an HF config dict (the parsed `config.json`) to a `ModelConfig`.

    Args:
      hf: the parsed `config.json`.
      where: names the source in error messages.
    Returns:
      the `ModelConfig`. Raises `UnsupportedArchitectureError` for an architecture we do not implement and
      `ValueError` for a missing required field or a feature we do not implement (e.g. GPT-2's
      `scale_attn_by_inverse_layer_idx`).
    """
    arch = architecture_of(hf, where)
    req = lambda key: _require(hf, key, where)
    if arch in _LLAMA_DEFAULTS:
        defaults = _LLAMA_DEFAULTS[arch]
        get = lambda key: hf[key] if hf.get(key) is not None else defaults[key]
        num_heads = int(req("num_attention_heads"))
        if arch == "Qwen2ForCausalLM":
            q_bias, o_bias, mlp_bias = True, False, False
        else:
            q_bias = o_bias = bool(hf.get("attention_bias", False))
            mlp_bias = bool(hf.get("mlp_bias", False))
        sliding_window = None
        if arch == "MistralForCausalLM":
            sliding_window = hf.get("sliding_window")
        elif arch == "Qwen2ForCausalLM" and hf.get("use_sliding_window", False):
            sliding_window = hf.get("sliding_window")
        head_dim = hf.get("head_dim")
        if head_dim is not None and int(head_dim) * num_heads == int(req("hidden_size")):
            head_dim = None  # the default; None keeps configs from different sources equal (hashing, caches)
        return ModelConfig(
            family="llama",
            vocab_size=int(req("vocab_size")),
            hidden_size=int(req("hidden_size")),
            intermediate_size=int(req("intermediate_size")),
            num_layers=int(req("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=None if head_dim is None else int(head_dim),
            max_position_embeddings=int(get("max_position_embeddings")),
            rope_theta=float(get("rope_theta")),
            rope_scaling=rope_scaling_from_dict(hf.get("rope_scaling")),
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
    with open(cfg_file, encoding="utf-8") as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file}: not valid JSON ({e})") from e
    if not isinstance(hf, dict):
        raise ValueError(f"{cfg_file}: expected a JSON object, got {type(hf).__name__}")
    return config_from_hf_dict(hf, where=cfg_file), hf


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
      (`config_signature`) before returning.
    """
    arch = default_architecture(config)
    if base is not None:
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
        "head_dim max_position_embeddings rope_theta rope_scaling rms_norm_eps tie_word_embeddings "
        "attention_bias mlp_bias "
        "hidden_act sliding_window use_sliding_window max_window_layers"
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
            out.update(
                use_sliding_window=config.sliding_window is not None,
                sliding_window=config.sliding_window,
                max_window_layers=config.num_layers,
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
