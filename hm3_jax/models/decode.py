"""Greedy decoding with a KV cache along a layer path (DESIGN: `greedy_decode`).

Left-padded prompts: `prompt_mask` is 1 on real tokens; RoPE/learned positions are `cumsum(mask) - 1`, so the
first real token of every row is position 0 and the n-th generated token of a row with `n_real` prompt tokens
is at position `n_real + n`, exactly as HF `generate` does.

KV cache: one (k, v) pair per path step, each [B, KV, S_total, hd] (head-major: the attention's dots read it
in place), `S_total = S_prompt + max_new_tokens`, one pair per *real path step* (a pool block can repeat in a
path and then sees different inputs at each occurrence). Slots `0..S_prompt-1` hold the prompt; the token
generated at step n is written to slot `S_prompt + n`.
A query at slot i sees key slot j iff `j <= i` and the key is a real token (prompt padding is masked).
Padding path steps (`-1`) leave h unchanged (they apply no block and no junction).

Performance (behaviour as above): the path is made canonical once (real steps first, in order, junction rows
moved along), the path's T_max blocks are gathered from the pool once per call, and every forward pass (the
prefill and each generated token) is unrolled over the T_max static steps, step t running under
`lax.cond(t < num_real)` with its own cache pair as a separate loop-carried array. So padding steps cost
nothing, and no generated token copies a cache row or a pool block: with one [T_max, B, KV, S_total, hd] cache
and a `fori_loop` over the real steps, each step sliced its row out (1.5 MB for k and v at tiny3's shapes),
wrote it back and gathered its block from the pool, the largest items of the decode profile (docs/path_eval.md,
"Second pass": 72 -> 61 ms CPU per tiny3 translation batch, same tokens). Compilation is about twice as long
(the T_max steps are traced as separate code, twice: prefill and generated token).

Everything is traced (path, junction, prompts), so one compilation serves every path of a given T_max.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax.models import layers
from hm3_jax.models.config import ModelConfig
from hm3_jax.models.path import check_junction, family_module, is_concrete, validate_path
from hm3_jax.models.pool import is_parted, pool_block, pool_size

LM_FAMILIES = ("llama", "gpt2")


def _canonical_steps(path, junction):
    """Real steps first (stable), junction rows moved along; returns (path, scales, shifts, num_real)
    (scales and shifts None when `junction` is None).

    The stable partition is computed with cumulative sums and one scatter (a permutation), not `jnp.argsort`:
    XLA:CPU's sort of the 8 flags cost ~3 ms per decode call (profiled), the scatter microseconds."""
    real = path >= 0
    num_real = jnp.sum(real, dtype=jnp.int32)
    dest = jnp.where(real, jnp.cumsum(real) - 1, num_real + jnp.cumsum(~real) - 1)  # new slot of each step
    order = jnp.zeros_like(dest).at[dest].set(jnp.arange(path.shape[0], dtype=dest.dtype))
    if junction is None:
        return path[order], None, None, num_real
    return path[order], junction["scale"][order], junction["shift"][order], num_real


# Above this many bytes of a path's T_max gathered blocks, decoding reads each step's block from the pool when the
# step runs (every forward pass) instead of gathering all T_max once per call: Llama-2-7B's 64 blocks are
# 6 GiB per device at model:4 (docs/scaling.md, "Session 12: device 0 holds shards only"). Below it (every tiny run) the blocks are gathered
# once, as before: no generated token copies a block (docs/path_eval.md). The same values either way.
GATHER_ONCE_MAX_BYTES = 2**30


def gathers_once(pool, t_max: int) -> bool:
    """Whether `greedy_decode` gathers the path's T_max blocks once per call (`GATHER_ONCE_MAX_BYTES`)."""
    per_block = sum(
        int(np.prod(x.shape[1:])) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(pool[0] if is_parted(pool) else pool)
    )
    return t_max * per_block <= GATHER_ONCE_MAX_BYTES


def first_argmax(logits: jax.Array) -> jax.Array:
    """`jnp.argmax(logits, -1)` (first index of the maximum, NaN counting as the maximum) as a max and a min
    reduction: XLA:CPU lowers argmax to a variadic (value, index) reduce, 0.64 ms on tiny3's [105, 1024]
    logits of one generated token vs 0.22 ms for this, head matmul included (docs/path_eval.md).

    logits [..., V] -> int32 [...]."""
    m = jnp.max(logits, axis=-1, keepdims=True)  # NaN when any entry is NaN
    hit = jnp.where(jnp.isnan(m), jnp.isnan(logits), logits == m)
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.min(jnp.where(hit, iota, logits.shape[-1]), axis=-1)


def _path_with_caches(config, module, blocks, steps, h, ctx, caches, uniform=False):
    """Runs h [B, s, D] through the real steps of a canonical path, unrolled over the T_max static steps:
    step t applies `blocks(t)` (the path's t-th pool block: gathered once per decode call, or
    read when the step runs, `greedy_decode`'s `gather_once`) under a `lax.cond(t < num_real)`, reading and
    writing its own cache `caches[t] = (k, v)` [B, KV, S_total, hd].
    `uniform`: every step runs its block and `jnp.where` keeps the old values on padding steps (see
    `path.run_path`). Returns (h, caches)."""
    _, scales, shifts, num_real = steps
    caches = list(caches)
    for t in range(len(caches)):

        def run(operands, t=t):
            h, cache = operands
            p = blocks(t)
            x = h if scales is None else (h * scales[t] + shifts[t]).astype(h.dtype)  # as `run_path`
            return module.block_with_cache(config, p, x, ctx, cache)

        if uniform:
            new = run((h, caches[t]))
            h, caches[t] = jax.tree.map(lambda a, b, t=t: jnp.where(t < num_real, a, b), new, (h, caches[t]))
        else:
            h, caches[t] = jax.lax.cond(t < num_real, run, lambda operands: operands, (h, caches[t]))
    return h, tuple(caches)


