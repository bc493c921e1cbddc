"""Per-tensor merge kernels: float32 arithmetic on one tensor of every model.

Every kernel has the signature `kernel(key, base, thetas, weights) -> merged` (after its hyperparameters are
bound with `functools.partial`):

* `key`: a PRNG key for this tensor (DARE only; ignored otherwise),
* `base`: float32 `[...]`, the base model's tensor (ignored by `linear`),
* `thetas`: float32 `[K, ...]`, the K fine-tuned models' tensors,
* `weights`: float32 `[K]`, one weight per model for this tensor,

and returns float32 `[...]`. A tensor is the unit that magnitude trimming, SLERP and PCB's normalisations act
on, as in mergekit (which works on Hugging Face tensors one by one); the pytree functions in `api.py` vmap
these kernels over the leading axis of stacked `blocks/...` leaves so that each block is its own tensor
there too.

Notation: task vector `delta_k = theta_k - base`; `w_k` the k-th weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from hm3_jax.merging.topk import mask_from_threshold, topk_magnitude_mask


def _bcast(weights: jax.Array, ndim: int) -> jax.Array:
    """`[K]` -> `[K, 1, ..., 1]` to broadcast against a `[K, ...]` stack of `ndim` dims."""
    return weights.reshape(weights.shape + (1,) * (ndim - 1))


def _sum_models(x: jax.Array) -> jax.Array:
    """`sum_k x[k]` over the leading (model) axis, as `x[0] + x[1] + ...` in that order: XLA's CPU reduce
    over a non-minor axis is about 20x slower than these elementwise adds."""
    total = x[0]
    for k in range(1, x.shape[0]):
        total = total + x[k]
    return total


def per_model(value: float | Sequence[float], num_models: int) -> tuple[float, ...]:
    """A hyperparameter given once or per model as one float per model: `(value,) * num_models` for a scalar,
    else `value` as floats (kernels, the streaming merger and its host thresholds share this reading)."""
    if isinstance(value, int | float):
        return (float(value),) * num_models
    return tuple(float(v) for v in value)


def dare(
    key: jax.Array, delta: jax.Array, drop_rate: float, rescale: bool = True, keep: jax.Array | None = None
) -> jax.Array:
    """DARE drop-and-rescale (Yu et al. 2024, Eq. 2):
    `m ~ Bernoulli(p)`, `delta' = (1 - m) * delta / (1 - p)`.

    Args:
      key: PRNG key.
      delta: float32 `[...]` task vector.
      drop_rate: p in [0, 1). `p = 0` returns `delta` unchanged.
      rescale: divide survivors by `1 - p` (mergekit's `rescale`, default on for DARE).
      keep: the survivors `1 - m`, bool like `delta`, if already drawn (`dare_keep_mask`, the streaming merge
        draws it once per tensor and applies it chunk by chunk); default drawn here from `key`.
    """
    if drop_rate <= 0.0:
        return delta
    if keep is None:
        keep = dare_keep_mask(key, drop_rate, delta.shape)
    kept = delta / (1.0 - drop_rate) if rescale else delta
    return jnp.where(keep, kept, 0.0)


def dare_keep_mask(key: jax.Array, drop_rate: float, shape: tuple[int, ...]) -> jax.Array:
    """DARE's survivors `1 - m`, `m ~ Bernoulli(drop_rate)`: bool `shape`."""
    return jax.random.bernoulli(key, 1.0 - drop_rate, shape)


def elect_sign_mask(weighted_deltas: jax.Array, consensus: str = "sum") -> jax.Array:
    """TIES "elect" (Yadav et al. 2023, Eq. 2): `gamma = sign(sum_k w_k delta_k)` (0 counts as +), and the
    mask `sign(w_k delta_k) == gamma` (entries trimmed to 0 never agree). `consensus="count"` elects by the
    number of positive vs negative entries instead (mergekit's `count`).

    Args:
      weighted_deltas: float32 `[K, ...]`.
    Returns:
      bool `[K, ...]`.
    """
    signs = jnp.sign(weighted_deltas)
    if consensus == "sum":
        total = _sum_models(weighted_deltas)
    elif consensus == "count":
        total = _sum_models(signs)
    else:
        raise ValueError(f"consensus must be 'sum' or 'count', got {consensus!r}")
    elected = jnp.where(total >= 0, 1.0, -1.0)
    return signs == elected


def _weighted_sum(weighted: jax.Array, weights: jax.Array, normalize: bool) -> jax.Array:
    """`sum_k w_k x_k`, divided by `sum_k w_k` if `normalize` (a sum below 1e-8 in magnitude divides by 1)."""
    merged = _sum_models(weighted)
    if normalize:
        divisor = jnp.sum(weights)
        merged = merged / jnp.where(jnp.abs(divisor) < 1e-8, 1.0, divisor)
    return merged


def _disjoint_merge(weighted: jax.Array, weights: jax.Array, mask: jax.Array, normalize: bool) -> jax.Array:
    """TIES "disjoint merge" (Eq. 3): `sum_k m_k w_k delta_k / sum_k m_k w_k` (0 divisor -> 1)."""
    merged = _sum_models(jnp.where(mask, weighted, 0.0))
    if normalize:
        divisor = _sum_models(jnp.where(mask, _bcast(weights, mask.ndim), 0.0))
        merged = merged / jnp.where(divisor == 0, 1.0, divisor)
    return merged


def linear(key, base, thetas, weights, *, normalize: bool = True):
    """Weighted average (Wortsman et al. 2022, model soups): `sum_k w_k theta_k / sum_k w_k`.

    The base model is not used (mergekit's `linear`); `normalize=False` drops the division.
    """
    del key, base
    return _weighted_sum(thetas * _bcast(weights, thetas.ndim), weights, normalize)


def task_arithmetic(key, base, thetas, weights, *, scale: float = 1.0, normalize: bool = False):
    """Task arithmetic (Ilharco et al. 2023, Eq. 1): `base + scale * sum_k w_k delta_k`
    (divided by `sum_k w_k` if `normalize`)."""
    del key
    deltas = thetas - base
    return base + scale * _weighted_sum(deltas * _bcast(weights, deltas.ndim), weights, normalize)


def ties(
    key,
    base,
    thetas,
    weights,
    *,
    density: float | Sequence[float] = 1.0,
    scale: float = 1.0,
    normalize: bool = True,
    consensus: str = "sum",
    trim: jax.Array | None = None,
    offset: jax.Array | int = 0,
):
    """TIES-merging (Yadav et al. 2023, Eqs. 1-3): trim each `delta_k` to its top-`density` magnitudes,
    elect a sign per entry from `sum_k w_k delta_k`, and take the disjoint (weighted) mean of the agreeing
    entries: `base + scale * sum_k m_k w_k delta_k / sum_k m_k w_k`.

    `density` is the fraction kept (a float or one per model); `normalize=False` skips the division
    (mergekit's `normalize`, default True for TIES).

    `trim` (uint32 `[K, 2]`, one `topk_threshold` pair per model) and `offset` let the streaming merge apply
    the trim to a flat chunk of a tensor whose exact thresholds were computed beforehand; everything else
    is elementwise, so a chunk gives the same entries as the whole tensor.
    """
    del key
    deltas = thetas - base
    if trim is None:
        densities = per_model(density, deltas.shape[0])
        masks = [topk_magnitude_mask(d, dens) for d, dens in zip(deltas, densities, strict=True)]
    else:
        masks = [mask_from_threshold(d, trim[i], offset) for i, d in enumerate(deltas)]
    trimmed = jnp.stack([jnp.where(m, d, 0.0) for m, d in zip(masks, deltas, strict=True)])
    weighted = trimmed * _bcast(weights, trimmed.ndim)
    mask = elect_sign_mask(weighted, consensus)
    return base + scale * _disjoint_merge(weighted, weights, mask, normalize)


def dare_deltas(key, deltas, drop_rate, rescale, keep=None):
    """`DARE_{p_k}(delta_k)` for every model k of `deltas` `[K, ...]`: model k's drop mask is drawn with
    `fold_in(key, k)`, or read from `keep[k]` when `keep` `[K, ...]` is given (key then unused); `drop_rate` is
    one rate or one per model (`per_model`). Shared by `dare_linear`, `dare_ties` and the streaming merger's
    TIES thresholds (`chunked.trim_magnitude_bits`)."""
    rates = per_model(drop_rate, deltas.shape[0])
    return jnp.stack(
        [
            dare(
                None if (keep is not None or p <= 0.0) else jax.random.fold_in(key, i),
                d,
                p,
                rescale,
                None if keep is None else keep[i],
            )
            for i, (d, p) in enumerate(zip(deltas, rates, strict=True))
        ]
    )


def dare_linear(
    key,
    base,
    thetas,
    weights,
    *,
    drop_rate: float | Sequence[float] = 0.0,
    scale: float = 1.0,
    normalize: bool = False,
    rescale: bool = True,
    keep: jax.Array | None = None,
):
    """DARE + task arithmetic (Yu et al. 2024): `base + scale * sum_k w_k DARE_p(delta_k)`.

    The k-th model's drop mask is drawn with `fold_in(key, k)` (`keep` `[K, ...]`: already drawn).
    """
    deltas = dare_deltas(key, thetas - base, drop_rate, rescale, keep)
    return base + scale * _weighted_sum(deltas * _bcast(weights, deltas.ndim), weights, normalize)


def dare_ties(
    key,
    base,
    thetas,
    weights,
    *,
    drop_rate: float | Sequence[float] = 0.0,
    density: float | Sequence[float] = 1.0,
    scale: float = 1.0,
    normalize: bool = False,
    rescale: bool = True,
    consensus: str = "sum",
    keep: jax.Array | None = None,
    trim: jax.Array | None = None,
    offset: jax.Array | int = 0,
):
    """DARE + TIES (HM3_SPEC Eq. 5; Yu et al. 2024): `delta_k' = DARE_p(delta_k)`, then TIES on `delta_k'`
    (trim to top-`density`, elect signs, disjoint merge):
    `base + scale * sum_k m_k w_k delta_k' [/ sum m_k w_k]`.

    Differs from mergekit's `dare_ties` only in naming: here `drop_rate` is DARE's p and `density` is the TIES
    trim (default 1 = no trim, which is mergekit's `dare_ties`, whose `density` is our `1 - drop_rate`).
    The k-th model's drop mask is drawn with `fold_in(key, k)` (`keep`, `trim`, `offset`: as in `dare_linear`
    and `ties`, for the streaming merge's chunks).
    """
    deltas = dare_deltas(key, thetas - base, drop_rate, rescale, keep)
    return (
        ties(
            None,
            jnp.zeros_like(base),
            deltas,
            weights,
            density=density,
            scale=1.0,
            normalize=normalize,
            consensus=consensus,
            trim=trim,
            offset=offset,
        )
        * scale
        + base
    )


def slerp(key, base, thetas, weights, *, dot_threshold: float = 0.9995, eps: float = 1e-8):
    """Spherical linear interpolation between `v0 = base` and `v1 = thetas[0]` at `t = weights[0]`
    (Shoemake 1985; mergekit's `slerp`): with `cos(theta0) = <v0/|v0|, v1/|v1|>`,
    `out = sin((1-t) theta0)/sin(theta0) v0 + sin(t theta0)/sin(theta0) v1`, falling back to
    `(1-t) v0 + t v1` when `|cos(theta0)| > dot_threshold`. The whole tensor is one vector.
    """
    del key
    v0, v1 = base, thetas[0]
    t = weights[0]
    norm0 = jnp.linalg.norm(v0.reshape(-1))
    norm1 = jnp.linalg.norm(v1.reshape(-1))
    u0 = jnp.where(norm0 > eps, v0 / jnp.where(norm0 > eps, norm0, 1.0), v0)
    u1 = jnp.where(norm1 > eps, v1 / jnp.where(norm1 > eps, norm1, 1.0), v1)
    dot = jnp.sum(u0 * u1)
    lerp = (1.0 - t) * v0 + t * v1
    colinear = jnp.abs(dot) > dot_threshold
    theta0 = jnp.arccos(jnp.where(colinear, 0.0, dot))
    sin0 = jnp.where(colinear, 1.0, jnp.sin(theta0))
    s0 = jnp.sin(theta0 - theta0 * t) / sin0
    s1 = jnp.sin(theta0 * t) / sin0
    return jnp.where(colinear, lerp, s0 * v0 + s1 * v1)


def consensus(
    key,
    base,
    thetas,
    weights,
    *,
    base_method: str = "task_arithmetic",
    k: int = 2,
    tall_lambda: float | Sequence[float] = 0.4,
    density: float | Sequence[float] = 1.0,
    scale: float = 1.0,
    normalize: bool | None = None,
    consensus: str = "sum",
):
    """Consensus merging with TALL masks (Wang et al., ICML 2024, Eqs. 4 and 6).

    With weighted task vectors `tau_t = w_t delta_t` and the multi-task vector `tau_MTL = sum_t tau_t`:
    TALL mask `m_t = 1{|tau_t| >= lambda_t |tau_MTL - tau_t|}`; consensus mask `m = 1{sum_t m_t >= k}`
    (drops "selfish" weights used by fewer than k tasks and "catastrophic" ones used by none);
    result `base + scale * m * merged_delta`, where `merged_delta` is the `base_method`'s merged task vector
    (`"task_arithmetic"`: `sum_t tau_t`; `"ties"`: the TIES merge with `density`).
    `normalize` defaults to the base method's default (False for task arithmetic, True for TIES).
    """
    del key
    deltas = thetas - base
    num_models = deltas.shape[0]
    weighted = deltas * _bcast(weights, deltas.ndim)
    tau_mtl = _sum_models(weighted)
    lambdas = jnp.asarray(per_model(tall_lambda, num_models), jnp.float32)
    tall = jnp.abs(weighted) >= _bcast(lambdas, deltas.ndim) * jnp.abs(tau_mtl - weighted)
    keep = _sum_models(tall.astype(jnp.int32)) >= k
    zeros = jnp.zeros_like(base)
    if base_method == "task_arithmetic":
        merged = task_arithmetic(None, zeros, deltas, weights, normalize=bool(normalize))
    elif base_method == "ties":
        norm = True if normalize is None else normalize
        merged = ties(None, zeros, deltas, weights, density=density, normalize=norm, consensus=consensus)
    else:
        raise ValueError(f"consensus base_method must be 'task_arithmetic' or 'ties', got {base_method!r}")
    return base + scale * jnp.where(keep, merged, 0.0)


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows of `[K, n]` divided by their L2 norm (torch `F.normalize(dim=1)`)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def pcb(key, base, thetas, weights, *, density: float = 0.2, scale: float = 1.0):
    """Parameter Competition Balancing (Du et al., NeurIPS 2024, Sec. 3.2, Eqs. 2-6), per tensor.

    With `delta_i = w_i (theta_i - base)` flattened to `[n]` and N models:
    intra-balancing `beta_intra_i = softmax(N * Norm(delta_i * delta_i))`,
    inter-balancing `beta_inter_i = sum_j softmax(Norm(delta_i * delta_j))`,
    `beta_i = beta_intra_i * beta_inter_i`; drop: `m_i` keeps the top-`density` fraction of `beta_i`;
    `hat_beta_i = m_i * beta_i`; merge: `base + scale * sum_i hat_beta_i delta_i / sum_i hat_beta_i`
    (elementwise; 0 where every `hat_beta_i` is 0). `Norm` is L2 normalisation over the tensor, as in
    mergekit. mergekit divides by the scalar `sum(hat_beta)` over all entries instead of the paper's
    elementwise sum; we follow the paper's Eq. 6.
    """
    del key
    deltas = (thetas - base) * _bcast(weights, thetas.ndim)
    num_models = deltas.shape[0]
    flat = deltas.reshape(num_models, -1)  # [N, n]
    b_intra = jax.nn.softmax(num_models * _l2_normalize(flat * flat), axis=-1)
    b_inter = jnp.sum(jax.nn.softmax(_l2_normalize(flat[:, None, :] * flat[None, :, :]), axis=-1), axis=1)
    beta = b_intra * b_inter  # [N, n], positive
    mask = jnp.stack([topk_magnitude_mask(b, density) for b in beta])
    beta_hat = jnp.where(mask, beta, 0.0)
    total = jnp.sum(beta_hat, axis=0)
    merged = jnp.sum(beta_hat * flat, axis=0) / jnp.where(total > 0, total, 1.0)
    return base + scale * merged.reshape(base.shape)
