"""Objectives: teacher-forced exact match equals step-by-step greedy decoding; chrF objective plumbing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hm3_jax import models
from hm3_jax.tasks import exact_match, generation, metrics, packing, scoring

CONFIG = models.ModelConfig(
    family="llama", vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2
)
MAX_LEN = 24


@pytest.fixture(scope="module")
def params():
    p = models.init(CONFIG, jax.random.key(0))
    # a larger output scale makes the argmax decisive (fewer near-ties between float paths)
    return {**p, "head": {"kernel": p["head"]["kernel"] * 20.0}}


@functools.partial(jax.jit, static_argnames=("num_new",))
def _reference_greedy(params, ids, length, num_new):
    """Step-by-step greedy decoding of one unpadded prompt (right-padded buffer, causal, no cache)."""

    def step(i, ids):
        logits = models.apply(CONFIG, params, ids[None])[0]  # [MAX_LEN, V]
        nxt = jnp.argmax(logits[length + i - 1])
        return ids.at[length + i].set(nxt)

    return jax.lax.fori_loop(0, num_new, step, ids)


def reference_greedy(params, prompt, num_new):
    buf = np.zeros((MAX_LEN,), np.int32)
    buf[: len(prompt)] = prompt
    out = _reference_greedy(params, jnp.asarray(buf), len(prompt), num_new)
    return np.asarray(out)[len(prompt) : len(prompt) + num_new].tolist()


def _prompts(seed, num):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, CONFIG.vocab_size, size=int(rng.integers(2, 9))).tolist() for _ in range(num)]


def test_teacher_forced_exact_match_equals_greedy(params):
    rng = np.random.default_rng(1)
    pairs, expected = [], []
    for prompt in _prompts(0, 14):
        greedy = reference_greedy(params, prompt, 6)
        j = int(rng.integers(1, 7))
        kind = rng.integers(3)
        if kind == 0:  # the greedy continuation itself: exact match
            target, ok = greedy[:j], True
        elif kind == 1:  # last token wrong
            target, ok = greedy[: j - 1] + [(greedy[j - 1] + 1) % CONFIG.vocab_size], False
        else:  # an early token wrong, the rest copied from the greedy output
            target = list(greedy[:j])
            target[0] = (target[0] + 1) % CONFIG.vocab_size
            ok = False
        pairs.append((prompt, target))
        expected.append(ok)
    assert 0 < sum(expected) < len(expected)
    objective = exact_match.make_exact_match_objective("toy", pairs, pad_id=0, batch_size=5)  # 14 -> 15 rows
    device = jax.jit(lambda p: objective.device_fn(functools.partial(models.apply, CONFIG, p)))
    correct = np.asarray(device(params))
    assert correct.shape == (14,)
    np.testing.assert_array_equal(correct, expected)
    assert objective.host_fn(correct) == pytest.approx(100.0 * np.mean(expected))
    # the jitted path scorer (identity path over the model's own blocks) gives the same number
    assert scoring.score_model(CONFIG, params, objective) == pytest.approx(100.0 * np.mean(expected))
    shell = models.shell_of(params)
    pool = models.make_pool([params["blocks"], params["blocks"]])
    mixed = np.array([2, 1, -1], np.int32)  # (source 1, block 0), (source 0, block 1), padding
    assert scoring.score_path(CONFIG, shell, pool, mixed, objective) == pytest.approx(
        scoring.score_model(CONFIG, params, objective)
    )


def test_pack_teacher_forced_layout_by_hand():
    packed = packing.pack_teacher_forced([([1, 7, 8], [5, 2]), ([1, 9], [2])], pad_id=0, batch_size=4)
    assert packed["input_ids"].shape == (4, 8)
    np.testing.assert_array_equal(packed["input_ids"][0], [1, 7, 8, 5, 2, 0, 0, 0])
    # predictions at positions 2 (-> 5) and 3 (-> eos) are scored
    np.testing.assert_array_equal(packed["target_mask"][0], [0, 0, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(packed["target_mask"][1], [0, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(packed["valid"], [True, True, False, False])
    with pytest.raises(ValueError, match="more than seq_len=4"):
        packing.pack_teacher_forced([([1, 7, 8], [5, 2])], pad_id=0, batch_size=1, seq_len=4)
    with pytest.raises(ValueError, match="non-empty"):
        packing.pack_teacher_forced([([1], [])], pad_id=0, batch_size=1)
    left = packing.pack_prompts([[1, 4, 5], [1]], pad_id=0, batch_size=3, prompt_len=4)
    np.testing.assert_array_equal(left["prompt_ids"], [[0, 1, 4, 5], [0, 0, 0, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(left["prompt_mask"], [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 1]])


class _ToyTokenizer:
    """Token t decodes to the letter chr(ord('a') + t % 26); id 2 is eos."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + t % 26) for t in ids if not (skip_special_tokens and t < 3))


