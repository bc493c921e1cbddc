"""Junction alignment between blocks of a layer path (HM3_SPEC "Alignment between blocks").

Feeding block l of source m a hidden state produced by other blocks shifts its input statistics. Before step t
of a path the hidden state is mapped per dimension, `h <- h * scale[t] + shift[t]` (`models.apply_path`'s
junction). Modes:

- `none`: plain stacking (scale 1, shift 0), as a mergekit passthrough frankenmerge.
- `moment`: closed form. With mu_in, sd_in the per-dimension mean/std of the incoming hidden state at step t
  (measured on calibration data by running the path, earlier junctions applied) and mu_nat, sd_nat those of
  block p's native input (measured once per pool block by running its own source model on the same data),
      scale = sd_nat / max(sd_in, eps),   shift = mu_nat - scale * mu_in,
  so the mapped state has exactly the native per-dimension mean and std on the calibration data.
- `learned`: the paper's W(m, l, t): an MLP of [emb_m(m); emb_l(l); emb_t(t)] outputs a diagonal scale
  (1 + output, so zero init is the identity) and shift, fitted with Adam on
      Deep CORAL (Sun & Saenko 2016)   ||C(h') - C_nat||_F^2 / (4 d^2) / v^2
    + mean matching                    ||mu(h') - mu_nat||^2 / d / v
  for h' the mapped hidden state at every junction of a set of training paths (the incoming state is
  `stop_gradient`ed, so every junction is fitted to the distribution the earlier ones produce), with
  v = mean_i sd_nat_i^2 the native input's mean variance at that junction. Dividing by v makes each junction's
  loss scale-free (our choice; the paper gives no normalisation): without it the loss is dominated by deep
  junctions (hidden std ~1) and one shared MLP gives the junction after the embeddings (std ~0.02 on tiny3)
  shifts as large as the embeddings themselves, which destroyed every stitched path's scores on tiny3
  (benchmarks/alignment.py, docs/paths.md).

Both fitted modes skip (identity) a step whose previous step is the block's native predecessor: block l-1 of
the same source, or, for l = 0 at the first step, the embeddings when the shell belongs to that source
(`shell_source`). So an expert's own identity path gets identity junctions and keeps the expert's outputs.
Statistics are over real tokens (calibration mask) of the calibration batch, from the search split only.

The junction of a path is a deterministic function of the path and the fitted (fixed) calibration data or
MLP; `Aligner.junctions` stores it per path, so a path model's outputs never depend on the batch it is
evaluated with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from hm3_jax import models
from hm3_jax.models.config import ModelConfig

MODES = ("none", "moment", "learned")
_EPS = 1e-6


class NativeStats(NamedTuple):
    """Native input statistics of every pool block: mean, std [P, D] and covariance cov [P, D, D]."""

    mean: jax.Array
    std: jax.Array
    cov: jax.Array


def masked_moments(h: jax.Array, weight: jax.Array):
    """Per-dimension mean/std and covariance of hidden states over real tokens.

    Args: h [B, S, D]; weight [B, S] (1 = real token).
    Returns: mean [D], std [D] (population), cov [D, D] (population: sum w (x - mu)(x - mu)^T / sum w).
    """
    h = h.astype(jnp.float32)
    w = weight.astype(jnp.float32)[..., None]
    n = jnp.maximum(w.sum(), 1.0)
    mean = (h * w).sum(axis=(0, 1)) / n
    centred = (h - mean) * jnp.sqrt(w)
    cov = jnp.einsum("bsd,bse->de", centred, centred) / n
    std = jnp.sqrt(jnp.maximum(jnp.diagonal(cov), 0.0))
    return mean, std, cov


def coral_loss(cov_source: jax.Array, cov_target: jax.Array) -> jax.Array:
    """Deep CORAL (Sun & Saenko 2016, eq. 1): ||C_S - C_T||_F^2 / (4 d^2). cov_* [D, D] -> scalar."""
    d = cov_source.shape[-1]
    return jnp.sum((cov_source - cov_target) ** 2) / (4.0 * d * d)


def _weights(calib_ids, calib_mask):
    ids = jnp.asarray(calib_ids, jnp.int32)
    if ids.ndim != 2:
        raise ValueError(f"calibration ids must be [B, S], got shape {ids.shape}")
    mask = jnp.ones(ids.shape, jnp.int32) if calib_mask is None else jnp.asarray(calib_mask, jnp.int32)
    if mask.shape != ids.shape:
        raise ValueError(f"calibration mask shape {mask.shape} != ids shape {ids.shape}")
    return ids, mask


def native_stats(config: ModelConfig, source_shells: Sequence[dict], pool: dict, calib_ids, calib_mask=None):
    """Input statistics of every pool block under its own source model.

    Args:
      config: ModelConfig (L = config.num_layers blocks per source).
      source_shells: one shell per source m (embeddings of source m), len = P / L.
      pool: stacked blocks [P, ...] or a parted pool (`models.pool`), pool index m * L + l.
      calib_ids: int [B, S] calibration inputs (search split); calib_mask [B, S] or None.
    Returns: NativeStats with rows indexed by pool index.
    """
    num_layers = config.num_layers
    size = models.pool_size(pool)
    if size != len(source_shells) * num_layers:
        raise ValueError(
            f"pool has {size} blocks but {len(source_shells)} source shells x {num_layers} layers were given"
        )
    ids, mask = _weights(calib_ids, calib_mask)

    @jax.jit
    def one_source(shell, blocks):
        h, ctx = models.embed(config, shell, ids, mask)

        def step(h, p):
            stats = masked_moments(h, mask)
            return models.block(config, p, h, ctx), stats

        return jax.lax.scan(step, h, blocks)[1]

    rows = []
    for m, shell in enumerate(source_shells):
        if models.is_parted(pool):  # source m's own blocks
            blocks = pool[m]
        else:
            blocks = jax.tree.map(lambda x, m=m: x[m * num_layers : (m + 1) * num_layers], pool)
        rows.append(one_source(shell, blocks))
    mean, std, cov = (jnp.concatenate(parts) for parts in zip(*rows, strict=True))
    return NativeStats(mean=mean, std=std, cov=cov)


def _is_native(p, prev, num_layers: int, shell_source: int | None):
    """Whether step p (pool index) follows its native predecessor (prev = previous real step, -1 = embed)."""
    follows_block = (p % num_layers != 0) & (prev == p - 1)
    if shell_source is None:
        return follows_block
    follows_embed = (p % num_layers == 0) & (prev == -1) & (p // num_layers == shell_source)
    return follows_block | follows_embed


def _chunked(fn, paths: np.ndarray, chunk_size: int):
    """Applies a jitted fn([chunk, T]) to fixed-size chunks (last padded by repetition); concatenates."""
    n = paths.shape[0]
    outs = []
    for start in range(0, n, chunk_size):
        rows = np.arange(start, min(start + chunk_size, n))
        rows = np.concatenate([rows, np.full(chunk_size - rows.size, rows[-1])])
        out = fn(jnp.asarray(paths[rows]))
        keep = min(chunk_size, n - start)
        outs.append(jax.tree.map(lambda a, m=keep: np.asarray(a)[:m], out))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


def make_moment_fn(config: ModelConfig, shell_source: int | None):
    """jittable fn(shell, pool, stats, ids, mask, path [T]) -> (scale, shift) [T, D] (moment matching)."""
    num_layers = config.num_layers

    def fn(shell, pool, stats, ids, mask, path):
        h, ctx = models.embed(config, shell, ids, mask)

        def step(carry, p):
            h, prev = carry
            mu_in, sd_in, _ = masked_moments(h, mask)
            pc = jnp.maximum(p, 0)
            skip = (p < 0) | _is_native(p, prev, num_layers, shell_source)
            scale = stats.std[pc] / jnp.maximum(sd_in, _EPS)
            shift = stats.mean[pc] - scale * mu_in
            scale = jnp.where(skip, 1.0, scale).astype(h.dtype)
            shift = jnp.where(skip, 0.0, shift).astype(h.dtype)

            def run(h):
                bp = models.pool_block(pool, pc)
                return models.block(config, bp, (h * scale + shift).astype(h.dtype), ctx)

            h = jax.lax.cond(p >= 0, run, lambda h: h, h)
            return (h, jnp.where(p >= 0, p, prev)), (scale, shift)

        _, (scale, shift) = jax.lax.scan(step, (h, jnp.int32(-1)), path.astype(jnp.int32))
        return scale, shift

    return fn


# ------------------------------------------------------------------------------------------------ learned
def init_learned(
    key,
    num_sources: int,
    num_layers: int,
    t_max: int,
    hidden_size: int,
    embed_dim: int = 16,
    mlp_dim: int = 64,
) -> dict:
    """Params of the junction MLP W(m, l, t): embeddings [num_*, embed_dim], a hidden layer, a zero output.

    The zero-initialised output layer makes the initial junction the identity (scale 1, shift 0).
    """
    k_m, k_l, k_t, k_h = jax.random.split(key, 4)
    std = 1.0 / np.sqrt(embed_dim)
    return {
        "emb_m": jax.random.normal(k_m, (num_sources, embed_dim)) * std,
        "emb_l": jax.random.normal(k_l, (num_layers, embed_dim)) * std,
        "emb_t": jax.random.normal(k_t, (t_max, embed_dim)) * std,
        "hidden": {
            "kernel": jax.random.normal(k_h, (3 * embed_dim, mlp_dim)) / np.sqrt(3 * embed_dim),
            "bias": jnp.zeros(mlp_dim),
        },
        "out": {"kernel": jnp.zeros((mlp_dim, 2 * hidden_size)), "bias": jnp.zeros(2 * hidden_size)},
    }


def learned_rows(params: dict, m, l, t):
    """W(m, l, t): int m, l, t (any equal shapes [...]) -> (scale, shift) [..., D]."""
    x = jnp.concatenate([params["emb_m"][m], params["emb_l"][l], params["emb_t"][t]], axis=-1)
    x = jax.nn.gelu(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    out = x @ params["out"]["kernel"] + params["out"]["bias"]
    d = out.shape[-1] // 2
    return 1.0 + out[..., :d], out[..., d:]


def make_learned_fn(config: ModelConfig, shell_source: int | None, with_skip: bool = False):
    """jittable fn(params, path [T]) -> (scale, shift) [T, D]; identity on padding and native steps.

    With `with_skip`, also returns skip bool [T] (the steps left at identity).
    """
    num_layers = config.num_layers

    def fn(params, path):
        path = path.astype(jnp.int32)
        real = path >= 0
        # previous real step of every step (-1 = the embeddings)
        idx = jnp.where(real, jnp.arange(path.shape[0]), -1)
        last_real = jax.lax.cummax(idx)
        prev_idx = jnp.concatenate([jnp.array([-1]), last_real[:-1]])
        prev = jnp.where(prev_idx >= 0, path[jnp.maximum(prev_idx, 0)], -1)
        pc = jnp.maximum(path, 0)
        scale, shift = learned_rows(params, pc // num_layers, pc % num_layers, jnp.arange(path.shape[0]))
        skip = (~real) | _is_native(path, prev, num_layers, shell_source)
        scale, shift = jnp.where(skip[:, None], 1.0, scale), jnp.where(skip[:, None], 0.0, shift)
        return (scale, shift, skip) if with_skip else (scale, shift)

    return fn


def fit_learned(
    key,
    config: ModelConfig,
    shell: dict,
    pool: dict,
    stats: NativeStats,
    calib_ids,
    train_paths,
    calib_mask=None,
    *,
    shell_source: int | None = None,
    num_steps: int = 200,
    learning_rate: float = 3e-3,
    batch_paths: int = 8,
    embed_dim: int = 16,
    mlp_dim: int = 64,
):
    """Fits the junction MLP with the CORAL + mean loss (module docstring) on `train_paths`.

    Args:
      key: PRNG key (MLP init and minibatch sampling).
      config, shell (the path's embeddings), pool, stats (from `native_stats`), calib_ids [B, S].
      train_paths: int [N, T_max] paths whose junctions are fitted (e.g. sampled from the pool or a policy).
      calib_mask: [B, S] or None; shell_source: see module docstring; num_steps, learning_rate (Adam),
      batch_paths: paths per step (all of them, in order, when >= N).
    Returns: (params, losses np [num_steps]).
    """
    train_paths = np.asarray(train_paths, np.int32)
    if train_paths.ndim != 2 or train_paths.shape[0] == 0:
        raise ValueError(f"train_paths must be a non-empty [N, T_max] int array, got {train_paths.shape}")
    ids, mask = _weights(calib_ids, calib_mask)
    num_layers, t_max = config.num_layers, train_paths.shape[1]
    num_sources = models.pool_size(pool) // num_layers
    key_init, key_batches = jax.random.split(key)
    params = init_learned(key_init, num_sources, num_layers, t_max, config.hidden_size, embed_dim, mlp_dim)
    rows_fn = make_learned_fn(config, shell_source, with_skip=True)
    optimizer = optax.adam(learning_rate)

    def path_loss(params, path):
        scale, shift, skip = rows_fn(params, path)
        h, ctx = models.embed(config, shell, ids, mask)

        def step(h, xs):
            p, s, b, skipped = xs
            pc = jnp.maximum(p, 0)
            hj = jax.lax.stop_gradient(h) * s + b
            mu, _, cov = masked_moments(hj, mask)
            # scale-free: divided by the native input's mean variance v (CORAL by v^2), so a junction after the
            # embeddings (std ~0.02 on tiny3) weighs as much as one deep in the residual stream (std ~1)
            var = jnp.maximum(jnp.mean(stats.std[pc] ** 2), _EPS)
            loss = coral_loss(cov, stats.cov[pc]) / var**2 + jnp.mean((mu - stats.mean[pc]) ** 2) / var
            active = ~skipped
            bp = models.pool_block(pool, pc)
            h_next = jnp.where(p >= 0, models.block(config, bp, hj.astype(h.dtype), ctx), h)
            return h_next, (jnp.where(active, loss, 0.0), active)

        _, (losses, active) = jax.lax.scan(step, h, (path, scale, shift, skip))
        return losses.sum(), active.sum()

    @jax.jit
    def train_step(params, opt_state, paths):
        def loss_fn(params):
            total, count = jax.lax.map(lambda p: path_loss(params, p), paths)
            return total.sum() / jnp.maximum(count.sum(), 1)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    losses = []
    for i, k in enumerate(jax.random.split(key_batches, num_steps)):
        if batch_paths >= train_paths.shape[0]:  # full batch: every step sees every path
            rows = np.arange(train_paths.shape[0])
        else:
            rows = np.asarray(jax.random.choice(k, train_paths.shape[0], (batch_paths,), replace=False))
        params, opt_state, loss = train_step(params, opt_state, jnp.asarray(train_paths[rows]))
        losses.append(float(loss))
        if i % 50 == 0 or i == num_steps - 1:
            logging.info("learned alignment step %d/%d loss %.5f", i + 1, num_steps, losses[-1])
    return params, np.asarray(losses)


# ------------------------------------------------------------------------------------------------ aligner
class Aligner:
    """Junction arrays per path for one mode; fitted once, then a fixed function of the path.

    `junctions(paths [N, T_max]) -> None (mode "none") or {"scale", "shift"} np.float32 [N, T_max, D]`.
    Rows are cached per path, so a path's junction is computed once and stored with it.
    """

    def __init__(self, mode, fn, chunk_size):
        self.mode, self._fn, self.chunk_size, self._store = mode, fn, chunk_size, {}

    def junctions(self, paths):
        if self.mode == "none":
            return None
        paths = np.asarray(paths, np.int32)
        if paths.ndim != 2:
            raise ValueError(f"paths must be [N, T_max], got shape {paths.shape}")
        keys = [p.tobytes() + bytes([paths.shape[1] % 256]) for p in paths]
        todo = sorted({i for i, k in enumerate(keys) if k not in self._store})
        todo_rows = list({keys[i]: i for i in todo}.values())
        if todo_rows:
            scale, shift = _chunked(self._fn, paths[np.asarray(todo_rows)], self.chunk_size)
            for j, i in enumerate(todo_rows):
                self._store[keys[i]] = (scale[j], shift[j])
        scale = np.stack([self._store[k][0] for k in keys]).astype(np.float32)
        shift = np.stack([self._store[k][1] for k in keys]).astype(np.float32)
        return {"scale": scale, "shift": shift}


def make_aligner(
    mode: str,
    config: ModelConfig,
    shell: dict,
    pool: dict,
    *,
    stats: NativeStats | None = None,
    calib_ids=None,
    calib_mask=None,
    shell_source: int | None = None,
    learned_params: dict | None = None,
    chunk_size: int = 8,
) -> Aligner:
    """An Aligner for `mode` in ("none", "moment", "learned").

    Args:
      mode: alignment mode; config, shell (the path's embeddings), pool.
      stats: NativeStats (moment) — from `native_stats` on the same calibration data.
      calib_ids [B, S] / calib_mask: calibration inputs (moment).
      shell_source: which source's embeddings `shell` is (its l = 0 blocks then follow natively), or None.
      learned_params: from `fit_learned` (learned).
      chunk_size: paths per compiled call.
    """
    if mode not in MODES:
        raise ValueError(f"alignment mode {mode!r} is not one of {MODES}")
    if mode == "none":
        return Aligner(mode, None, chunk_size)
    if mode == "moment":
        if stats is None or calib_ids is None:
            raise ValueError("moment alignment needs stats (native_stats) and calib_ids")
        ids, mask = _weights(calib_ids, calib_mask)
        moment = make_moment_fn(config, shell_source)
        # the model, statistics and calibration data are jit arguments, not closed-over constants (XLA would
        # constant-fold through them at compile time, seconds for a tiny3-sized pool)
        compiled = jax.jit(
            lambda sh, po, st, i, m, paths: jax.lax.map(lambda p: moment(sh, po, st, i, m, p), paths)
        )
        return Aligner(mode, lambda paths: compiled(shell, pool, stats, ids, mask, paths), chunk_size)
    if learned_params is None:
        raise ValueError("learned alignment needs learned_params (fit_learned)")
    rows = make_learned_fn(config, shell_source)
    compiled = jax.jit(lambda params, paths: jax.lax.map(lambda p: rows(params, p), paths))
    return Aligner(mode, lambda paths: compiled(learned_params, paths), chunk_size)
