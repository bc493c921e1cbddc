"""Layer paths over a pool of blocks (HM3's architecture space, HM3_SPEC "Path evaluation engine").

A pool holds the blocks of several source models, stacked on one leading axis (`make_pool`) or as the sources'
own parts (`make_parted_pool`, no copy; pool.py): pool index of (source m, block l) is `m * L + l`. A path is
an int32 array `[T_max]` of pool indices with `-1` as padding.
The forward along a path (HM3 eq. for the inference path alpha = ((m_1, l_1), ..., (m_T, l_T))) is

    h_0 = embed(x);  h_t = block_{path[t]}(h_{t-1} * scale[t] + shift[t])  if path[t] >= 0 else h_{t-1};
    outputs = head(h_{T_max})

with embeddings and head from the shell (the merged model Theta(lambda) in HM3). `lax.scan` runs over the
path, gathering one block per step with a dynamic index, so the path is a traced argument and a new path never
recompiles. Padding steps are skipped with `lax.cond` (no block compute; under `vmap` both branches run).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax.models import gpt2, llama, vit
from hm3_jax.models.config import ModelConfig
from hm3_jax.models.pool import pool_block, pool_size

_FAMILY_MODULES = {"llama": llama, "gpt2": gpt2, "vit": vit}


def family_module(config: ModelConfig):
    """The module (`llama`, `gpt2`, `vit`) implementing `config.family`'s embed, block and head."""
    if config.family not in _FAMILY_MODULES:
        raise ValueError(f"unsupported family {config.family!r}; supported: llama, gpt2, vit")
    return _FAMILY_MODULES[config.family]