def _padded_reference_decode(params, prompt_ids, prompt_mask, max_new_tokens):
    """Greedy decoding of left-padded prompts by re-running the full forward each step (no cache)."""
    ids, mask = prompt_ids, prompt_mask
    out = []
    for _ in range(max_new_tokens):
        logits = models.apply(CONFIG, params, ids, attention_mask=mask)
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        out.append(nxt)
        ids = jnp.concatenate([ids, nxt[:, None]], axis=1)
        mask = jnp.concatenate([mask, jnp.ones_like(nxt)[:, None]], axis=1)
    return jnp.stack(out, axis=1)


def test_chrf_objective_decodes_like_per_example_greedy(params):
    tok = _ToyTokenizer()
    prompts = _prompts(5, 7)
    greedy = [reference_greedy(params, p, 5) for p in prompts]
    references = [tok.decode(g[:3]) for g in greedy]
    objective = generation.make_chrf_objective(
        "toy", prompts, references, tok, batch_size=3, max_new_tokens=5
    )
    device = jax.jit(lambda p: objective.device_fn(functools.partial(_padded_reference_decode, p)))
    tokens = np.asarray(device(params))
    assert tokens.shape == (7, 5)
    np.testing.assert_array_equal(tokens, greedy)
    hyps = generation.decode_until_eos(tok, tokens, tok.eos_token_id)
    assert objective.host_fn(tokens) == pytest.approx(metrics.chrf(hyps, references))


def test_decode_until_eos_cuts_at_first_eos():
    tok = _ToyTokenizer()
    assert generation.decode_until_eos(tok, np.array([[3, 4, 2, 5], [6, 7, 8, 9]]), 2) == ["de", "ghij"]


def test_teacher_forced_agrees_with_kv_cache_greedy_decode(params):
    """Against the library's batched, left-padded, KV-cached greedy decoder."""
    prompts = _prompts(2, 10)
    packed = packing.pack_prompts(prompts, pad_id=0, batch_size=10)
    tokens = np.asarray(
        models.greedy_decode(
            CONFIG,
            models.shell_of(params),
            params["blocks"],
            np.arange(CONFIG.num_layers, dtype=np.int32),
            jnp.asarray(packed["prompt_ids"]),
            jnp.asarray(packed["prompt_mask"]),
            6,
        )
    )
    for prompt, row in zip(prompts, tokens, strict=True):
        assert row.tolist() == reference_greedy(params, prompt, 6)
    rng = np.random.default_rng(3)
    pairs = []
    for prompt, row in zip(prompts, tokens.tolist(), strict=True):
        target = row[: int(rng.integers(1, 7))]
        if rng.random() < 0.5:
            target[int(rng.integers(len(target)))] += 1
        pairs.append((prompt, target))
    greedy_match = [row[: len(t)] == t for row, (_, t) in zip(tokens.tolist(), pairs, strict=True)]
    assert 0 < sum(greedy_match) < len(greedy_match)
    objective = exact_match.make_exact_match_objective("toy", pairs, pad_id=0, batch_size=4)
    device = jax.jit(lambda p: objective.device_fn(functools.partial(models.apply, CONFIG, p)))
    np.testing.assert_array_equal(np.asarray(device(params)), greedy_match)


