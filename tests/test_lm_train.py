"""hm3_jax.tasks.lm_train.train_lm: the batch plan argument (used by benchmarks/multitask_bound.py)."""

import jax
import numpy as np
import pytest

from hm3_jax import models
from hm3_jax.models.config import ModelConfig
from hm3_jax.tasks import lm_train

CFG = ModelConfig(
    family="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
    max_position_embeddings=32,
)  # fmt: skip


def _data():
    rng = np.random.default_rng(0)
    return rng.integers(0, 32, (9, 8)).astype(np.int32), (rng.random((9, 8)) > 0.2).astype(np.float32)


def test_explicit_rows_equal_the_key_drawn_plan_and_steer_the_batches():
    params = models.init(CFG, jax.random.PRNGKey(0))
    ids, mask = _data()
    key = jax.random.PRNGKey(1)
    run = lambda rows=None: lm_train.train_lm(  # noqa: E731
        key, CFG, params, ids, mask, 3, 4, 1e-3, warmup_steps=1, progress=False, rows=rows
    )
    drawn = np.asarray(jax.random.randint(key, (3, 4), 0, 9))  # the default plan, as documented
    (p_default, l_default), (p_plan, l_plan) = run(), run(drawn)
    np.testing.assert_array_equal(l_default, l_plan)
    for a, b in zip(jax.tree.leaves(p_default), jax.tree.leaves(p_plan), strict=True):
        np.testing.assert_array_equal(a, b)
    _, l_other = run(np.zeros((3, 4), np.int64))  # every batch = row 0: another run
    assert not np.array_equal(l_other, l_default)


def test_bad_rows_are_a_clear_error():
    params = models.init(CFG, jax.random.PRNGKey(0))
    ids, mask = _data()
    with pytest.raises(ValueError, match="rows must be"):
        lm_train.train_lm(jax.random.PRNGKey(1), CFG, params, ids, mask, 3, 4, 1e-3, rows=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="rows must be"):
        lm_train.train_lm(jax.random.PRNGKey(1), CFG, params, ids, mask, 3, 4, 1e-3, rows=np.full((3, 4), 9))
