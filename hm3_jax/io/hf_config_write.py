"""`ModelConfig` -> Hugging Face `config.json` dict, the inverse of `hf_config.config_from_hf_dict`.

`hf_dict_from_config` writes the architecture that represents a config exactly (`default_architecture`), or
keeps the one of the dict the model was loaded from when it still describes the config; `config_signature`
is the part of a config its forward pass reads, which the round trip must preserve. Remote-code keys
(`hf_config.NEVER_WRITTEN_KEYS`) are never written.
"""

from __future__ import annotations

from typing import Any

from hm3_jax.io.hf_config import (
    MODEL_TYPES,
    SUPPORTED_ARCHITECTURES,
    config_from_hf_dict,
    without_remote_code,
)
from hm3_jax.models.config import ModelConfig

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
    out["model_type"] = MODEL_TYPES[arch]
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