def test_bucketing_sorts_by_length_and_trims_rows():
    pairs = [([1] * 20, [5, 2]), ([1, 3], [2]), ([1] * 9, [4, 2]), ([1, 4], [6, 2])]
    arrays, order = packing.bucket_teacher_forced(pairs, pad_id=0, batch_size=2)
    np.testing.assert_array_equal(order, [1, 3, 2, 0])  # lengths 22, 3, 11, 4
    assert [a.shape for a in arrays["input_ids"]] == [(1, 2, 8), (1, 2, 24)]
    np.testing.assert_array_equal(arrays["input_ids"][0][0, 1], [1, 4, 6, 2, 0, 0, 0, 0])
    np.testing.assert_array_equal(arrays["target_mask"][0][0, 1], [0, 1, 1, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="seq_len"):
        packing.bucket_teacher_forced(pairs, pad_id=0, batch_size=2, seq_len=16)


def test_argmax_equals_matches_jnp_argmax_with_ties_nan_and_inf():
    rng = np.random.default_rng(7)
    v = 9
    # small integer logits: many ties; plus planted NaN and +-inf entries
    logits = rng.integers(-2, 3, size=(400, v)).astype(np.float32)
    special = rng.random(logits.shape)
    logits[special < 0.04] = np.nan
    logits[(special >= 0.04) & (special < 0.08)] = np.inf
    logits[(special >= 0.08) & (special < 0.12)] = -np.inf
    logits[:20] = -np.inf  # rows that are all -inf: argmax is 0
    logits[20:25] = np.nan  # rows that are all NaN: argmax is 0
    labels = rng.integers(0, v, size=(400,))
    labels[:40:2] = 0
    labels[40::3] = np.nanargmax(np.where(np.isnan(logits), -np.inf, logits), axis=-1)[40::3]  # often right
    expected = np.asarray(jnp.argmax(jnp.asarray(logits), axis=-1)) == labels
    got = np.asarray(jax.jit(exact_match.argmax_equals)(jnp.asarray(logits), jnp.asarray(labels)))
    np.testing.assert_array_equal(got, expected)
    assert 0.25 < expected.mean() < 0.75  # both outcomes are exercised
    # every label of a row: exactly one matches (the argmax)
    all_labels = np.tile(np.arange(v), (400, 1))
    hits = exact_match.argmax_equals(jnp.asarray(logits)[:, None, :].repeat(v, 1), jnp.asarray(all_labels))
    np.testing.assert_array_equal(np.asarray(hits).sum(1), np.ones(400))
    # labels outside [0, V) never match
    assert not np.asarray(exact_match.argmax_equals(jnp.zeros((2, v)), jnp.asarray([-1, v]))).any()


def test_target_positions_by_hand():
    ids = np.array([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
    tmask = np.array([[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1]], np.float32)  # the last position never counts
    positions, labels, valid = packing.target_positions(ids, tmask)
    np.testing.assert_array_equal(positions, [[1, 2], [4, 0]])
    np.testing.assert_array_equal(labels, [[7, 8], [14, 0]])
    np.testing.assert_array_equal(valid, [[True, True], [True, False]])
    with pytest.raises(ValueError, match="more than width"):
        packing.target_positions(ids, tmask, width=1)


def test_exact_match_with_head_at_target_positions_equals_full_logits(params):
    """A forward that takes `positions` (the head only where targets are read) gives the same correctness as
    the full logits, and is called with positions that cover every target."""
    rng = np.random.default_rng(3)
    pairs = []
    for prompt in _prompts(4, 9):
        greedy = reference_greedy(params, prompt, 5)
        target = greedy[: int(rng.integers(1, 6))]
        if rng.integers(2):
            target[-1] = (target[-1] + 1) % CONFIG.vocab_size
        pairs.append((prompt, target))
    objective = exact_match.make_exact_match_objective("toy", pairs, pad_id=0, batch_size=4)
    calls = []

    def gathered(ids, positions=None):
        calls.append(positions is not None)
        return models.apply_path(
            CONFIG, models.shell_of(params), params["blocks"], jnp.arange(CONFIG.num_layers), ids,
            positions=positions,
        )  # fmt: skip

    full = functools.partial(models.apply, CONFIG, params)
    assert exact_match.accepts_positions(gathered) and not exact_match.accepts_positions(full)
    a = np.asarray(objective.device_fn(gathered))
    b = np.asarray(objective.device_fn(full))
    assert calls and all(calls)
    np.testing.assert_array_equal(a, b)
    assert 0 < a.sum() < len(a)
