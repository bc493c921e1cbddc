"""`ModelConfig`: one frozen, hashable description of a transformer (static jit argument).

One dataclass covers every family we support, so a config can be a static argument of `jax.jit` and a key of
caches. Family-specific fields are ignored by the other families:

- `llama` (Llama-2/3, Mistral, Qwen2/2.5): vocab_size, hidden_size, intermediate_size, num_layers, num_heads,
  num_kv_heads, head_dim, rope_theta, rope_scaling, norm_eps, tie_word_embeddings, attention_bias (q/k/v),
  attention_out_bias (o), mlp_bias, hidden_act, sliding_window.
- `gpt2`: vocab_size, hidden_size, intermediate_size, num_layers, num_heads, max_position_embeddings,
  norm_eps, hidden_act (every linear has a bias; the LM head is always tied to the token embedding).
- `vit` (HF `ViTModel` / `ViTForImageClassification`): hidden_size, intermediate_size, num_layers, num_heads,
  image_size, patch_size, num_channels, num_labels (0 = no classifier), norm_eps, hidden_act, attention_bias.

Hugging Face name correspondences (for `hm3_jax/io`): `num_hidden_layers -> num_layers`,
`num_attention_heads -> num_heads`, `num_key_value_heads -> num_kv_heads`, `rms_norm_eps` /
`layer_norm_epsilon` / `layer_norm_eps -> norm_eps`, GPT-2's `n_embd/n_layer/n_head/n_positions/n_inner`,
ViT's `qkv_bias -> attention_bias`. Qwen2 is `family="llama"` with `attention_bias=True` and
`attention_out_bias=False`; Llama's HF `attention_bias=True` sets both.

`rope_scaling` is a tuple of `(key, value)` pairs (a dict is not hashable); use `rope_scaling_from_dict`.
Supported `rope_type`s: `default`, `linear`, `llama3` (see `hm3_jax.models.layers.rope_inv_freq`); the keys each
one reads are `ROPE_SCALING_KEYS[rope_type]` (all required).
"""

from __future__ import annotations

import dataclasses
from typing import Any

FAMILIES = ("llama", "gpt2", "vit")
ROPE_TYPES = ("default", "linear", "llama3")
# The `rope_scaling` keys that `layers.rope_inv_freq` reads for each type, i.e. the keys transformers'
# `_compute_linear_scaling_rope_parameters` / `_compute_llama3_parameters` read (4.57 and 5.x alike).
ROPE_SCALING_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


def rope_scaling_from_dict(rope_scaling: dict[str, Any] | None) -> tuple[tuple[str, Any], ...] | None:
    """Turns HF's `rope_scaling` dict into the sorted, hashable tuple of items that `ModelConfig` stores.

    HF spells the type `rope_type` (new) or `type` (old); both are accepted and stored as `rope_type`.
    Lists inside (e.g. longrope factors) become tuples.
    """
    if rope_scaling is None:
        return None
    if not isinstance(rope_scaling, dict):
        raise TypeError(f"rope_scaling must be a dict or None, got {type(rope_scaling).__name__}")
    items = dict(rope_scaling)
    if "type" in items and "rope_type" not in items:
        items["rope_type"] = items.pop("type")
    items.pop("type", None)
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in items.items()))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static description of a transformer; frozen and hashable so it can be a `jax.jit` static argument.

    `num_kv_heads=None` means multi-head attention (`num_heads`); `head_dim=None` means
    `hidden_size // num_heads`. Read the resolved values through `kv_heads` and `head_size`.
    """

    family: str
    vocab_size: int = 0
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    num_labels: int = 0
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"ModelConfig.family={self.family!r} is not supported; supported: {FAMILIES}")
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "max_position_embeddings",
        ):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.family != "vit" and self.vocab_size <= 0:
            raise ValueError(f"ModelConfig.vocab_size must be positive for family {self.family!r}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; set head_dim"
            )
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.kv_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; supported: {ACTIVATIONS}")
        if self.rope_scaling is not None:
            if isinstance(self.rope_scaling, dict):
                raise TypeError("rope_scaling must be a tuple of items; use rope_scaling_from_dict(dict)")
            rope_type = dict(self.rope_scaling).get("rope_type", "default")
            if rope_type not in ROPE_TYPES:
                raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported: {ROPE_TYPES}")
            missing = [k for k in ROPE_SCALING_KEYS[rope_type] if k not in dict(self.rope_scaling)]
            if missing:
                raise ValueError(f"rope_scaling of type {rope_type!r} lacks {missing}")
        if self.family == "vit":
            if self.image_size % self.patch_size:
                raise ValueError(
                    f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}"
                )

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (grouped-query attention when < num_heads)."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_size(self) -> int:
        """Per-head dimension hd."""
        return self.hidden_size // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def num_patches(self) -> int:
        """ViT: number of image patches (sequence length without the CLS token)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        """`rope_scaling` as a dict (empty when None)."""
        return {} if self.rope_scaling is None else dict(self.rope_scaling)

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
