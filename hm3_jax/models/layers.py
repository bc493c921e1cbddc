"""Shared pure building blocks: dense, norms, activations, RoPE, masked multi-head attention.

Dtype policy: matmuls run in the dtype of the params (bf16 params -> bf16 matmuls with float32 accumulation
through `preferred_element_type`); norms, attention logits and softmax run in float32 and are cast back.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax.models.config import ModelConfig

# Whether `einsum_f32` widens bf16 operands on XLA:CPU (see there); `accelerator_dots` turns it off while a
# memory plan lowers programs that are compiled for an accelerator on simulated CPU devices and never run.
_WIDEN_BF16_ON_CPU = contextvars.ContextVar("widen_bf16_on_cpu", default=True)
MASK_VALUE = -1e30  # finite, so a fully masked row (a left-pad query) gives a uniform, not NaN, softmax


def einsum_f32(subscripts: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """`jnp.einsum(subscripts, a, b)` accumulated in float32 (`preferred_element_type`), float32 out.

    On the CPU backend bfloat16 operands are widened to float32 first: XLA:CPU has no bf16 x bf16 -> f32 dot
    for operands that its runtime executes as a separate dot (`UNIMPLEMENTED: Unsupported element type for
    DotThunk::Execute: BF16 x BF16 = F32`, e.g. Qwen2.5-0.5B's shapes; small dots are fused and work). The
    product of two bfloat16 numbers is exact in float32, so only the summation order can differ.
    """
    if jnp.bfloat16 in (a.dtype, b.dtype) and jax.default_backend() == "cpu" and _WIDEN_BF16_ON_CPU.get():
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.einsum(subscripts, a, b, preferred_element_type=jnp.float32)


@contextlib.contextmanager
def accelerator_dots():
    """Within it, `einsum_f32` traces bf16 x bf16 -> f32 dots on every backend, as on a TPU or GPU: for programs
    that are only compiled on CPU (a memory plan on simulated devices), so that their buffers hold no f32
    copies of the bf16 weights an accelerator never makes (XLA:CPU may fail to *run* such a dot)."""
    token = _WIDEN_BF16_ON_CPU.set(False)
    try:
        yield
    finally:
        _WIDEN_BF16_ON_CPU.reset(token)


def dense(p: dict, x: jax.Array) -> jax.Array:
    """`y = x @ p["kernel"] + p.get("bias")`; kernel [in, out], x [..., in] -> [..., out] in x's dtype.

    The product accumulates in float32 and is cast back to the kernel's dtype.
    """
    kernel = p["kernel"]
    y = einsum_f32("...i,io->...o", x.astype(kernel.dtype), kernel)
    if "bias" in p:
        y = y + p["bias"].astype(jnp.float32)
    return y.astype(kernel.dtype)


def rms_norm(scale: jax.Array, x: jax.Array, eps: float) -> jax.Array:
    """RMSNorm (Zhang & Sennrich 2019): `x / sqrt(mean(x^2) + eps) * scale`, in float32. x [..., D]."""
    xf = x.astype(jnp.float32)
    y = xf / jnp.sqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(scale.dtype)


def layer_norm(p: dict, x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm: `(x - mean) / sqrt(var + eps) * scale + bias`, computed in float32. x [..., D]."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) / jnp.sqrt(var + eps)
    y = y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)
    return y.astype(p["scale"].dtype)


def activation(name: str, x: jax.Array) -> jax.Array:
    """HF's ACT2FN for: silu, gelu (erf), gelu_new / gelu_pytorch_tanh (tanh), relu."""
    if name == "silu":
        return jax.nn.silu(x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu(x)
    raise ValueError(f"unsupported activation {name!r}")


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """RoPE inverse frequencies [hd/2] (float64 numpy; a static function of the config).

    default: `inv_freq_i = theta^(-2i/hd)` (Su et al. 2021, RoFormer eq. 15);
    linear:  `inv_freq / factor` (position interpolation, Chen et al. 2023);
    llama3:  HF `_compute_llama3_parameters`: wavelengths above `original_max / low_freq_factor`
             are divided by `factor`, those below `original_max / high_freq_factor` are kept, and the
             band between is a linear blend with `smooth = (original_max / wavelen - low) / (high - low)`.
    """
    hd = config.head_size
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    scaling = config.rope_scaling_dict
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type == "llama3":
        low = float(scaling["low_freq_factor"])
        high = float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        out = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return np.where(medium, smoothed, out)
    raise ValueError(f"unsupported rope type {rope_type!r}")


def rope_tables(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sin, cos), each [B, S, hd] float32, for positions [B, S] (HF layout: frequencies repeated twice)."""
    inv_freq = jnp.asarray(rope_inv_freq(config), jnp.float32)  # [hd/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotary embedding in HF's rotate-half convention: `x * cos + rotate_half(x) * sin`.

    x [B, S, heads, hd]; sin, cos [B, S, hd]. Computed in float32, returned in x's dtype.
    """
    xf = x.astype(jnp.float32)
    half = xf.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def causal_mask(
    query_positions: jax.Array,
    key_positions: jax.Array,
    key_mask: jax.Array,
    sliding_window: int | None = None,
) -> jax.Array:
    """Boolean attention mask [B, 1, Sq, Sk]: key j is visible to query i iff `key_mask[b, j]` and
    `kpos_j <= qpos_i` (and `qpos_i - kpos_j < sliding_window` if set, HF PyTorch Mistral semantics).

    query_positions [Sq], key_positions [Sk] are *slot* indices in the (padded) sequence, not RoPE positions.
    """
    allowed = key_positions[None, :] <= query_positions[:, None]  # [Sq, Sk]
    if sliding_window is not None:
        allowed = allowed & (query_positions[:, None] - key_positions[None, :] < sliding_window)
    return allowed[None, None] & key_mask[:, None, None, :].astype(bool)


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, kv_head_major: bool = False
) -> jax.Array:
    """Scaled dot-product attention, grouped-query heads (Vaswani et al. 2017 eq. 1; Ainslie et al. 2023).

    `softmax(q k^T / sqrt(hd) + mask) v` with the logits and softmax in float32.
    q [B, Sq, H, hd]; k, v [B, Sk, KV, hd], or [B, KV, Sk, hd] with `kv_head_major` (the KV cache's layout),
    H a multiple of KV; mask bool [B, 1, Sq, Sk]. Returns [B, Sq, H, hd] in q's dtype.

    With the cache stored head-major the batched dots read k and v in place: with the token-major layout
    XLA:CPU transposed the whole cache row of every block at every generated token (the largest item of a
    tiny3 decode's profile; docs/path_eval.md).
    """
    b, sq, h, hd = q.shape
    kv = k.shape[1 if kv_head_major else 2]
    groups = h // kv
    qg = q.reshape(b, sq, kv, groups, hd)
    kv_axes = "bksd" if kv_head_major else "bskd"
    logits = einsum_f32(f"bqkgd,{kv_axes}->bkgqs", qg, k) / math.sqrt(hd)
    logits = jnp.where(mask[:, :, None], logits, MASK_VALUE)  # mask [B,1,1,Sq,Sk]
    weights = jax.nn.softmax(logits, axis=-1)
    out = einsum_f32(f"bkgqs,{kv_axes}->bqkgd", weights.astype(v.dtype), v)
    return out.reshape(b, sq, h, hd).astype(q.dtype)


def write_cache(cache: tuple, k: jax.Array, v: jax.Array, index) -> tuple:
    """Writes k, v [B, S, KV, hd] into a head-major cache (k, v) [B, KV, S_total, hd] at slots index..index+S-1."""
    start = (0, 0, index, 0)
    k = jax.lax.dynamic_update_slice(cache[0], k.transpose(0, 2, 1, 3).astype(cache[0].dtype), start)
    v = jax.lax.dynamic_update_slice(cache[1], v.transpose(0, 2, 1, 3).astype(cache[1].dtype), start)
    return k, v


def check_attention_mask(input_ids: jax.Array, attention_mask: jax.Array | None) -> None:
    """Raises ValueError unless input_ids is [B, S] and attention_mask is None or of the same shape."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
        )


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Positions [B, S] int32 = `cumsum(mask) - 1` clipped at 0 (left-padded real tokens get 0, 1, ...)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def mask_and_positions(input_ids: jax.Array, attention_mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """`(attention_mask, positions)`, both int [B, S], of `input_ids` [B, S] (checked by `check_attention_mask`):
    all ones and `0 .. S-1` when `attention_mask` is None, else the mask and `positions_from_mask(mask)`."""
    check_attention_mask(input_ids, attention_mask)
    b, s = input_ids.shape
    if attention_mask is None:
        return jnp.ones((b, s), jnp.int32), jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    return attention_mask, positions_from_mask(attention_mask)


def normal_init(key: jax.Array, shape: tuple[int, ...], std: float, dtype=jnp.float32) -> jax.Array:
    """`N(0, std^2)` initialiser (HF's `initializer_range` convention)."""
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def layernorm_block_with_cache(config: ModelConfig, p: dict, h: jax.Array, ctx: dict, cache: tuple | None):
    """Pre-LayerNorm transformer block (GPT-2, ViT; Radford et al. 2019, Dosovitskiy et al. 2021 eq. 2-3):

        h = h + o(attn(q(ln1(h)), k(ln1(h)), v(ln1(h))));   h = h + down(act(up(ln2(h))))

    Args: p: one block (attn_norm, q, k, v, o, mlp_norm, up, down); h [B, S, D]; ctx {"mask": bool
      [B or 1, 1, S, Sk], optional "cache_index"}; cache None or (k, v) [B, H, S_total, hd] (see llama).
    Returns: (h [B, S, D], cache).
    """
    b, s, _ = h.shape
    heads, hd = config.num_heads, config.head_size
    x = layer_norm(p["attn_norm"], h, config.norm_eps)
    q = dense(p["q"], x).reshape(b, s, heads, hd)
    k = dense(p["k"], x).reshape(b, s, heads, hd)
    v = dense(p["v"], x).reshape(b, s, heads, hd)
    if cache is not None:
        cache = write_cache(cache, k, v, ctx["cache_index"])
        attn = attention(q, cache[0], cache[1], ctx["mask"], kv_head_major=True).reshape(b, s, heads * hd)
    else:
        attn = attention(q, k, v, ctx["mask"]).reshape(b, s, heads * hd)
    h = h + dense(p["o"], attn).astype(h.dtype)
    x = layer_norm(p["mlp_norm"], h, config.norm_eps)
    h = h + dense(p["down"], activation(config.hidden_act, dense(p["up"], x))).astype(h.dtype)
    return h, cache


def materialize(spec, key: jax.Array, std: float, dtype) -> dict:
    """Turns a spec pytree of `(kind, shape)` leaves (`kind` in "normal", "ones", "zeros") into arrays.

    Every "normal" leaf is `N(0, std^2)`, all drawn from ONE `jax.random.normal(key, [total])` and sliced, so
    initialising a model compiles one random op instead of one per distinct shape (several seconds on CPU).
    """
    is_leaf = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)  # noqa: E731
    leaves, treedef = jax.tree.flatten(spec, is_leaf=is_leaf)
    sizes = [math.prod(shape) if kind == "normal" else 0 for kind, shape in leaves]
    flat = std * jax.random.normal(key, (sum(sizes),), jnp.float32)
    offsets = np.cumsum([0] + sizes)
    out = []
    for (kind, shape), start, size in zip(leaves, offsets[:-1], sizes, strict=True):
        if kind == "normal":
            out.append(flat[int(start) : int(start) + size].reshape(shape).astype(dtype))
        elif kind == "ones":
            out.append(jnp.ones(shape, dtype))
        elif kind == "zeros":
            out.append(jnp.zeros(shape, dtype))
        else:
            raise ValueError(f"unknown init kind {kind!r}")
    return jax.tree.unflatten(treedef, out)


def dense_spec(shape: tuple[int, ...], bias: bool) -> dict:
    """Spec of a (stacked) dense layer: kernel `shape` normal, bias `shape[:-2] + shape[-1:]` zeros."""
    p = {"kernel": ("normal", shape)}
    if bias:
        p["bias"] = ("zeros", shape[:-2] + shape[-1:])
    return p


def layernorm_blocks_spec(config: ModelConfig, qkv_bias: bool) -> dict:
    """Spec of L stacked pre-LayerNorm blocks (GPT-2 / ViT layout, see `layernorm_block_with_cache`)."""
    n, d, f = config.num_layers, config.hidden_size, config.intermediate_size
    hd = config.num_heads * config.head_size
    norm = {"scale": ("ones", (n, d)), "bias": ("zeros", (n, d))}
    return {
        "attn_norm": norm,
        "q": dense_spec((n, d, hd), qkv_bias),
        "k": dense_spec((n, d, hd), qkv_bias),
        "v": dense_spec((n, d, hd), qkv_bias),
        "o": dense_spec((n, hd, d), True),
        "mlp_norm": dict(norm),
        "up": dense_spec((n, d, f), True),
        "down": dense_spec((n, f, d), True),
    }
