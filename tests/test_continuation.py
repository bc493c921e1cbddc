"""Calibration rows continued by the expert's own greedy answer (issue 19; hm3_jax/merging/continuation.py),
against a naive loop that re-runs the whole unpadded sequence through `models.apply` for every new token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hm3_jax import models
from hm3_jax.merging import Calibration, own_continuation
from hm3_jax.merging.continuation import answer_weights, left_padded_prompts

CFG = models.ModelConfig(
    family="llama", vocab_size=17, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2
)
RNG = np.random.default_rng(3)


def _forward(params, x):
    return models.apply(CFG, params, x[:, 0], x[:, 1])


def _naive_greedy(params, tokens, steps):
    seq = list(tokens)
    for _ in range(steps):
        logits = models.apply(CFG, params, jnp.asarray([seq], jnp.int32))
        seq.append(int(jnp.argmax(logits[0, -1])))
    return seq[len(tokens) :]


@pytest.fixture(scope="module")
def params():
    p = models.init(CFG, jax.random.key(0))
    return jax.tree.map(lambda x: x + (0.3 * RNG.standard_normal(x.shape)).astype(np.float32), p)


def test_continuation_equals_a_naive_greedy_loop(params):
    # row 0: teacher-forced layout (prompt first, then zeroed targets of weight 0); row 1: a left-padded prompt
    ids = np.array([[1, 5, 6, 9, 0, 0, 0], [0, 0, 0, 1, 7, 8, 3]], np.int32)
    weights = np.array([[1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1]], np.float32)
    mask = np.array([[1] * 7, [0, 0, 0, 1, 1, 1, 1]], np.int32)
    calib = Calibration(_forward, np.stack([ids, mask], 1), weights)
    want = [_naive_greedy(params, [1, 5, 6, 9], 5), _naive_greedy(params, [1, 7, 8, 3], 5)]
    eos = want[0][2]  # an end-of-sequence id row 0 emits at its third token
    out = own_continuation(CFG, params, calib, 5, eos_ids=(eos,))
    got = np.asarray(out.inputs)
    assert got.shape == (2, 2, 4 + 5) and out.forward_fn is _forward
    np.testing.assert_array_equal(got[:, 0, :4], [[1, 5, 6, 9], [1, 7, 8, 3]])
    np.testing.assert_array_equal(got[:, 0, 4:], want)
    np.testing.assert_array_equal(got[:, 1], 1)
    first_eos = [r.index(eos) if eos in r else 5 for r in want]
    for r in range(2):
        expect = [1.0] * 4 + [1.0 if t <= first_eos[r] else 0.0 for t in range(5)]
        np.testing.assert_array_equal(np.asarray(out.token_weights)[r], expect)


def test_prompts_of_different_lengths_are_left_padded(params):
    ids = np.array([[1, 5, 0, 0], [1, 7, 8, 3]], np.int32)
    weights = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], np.float32)
    calib = Calibration(_forward, np.stack([ids, np.ones_like(ids)], 1), weights)
    prompt_ids, prompt_mask = left_padded_prompts(calib)
    np.testing.assert_array_equal(prompt_ids, [[0, 0, 1, 5], [1, 7, 8, 3]])
    np.testing.assert_array_equal(prompt_mask, [[0, 0, 1, 1], [1, 1, 1, 1]])
    out = own_continuation(CFG, params, calib, 3)
    np.testing.assert_array_equal(np.asarray(out.inputs)[0, 0, 4:], _naive_greedy(params, [1, 5], 3))
    np.testing.assert_array_equal(np.asarray(out.inputs)[0, 1], [0, 0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(np.asarray(out.token_weights)[0], [0, 0, 1, 1, 1, 1, 1])  # no eos given


def test_answer_weights_and_bad_input(params):
    np.testing.assert_array_equal(answer_weights(np.array([[4, 2, 5, 2], [2, 3, 3, 3]]), (2,)),
                                  [[1, 1, 0, 0], [1, 0, 0, 0]])  # fmt: skip
    np.testing.assert_array_equal(answer_weights(np.array([[4, 5]]), ()), [[1, 1]])
    ids = np.array([[1, 5], [0, 0]], np.int32)
    empty_row = Calibration(_forward, np.stack([ids, ids > 0], 1), (ids > 0).astype(np.float32))
    with pytest.raises(ValueError, match="math: row 1 has no prompt token"):
        own_continuation(CFG, params, empty_row, 2, what="math")
    with pytest.raises(ValueError, match="token rows"):
        own_continuation(CFG, params, Calibration(_forward, np.zeros((2, 3, 4, 4), np.float32)), 2)
    with pytest.raises(ValueError, match="continuation tokens must be >= 1"):
        own_continuation(CFG, params, empty_row, 0)
