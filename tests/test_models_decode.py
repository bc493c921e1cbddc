"""Greedy decoding with a KV cache along a path vs a full-recompute loop and HF Flax `generate`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import FlaxLlamaForCausalLM, LlamaConfig

from hm3_jax import models
from tests.test_models_llama import randomise, tiny_hf_config, to_hf_llama

HF = tiny_hf_config(num_hidden_layers=2, vocab_size=53)
CONFIG = models.ModelConfig(
    family="llama", vocab_size=53, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
    num_kv_heads=2, max_position_embeddings=64, norm_eps=HF["rms_norm_eps"],
)  # fmt: skip
NEW = 6

# eos_id / pad_id are traced here (an int works as well as a static one), so every test shares one compilation
decode = jax.jit(models.greedy_decode, static_argnames=("config", "max_new_tokens"))
NO_EOS = -1  # a token id that is never emitted
apply_path = jax.jit(models.apply_path, static_argnums=0)


def greedy_decode_naive(config, shell, pool, path, prompt_ids, prompt_mask, max_new_tokens, junction=None):
    """Reference without a cache: recompute the whole sequence with `apply_path` for every new token.

    The sequence lives in a fixed [B, S_prompt + max_new_tokens] buffer (one compilation); slots not yet
    generated hold token 0 and, by causality, cannot influence the logits read at the last real slot.
    """
    b, s_prompt = prompt_ids.shape
    ids = jnp.concatenate([prompt_ids, jnp.zeros((b, max_new_tokens), prompt_ids.dtype)], axis=1)
    mask = jnp.concatenate([prompt_mask, jnp.ones((b, max_new_tokens), prompt_mask.dtype)], axis=1)
    out = []
    for n in range(max_new_tokens):
        logits = apply_path(config, shell, pool, path, ids, junction=junction, attention_mask=mask)
        nxt = jnp.argmax(logits[:, s_prompt + n - 1], axis=-1).astype(jnp.int32)
        out.append(nxt)
        ids = ids.at[:, s_prompt + n].set(nxt)
    return jnp.stack(out, axis=1)


@pytest.fixture(scope="module")
def setup():
    init = jax.jit(models.init, static_argnums=0)
    a = randomise(init(CONFIG, jax.random.key(0)), 1)
    b = randomise(init(CONFIG, jax.random.key(2)), 3)
    ids = jax.random.randint(jax.random.key(4), (3, 5), 0, CONFIG.vocab_size)
    mask = jnp.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 1]], jnp.int32)
    ids = jnp.where(mask == 1, ids, 0)
    return a, b, ids, mask


def test_identity_path_matches_hf_generate(setup):
    a, _, ids, mask = setup
    hf_model = FlaxLlamaForCausalLM(LlamaConfig(**HF), _do_init=False)
    ref = hf_model.generate(
        ids, attention_mask=mask, params=to_hf_llama(a, 2), max_new_tokens=NEW, do_sample=False,
        pad_token_id=0, eos_token_id=2,
    ).sequences[:, ids.shape[1]:]  # fmt: skip
    pool = models.make_pool([a["blocks"]])
    # HF stops a row at EOS and pads the rest: the same as our eos_id/pad_id option
    out = decode(
        CONFIG, models.shell_of(a), pool, models.identity_path(2), ids, mask, NEW, eos_id=2, pad_id=0
    )
    assert out.shape == (3, NEW) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out, ref)


def test_mixed_path_with_junction_matches_naive_loop(setup):
    a, b, ids, mask = setup
    shell, pool = models.shell_of(b), models.make_pool([a["blocks"], b["blocks"]])
    path = jnp.array([2, 0, -1, 0, 3], jnp.int32)  # block a0 twice: each occurrence has its own cache slot
    key_scale, key_shift = jax.random.split(jax.random.key(5))
    junction = {
        "scale": 1.0 + 0.1 * jax.random.normal(key_scale, (5, CONFIG.hidden_size)),
        "shift": 0.05 * jax.random.normal(key_shift, (5, CONFIG.hidden_size)),
    }
    naive = greedy_decode_naive(CONFIG, shell, pool, path, ids, mask, NEW, junction)
    out = decode(CONFIG, shell, pool, path, ids, mask, NEW, junction, NO_EOS)
    np.testing.assert_array_equal(out, naive)
    # a second path reuses the compiled function and gives its own answer
    other = jnp.array([1, 3, 0, -1, -1], jnp.int32)
    np.testing.assert_array_equal(
        decode(CONFIG, shell, pool, other, ids, mask, NEW, junction, NO_EOS),
        greedy_decode_naive(CONFIG, shell, pool, other, ids, mask, NEW, junction),
    )


def test_eos_replaces_later_tokens_with_pad(setup):
    a, _, ids, mask = setup
    shell, pool, path = models.shell_of(a), models.make_pool([a["blocks"]]), models.identity_path(2)
    free = np.asarray(decode(CONFIG, shell, pool, path, ids, mask, NEW, None, NO_EOS, 0))
    eos = int(free[0, 1])  # row 0 emits this at step 1
    pad = CONFIG.vocab_size - 1
    out = np.asarray(decode(CONFIG, shell, pool, path, ids, mask, NEW, None, eos, pad))
    for row in range(free.shape[0]):
        hits = np.nonzero(free[row] == eos)[0]
        stop = hits[0] + 1 if hits.size else NEW
        np.testing.assert_array_equal(out[row, :stop], free[row, :stop])
        assert (out[row, stop:] == pad).all()


def test_decode_bad_input(setup):
    a, _, ids, mask = setup
    shell, pool = models.shell_of(a), models.make_pool([a["blocks"]])
    with pytest.raises(ValueError, match="outside the pool"):
        models.greedy_decode(CONFIG, shell, pool, np.array([0, 7]), ids, mask, 2)
    with pytest.raises(ValueError, match="S_prompt"):
        models.greedy_decode(CONFIG, shell, pool, np.array([0, 1]), ids, mask[:, :2], 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        models.greedy_decode(CONFIG, shell, pool, np.array([0, 1]), ids, mask, 0)


def test_bfloat16_decode_runs_with_a_bfloat16_cache(setup):
    a, b, ids, mask = setup
    shell16 = models.cast(models.shell_of(a), jnp.bfloat16)
    pool16 = models.cast(models.make_pool([a["blocks"], b["blocks"]]), jnp.bfloat16)
    assert jax.tree.leaves(pool16)[0].dtype == jnp.bfloat16
    cache = jax.eval_shape(
        lambda: models.greedy_decode(CONFIG, shell16, pool16, jnp.array([0, 3]), ids, mask, 2)
    )  # traces the bf16 cache path (the forward in bf16 is checked in test_models_llama)
    assert cache.shape == (3, 2) and cache.dtype == jnp.int32


def test_first_argmax_and_canonical_steps_match_numpy_definitions():
    from hm3_jax.models.decode import _canonical_steps, first_argmax

    rng = np.random.default_rng(3)
    logits = rng.integers(-2, 3, size=(300, 7)).astype(np.float32)  # many ties
    logits[rng.random(logits.shape) < 0.05] = np.nan
    logits[:10] = -np.inf
    got = np.asarray(jax.jit(first_argmax)(jnp.asarray(logits)))
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(logits), axis=-1)))
    for _ in range(20):  # stable partition: real steps first in order, then the padding steps
        path = np.where(rng.random(6) < 0.4, -1, rng.integers(0, 9, 6)).astype(np.int32)
        junction = {
            "scale": jnp.asarray(rng.normal(size=(6, 3))),
            "shift": jnp.asarray(rng.normal(size=(6, 3))),
        }
        order = np.argsort(path < 0, kind="stable")
        p, sc, sh, n = _canonical_steps(jnp.asarray(path), junction)
        np.testing.assert_array_equal(np.asarray(p), path[order])
        np.testing.assert_array_equal(np.asarray(sc), np.asarray(junction["scale"])[order])
        np.testing.assert_array_equal(np.asarray(sh), np.asarray(junction["shift"])[order])
        assert int(n) == int((path >= 0).sum())


def test_uniform_steps_give_the_same_values(setup):
    """`uniform=True` (model-parallel meshes: padding steps computed and discarded instead of skipped by
    `lax.cond`) gives the same logits and tokens as the default, for a path with padding in the middle."""
    a, b, ids, mask = setup
    shell, pool = models.shell_of(b), models.make_pool([a["blocks"], b["blocks"]])
    path = jnp.array([2, -1, 0, -1, 3], jnp.int32)
    plain = models.apply_path(CONFIG, shell, pool, path, ids, attention_mask=mask)
    uniform = models.apply_path(CONFIG, shell, pool, path, ids, attention_mask=mask, uniform=True)
    np.testing.assert_array_equal(np.asarray(uniform), np.asarray(plain))
    uniform_decode = jax.jit(models.greedy_decode, static_argnames=("config", "max_new_tokens", "uniform"))
    np.testing.assert_array_equal(
        uniform_decode(CONFIG, shell, pool, path, ids, mask, NEW, None, NO_EOS, uniform=True),
        decode(CONFIG, shell, pool, path, ids, mask, NEW, None, NO_EOS),
    )


def test_blocks_read_per_step_give_the_same_tokens(setup):
    """`gather_once=False` (each step's block read from the pool when the step runs, in every forward pass: what
    large pools use, `GATHER_ONCE_MAX_BYTES`) gives the tokens of the default gather-once decode and of the
    naive full-recompute loop: stacked and parted pools, a junction, padding in the middle, `uniform` too."""
    from hm3_jax.models import decode as decode_lib

    a, b, ids, mask = setup
    steps = jax.jit(
        models.greedy_decode, static_argnames=("config", "max_new_tokens", "uniform", "gather_once")
    )
    path = jnp.array([2, -1, 0, 3, 0], jnp.int32)
    key_scale, key_shift = jax.random.split(jax.random.key(7))
    junction = {
        "scale": 1.0 + 0.1 * jax.random.normal(key_scale, (5, CONFIG.hidden_size)),
        "shift": 0.05 * jax.random.normal(key_shift, (5, CONFIG.hidden_size)),
    }
    shell = models.shell_of(b)
    stacked = models.make_pool([a["blocks"], b["blocks"]])
    naive = greedy_decode_naive(CONFIG, shell, stacked, path, ids, mask, NEW, junction)
    for pool in (stacked, models.make_parted_pool([a["blocks"], b["blocks"]])):
        for uniform in (False, True):
            once = steps(CONFIG, shell, pool, path, ids, mask, NEW, junction, NO_EOS, uniform=uniform,
                         gather_once=True)  # fmt: skip
            per_step = steps(CONFIG, shell, pool, path, ids, mask, NEW, junction, NO_EOS, uniform=uniform,
                             gather_once=False)  # fmt: skip
            np.testing.assert_array_equal(per_step, once)
            np.testing.assert_array_equal(per_step, naive)
    # the default chooses by the bytes of the T_max gathered blocks
    block = sum(x[0].nbytes for x in jax.tree.leaves(stacked))
    assert decode_lib.gathers_once(stacked, 5) and decode_lib.gathers_once(
        models.make_parted_pool([a["blocks"]]), 5
    )
    assert not decode_lib.gathers_once(stacked, decode_lib.GATHER_ONCE_MAX_BYTES // block + 1)