def greedy_decode(
    config: ModelConfig,
    shell: dict,
    pool: dict,
    path: jax.Array,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    max_new_tokens: int,
    junction: dict | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    uniform: bool = False,
    gather_once: bool | None = None,
) -> jax.Array:
    """Greedy (argmax) generation along a layer path with a per-step KV cache.

    Args:
      config: LM config (family "llama" or "gpt2"); static under jit, as are `max_new_tokens`, `eos_id`,
        `pad_id`.
      shell: embeddings, final norm and head; pool: stacked blocks [P, ...] or a parted pool (`models.pool`).
      path: int32 [T_max], -1 = padding.
      prompt_ids: int [B, S_prompt], left-padded; prompt_mask: [B, S_prompt], 1 on real tokens
        (every row needs at least one real token).
      max_new_tokens: number of tokens to generate (static).
      junction: None or {"scale", "shift"}: [T_max, D], applied before each step as in `apply_path`.
      eos_id: if set, once a row emits `eos_id` every later token of that row is `pad_id`.
      uniform: no data-dependent branches (padding steps computed and discarded; `path.run_path`).
      gather_once: static; gather the path's T_max blocks once per call (True) or read each step's block when
        the step runs, in every forward pass (False: one block live at a time, not T_max); None: once unless
        the T_max blocks exceed `GATHER_ONCE_MAX_BYTES` (`gathers_once`). The same tokens either way.
    Returns: tokens int32 [B, max_new_tokens].
    """
    if config.family not in LM_FAMILIES:
        raise ValueError(f"greedy_decode needs a language model family {LM_FAMILIES}, got {config.family!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(
            f"prompt_ids {prompt_ids.shape} and prompt_mask {prompt_mask.shape} must both be [B, S_prompt]"
        )
    module = family_module(config)
    if is_concrete(path):
        validate_path(path, pool_size(pool))
    path = jnp.asarray(path, jnp.int32)
    t_max = path.shape[0]
    d = config.hidden_size
    check_junction(junction, t_max, d)
    dtype = jax.tree.leaves(shell["embed"])[0].dtype

    b, s_prompt = prompt_ids.shape
    s_total = s_prompt + max_new_tokens
    if s_total > config.max_position_embeddings and config.family == "gpt2":
        raise ValueError(f"prompt + new tokens = {s_total} exceeds max_position_embeddings")
    prompt_mask = prompt_mask.astype(jnp.int32)
    key_mask = jnp.concatenate(
        [prompt_mask, jnp.ones((b, max_new_tokens), jnp.int32)], axis=1
    )  # [B, S_total]
    slots = jnp.arange(s_total)
    cache_shape = (b, config.kv_heads, s_total, config.head_size)
    caches = tuple((jnp.zeros(cache_shape, dtype), jnp.zeros(cache_shape, dtype)) for _ in range(t_max))
    steps = _canonical_steps(path, junction)
    if gathers_once(pool, t_max) if gather_once is None else gather_once:
        gathered = [pool_block(pool, steps[0][t]) for t in range(t_max)]

        def blocks(t):
            return gathered[t]

    else:

        def blocks(t):  # step t's block read when the step runs (in every forward pass)
            return pool_block(pool, steps[0][t])

    # Prefill: the whole prompt in one pass, writing cache slots 0..S_prompt-1.
    positions = layers.positions_from_mask(prompt_mask)  # [B, S_prompt]
    mask = layers.causal_mask(slots[:s_prompt], slots, key_mask, config.sliding_window)
    ctx = module.make_ctx(config, positions, mask, cache_index=0)
    h = module.embed_tokens(config, shell, prompt_ids, positions)
    h, caches = _path_with_caches(config, module, blocks, steps, h, ctx, caches, uniform)
    first = first_argmax(module.head(config, shell, h[:, -1:])[:, 0])  # [B]
    num_real = jnp.sum(prompt_mask, axis=1)  # [B]

    def step(carry, n):
        token, done, caches = carry
        slot = s_prompt + n
        pos = (num_real + n)[:, None]  # [B, 1]
        mask = layers.causal_mask(slot[None], slots, key_mask, config.sliding_window)
        ctx = module.make_ctx(config, pos, mask, cache_index=slot)
        h = module.embed_tokens(config, shell, token[:, None], pos)
        h, caches = _path_with_caches(config, module, blocks, steps, h, ctx, caches, uniform)
        nxt = first_argmax(module.head(config, shell, h)[:, 0])
        if eos_id is not None:
            done = done | (token == eos_id)
            nxt = jnp.where(done, pad_id, nxt)
        return (nxt, done, caches), token

    done0 = jnp.zeros((b,), bool)
    carry = (first, done0, caches)
    # The last token never needs its own forward pass: scan max_new_tokens - 1 steps, then append it.
    (last, done, _), tokens = jax.lax.scan(step, carry, jnp.arange(max_new_tokens - 1))
    tokens = jnp.concatenate([tokens, last[None]], axis=0).T  # [B, max_new_tokens]
    return tokens
