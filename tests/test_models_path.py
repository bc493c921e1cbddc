"""Layer paths over a block pool: identity, padding, mixing sources, junctions, no recompilation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hm3_jax import models
from tests.test_models_llama import randomise

CONFIG = models.ModelConfig(
    family="llama", vocab_size=37, hidden_size=16, intermediate_size=24, num_layers=3, num_heads=4,
    num_kv_heads=2, max_position_embeddings=32,
)  # fmt: skip
TOL = 1e-5
apply = jax.jit(models.apply, static_argnums=0)


@pytest.fixture(scope="module")
def two_models():
    a = randomise(models.init(CONFIG, jax.random.key(0)), 10)
    b = randomise(models.init(CONFIG, jax.random.key(1)), 11)
    ids = jax.random.randint(jax.random.key(2), (2, 5), 0, CONFIG.vocab_size)
    return a, b, ids


@pytest.fixture(scope="module")
def jitted_apply_path():
    return jax.jit(models.apply_path, static_argnums=0)


def test_identity_path_equals_apply(two_models, jitted_apply_path):
    a, _, ids = two_models
    pool = models.make_pool([a["blocks"]])
    path = jnp.asarray(models.identity_path(CONFIG.num_layers, t_max=5))
    np.testing.assert_array_equal(np.asarray(path), [0, 1, 2, -1, -1])
    out = jitted_apply_path(CONFIG, models.shell_of(a), pool, path, ids)
    np.testing.assert_allclose(out, apply(CONFIG, a, ids), atol=TOL, rtol=0)


def test_padding_steps_leave_h_unchanged(two_models, jitted_apply_path):
    a, b, ids = two_models
    shell, pool = models.shell_of(a), models.make_pool([a["blocks"], b["blocks"]])
    dense_path = jnp.array([4, 0, 2, -1, -1, -1], jnp.int32)
    sparse_path = jnp.array([-1, 4, -1, 0, -1, 2], jnp.int32)
    out_dense = jitted_apply_path(CONFIG, shell, pool, dense_path, ids)
    np.testing.assert_allclose(jitted_apply_path(CONFIG, shell, pool, sparse_path, ids), out_dense, atol=TOL)
    # an all-padding path is embed -> head with no block; junctions on padding steps are ignored too
    empty = jnp.full((6,), -1, jnp.int32)
    junction = {"scale": jnp.full((6, CONFIG.hidden_size), 3.0), "shift": jnp.ones((6, CONFIG.hidden_size))}
    h, _ = models.embed(CONFIG, shell, ids)
    expected = models.head(CONFIG, shell, h)
    np.testing.assert_allclose(jitted_apply_path(CONFIG, shell, pool, empty, ids), expected, atol=TOL)
    np.testing.assert_allclose(
        jitted_apply_path(CONFIG, shell, pool, empty, ids, junction), expected, atol=TOL, rtol=0
    )


def test_mixed_path_equals_hand_built_stacked_model(two_models, jitted_apply_path):
    a, b, ids = two_models
    pool = models.make_pool([a["blocks"], b["blocks"]])
    pairs = [(0, 0), (1, 1), (0, 1), (1, 0), (1, 0)]  # (source, layer); a block may repeat
    path = jnp.asarray(models.path_from_pairs(pairs, CONFIG.num_layers, t_max=7))
    np.testing.assert_array_equal(np.asarray(path), [0, 4, 1, 3, 3, -1, -1])
    sources = (a, b)
    stacked = jax.tree.map(
        lambda *leaves: jnp.stack(leaves),
        *[jax.tree.map(lambda x, l=l: x[l], sources[m]["blocks"]) for m, l in pairs],
    )
    frankenmodel = {**models.shell_of(b), "blocks": stacked}  # shell from b: embeddings/head need not be a's
    expected = apply(CONFIG.replace(num_layers=len(pairs)), frankenmodel, ids)
    out = jitted_apply_path(CONFIG, models.shell_of(b), pool, path, ids)
    np.testing.assert_allclose(out, expected, atol=TOL, rtol=0)


def test_junction_affine_applied_before_each_step(two_models, jitted_apply_path):
    a, b, ids = two_models
    shell, pool = models.shell_of(a), models.make_pool([a["blocks"], b["blocks"]])
    path = jnp.array([5, -1, 1], jnp.int32)
    key_scale, key_shift = jax.random.split(jax.random.key(3))
    junction = {
        "scale": 1.0 + 0.2 * jax.random.normal(key_scale, (3, CONFIG.hidden_size)),
        "shift": 0.1 * jax.random.normal(key_shift, (3, CONFIG.hidden_size)),
    }

    @jax.jit
    def reference(shell, pool, junction):  # a Python loop over the non-padding steps 0 and 2
        h, ctx = models.embed(CONFIG, shell, ids)
        for t, index in ((0, 5), (2, 1)):  # path[0] = 5, path[2] = 1
            p = jax.tree.map(lambda x, index=index: x[index], pool)
            h = models.block(CONFIG, p, h * junction["scale"][t] + junction["shift"][t], ctx)
        return models.head(CONFIG, shell, h)

    expected = reference(shell, pool, junction)
    out = jitted_apply_path(CONFIG, shell, pool, path, ids, junction)
    np.testing.assert_allclose(out, expected, atol=TOL, rtol=0)


def test_new_paths_do_not_recompile(two_models):
    a, b, ids = two_models
    shell, pool = models.shell_of(a), models.make_pool([a["blocks"], b["blocks"]])

    @jax.jit
    @chex.assert_max_traces(n=1)
    def forward(path):
        return models.apply_path(CONFIG, shell, pool, path, ids)

    outs = [forward(jnp.asarray(p, jnp.int32)) for p in ([0, 1, 2, -1], [5, 5, -1, 0], [-1, -1, -1, -1])]
    assert not np.allclose(outs[0], outs[1])


def test_bad_paths_and_pools_raise_clear_errors(two_models):
    a, _, ids = two_models
    shell, pool = models.shell_of(a), models.make_pool([a["blocks"]])
    with pytest.raises(ValueError, match="outside the pool of 3 blocks"):
        models.apply_path(CONFIG, shell, pool, np.array([0, 3], np.int32), ids)
    with pytest.raises(ValueError, match="outside the pool"):
        models.apply_path(CONFIG, shell, pool, np.array([-2], np.int32), ids)
    with pytest.raises(ValueError, match="1-D"):
        models.apply_path(CONFIG, shell, pool, np.zeros((2, 2), np.int32), ids)
    with pytest.raises(ValueError, match="junction"):
        models.apply_path(CONFIG, shell, pool, np.array([0]), ids, {"scale": jnp.ones((2, 16))})
    other = models.init(CONFIG.replace(hidden_size=8, num_heads=2, num_kv_heads=1), jax.random.key(0))
    with pytest.raises(ValueError, match="shapes"):
        models.make_pool([a["blocks"], other["blocks"]])
    with pytest.raises(ValueError, match="attention_mask shape"):
        models.apply_path(CONFIG, shell, pool, np.array([0]), ids, None, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="not a valid"):
        models.path_from_pairs([(0, 3)], CONFIG.num_layers, t_max=4)


def test_positions_give_the_full_logits_at_those_positions(two_models, jitted_apply_path):
    a, b, ids = two_models
    shell, pool = models.shell_of(a), models.make_pool([a["blocks"], b["blocks"]])
    path = jnp.array([4, 0, -1, 2], jnp.int32)
    full = np.asarray(jitted_apply_path(CONFIG, shell, pool, path, ids))  # [2, 5, V]
    positions = jnp.array([[3, 0, 4], [1, 1, 2]], jnp.int32)
    picked = np.asarray(jitted_apply_path(CONFIG, shell, pool, path, ids, positions=positions))
    assert picked.shape == (2, 3, CONFIG.vocab_size)
    for row in range(2):
        for j, t in enumerate(np.asarray(positions[row])):
            np.testing.assert_allclose(picked[row, j], full[row, t], atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="positions must be"):
        models.apply_path(CONFIG, shell, pool, path, ids, positions=jnp.zeros((3, 2), jnp.int32))