def validate_path(path, num_blocks: int) -> None:
    """Host-side check of a concrete path: 1-D int, entries in `[-1, num_blocks)`. Raises ValueError."""
    arr = np.asarray(path)
    if arr.ndim != 1:
        raise ValueError(f"path must be 1-D [T_max], got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"path must hold integers, got dtype {arr.dtype}")
    bad = np.nonzero((arr < -1) | (arr >= num_blocks))[0]
    if bad.size:
        raise ValueError(
            f"path index {int(arr[bad[0]])} at step {int(bad[0])} is outside the pool of {num_blocks} blocks "
            "(valid: -1 for padding, 0..P-1)"
        )


def path_from_pairs(pairs: Sequence[tuple[int, int]], num_layers: int, t_max: int) -> np.ndarray:
    """((m, l), ...) -> int32 [t_max] pool indices `m * L + l`, padded with -1."""
    if len(pairs) > t_max:
        raise ValueError(f"path of length {len(pairs)} exceeds t_max={t_max}")
    out = np.full((t_max,), -1, np.int32)
    for t, (m, l) in enumerate(pairs):
        if not 0 <= l < num_layers or m < 0:
            raise ValueError(f"step {t}: (m={m}, l={l}) is not a valid (source, layer) with L={num_layers}")
        out[t] = m * num_layers + l
    return out


def identity_path(num_layers: int, t_max: int | None = None, source: int = 0) -> np.ndarray:
    """The path that runs source `source`'s blocks 0..L-1 in order, padded with -1 to `t_max`."""
    return path_from_pairs([(source, l) for l in range(num_layers)], num_layers, t_max or num_layers)


def is_concrete(x) -> bool:
    """Whether `x` is a concrete value (not a tracer under jit): host-side checks can read it."""
    return not isinstance(x, jax.core.Tracer)


def run_path(
    config: ModelConfig, pool: dict, path: jax.Array, h: jax.Array, ctx, junction=None, uniform: bool = False
) -> jax.Array:
    """Runs the hidden state through the path's blocks (no embed/head). h [B, S, D] -> [B, S, D].

    Without a junction the blocks see h as it is; the identity junction (scale 1, shift 0) gives the same
    values except that a -0.0 entry would enter as +0.0 (`-0.0 * 1 + 0 = +0`), so the path engine, decoding and
    this function all skip the affine map when there is no junction (it cost ~2% of the engine's CPU time).

    `uniform`: no data-dependent branch. A padding step (-1) then runs block 0 and `jnp.where` keeps h, instead
    of `lax.cond` skipping it: the same values, more work. For model-parallel meshes, where the devices of
    different path groups would otherwise take different branches around the partitioner's collectives (the
    CPU runtime's rendezvous then waits for all devices and aborts; paths/sharded.py)."""
    module = family_module(config)
    affine = None if junction is None else (junction["scale"], junction["shift"])

    def step(h, xs):
        idx, rows = xs

        def run(h):
            p = pool_block(pool, idx)
            if rows is not None:  # without a junction no affine map at all (not h * 1 + 0: see the docstring)
                h = (h * rows[0] + rows[1]).astype(h.dtype)
            return module.block(config, p, h, ctx)

        if uniform:
            return jnp.where(idx >= 0, run(h), h), None
        return jax.lax.cond(idx >= 0, run, lambda h: h, h), None

    h, _ = jax.lax.scan(step, h, (path.astype(jnp.int32), affine))
    return h


def check_junction(junction, t_max: int, hidden_size: int) -> None:
    """Raises ValueError unless junction is None or {"scale", "shift"} each [t_max, hidden_size]."""
    if junction is None:
        return
    if set(junction) != {"scale", "shift"}:
        raise ValueError(f"junction must have keys 'scale' and 'shift', got {sorted(junction)}")
    for name in ("scale", "shift"):
        if tuple(junction[name].shape) != (t_max, hidden_size):
            raise ValueError(
                f"junction[{name!r}] has shape {tuple(junction[name].shape)}, expected {(t_max, hidden_size)}"
            )


def apply_path(
    config: ModelConfig,
    shell: dict,
    pool: dict,
    path: jax.Array,
    inputs: jax.Array,
    junction: dict | None = None,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    uniform: bool = False,
) -> jax.Array:
    """Forward of a layer path: embed from `shell`, blocks gathered from `pool` by `path`, head from `shell`.

    Args:
      config: the shell's config (all pool blocks must share its block shapes).
      shell: params without (or ignoring) `"blocks"`: `embed`, `final`, `head`.
      pool: stacked blocks [P, ...] (`make_pool`) or a parted pool (`make_parted_pool`): P = M * L blocks.
      path: int32 [T_max] pool indices, -1 = padding (the step leaves h unchanged). Traced: new paths reuse
        the compiled function. A concrete path is checked on the host (indices in [-1, P)); under jit the
        path is a tracer and cannot be checked, and XLA clamps an out-of-range gather index, so call
        `validate_path` on the host before a jitted call.
      inputs: family inputs (token ids [B, S]; ViT pixel_values [B, C, H, W]).
      junction: None or {"scale": [T_max, D], "shift": [T_max, D]}; before step t,
        `h = h * scale[t] + shift[t]`.
      attention_mask: [B, S] (1 = real token) or None.
      positions: None, or int [B, P] (LMs only): the head runs only on these positions of each row, and the
        logits [B, P, V] are `full_logits[b, positions[b, p]]` (teacher-forced objectives that read a few
        positions; `hm3_jax.tasks.exact_match.exact_match_kernel`).
      uniform: no data-dependent branch over padding steps (`run_path`).
    Returns: the family's `head` outputs (logits [B, S, V] for LMs, [B, P, V] with `positions`).
    """
    module = family_module(config)
    if is_concrete(path):
        validate_path(path, pool_size(pool))
    path = jnp.asarray(path)
    check_junction(junction, path.shape[0], config.hidden_size)
    h, ctx = module.embed(config, shell, inputs, attention_mask)
    h = run_path(config, pool, path, h, ctx, junction, uniform)
    if positions is not None:
        h = gather_positions(config, h, positions)
    return module.head(config, shell, h)


def gather_positions(config: ModelConfig, h: jax.Array, positions: jax.Array) -> jax.Array:
    """Hidden states at given positions: h [B, S, D], positions int [B, P] -> [B, P, D] (LM families only)."""
    if config.family == "vit":
        raise ValueError("positions= selects LM head positions; a ViT has no per-token head")
    if positions.ndim != 2 or positions.shape[0] != h.shape[0]:
        raise ValueError(
            f"positions must be [B, P] with B = {h.shape[0]}, got shape {tuple(positions.shape)}"
        )
    return jnp.take_along_axis(h, positions.astype(jnp.int32)[..., None], axis=1)
