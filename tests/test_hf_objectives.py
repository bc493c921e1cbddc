"""Scores of users' checkpoints equal what transformers says (HM3_SPEC "What a score means").

Tiny random GPT-2, Llama and Mistral checkpoints (tests/hf_fixtures.py, transformers' Flax classes, no torch)
with a real byte-level BPE tokenizer (the Llama-style one adds BOS), loaded by `hm3_jax.load_pretrained`:

* generation (`make_generation_objective`): our greedy tokens, cut at the first of several EOS ids and at stop
  strings, decoded and stripped, equal transformers' Flax `generate(do_sample=False)` per prompt; exact match
  and chrF follow (prompts of different lengths share one left-padded batch on our side);
* multiple choice (`make_multiple_choice_objective`): summed continuation log-probabilities equal
  log_softmax sums of transformers' Flax forward, and the accuracy is the argmax over those;
* the path engine (plain and prefix tree) gives the same scores as `score_model`; `example_fn`'s full-sample
  score is the score; the zoo's chrF objective keeps its numbers.

The per-prompt transformers reference is its own greedy step (argmax of the last position's logits, what
`generate(do_sample=False)` does) on the unpadded prompt, through one jitted Flax forward on a right-padded
buffer (causal: padding after the tokens changes nothing); one batched `generate` call per model checks it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hm3_jax
from hm3_jax import models
from hm3_jax.moo import bootstrap
from hm3_jax.paths.engine import make_engine
from hm3_jax.tasks import generation, metrics, scoring
from hm3_jax.tasks.multiple_choice import make_multiple_choice_objective, pack_multiple_choice
from tests import hf_fixtures

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, merging models is fun",
    "a b c d e f g 1 2 3 4 5",
    "question: what is two plus two? answer: four",
]
PROMPTS = ["the quick brown", "hello", "a b c d e f", "question: what is", "lazy dog jumps over the", "1 2"]
MAX_NEW = 6
BUF = 32  # right-padded buffer of the reference forward
ARCHS = {
    "gpt2": ("GPT2LMHeadModel", dict(n_layer=2, n_positions=64)),
    "llama": ("LlamaForCausalLM", dict(num_hidden_layers=2)),
    "mistral": ("MistralForCausalLM", dict(num_hidden_layers=2)),
}
MC = [  # (prompt, choices, answer)
    ("question: what is two plus two? answer:", [" four", " five", " two plus"], 0),
    ("the quick brown", [" fox", " dog jumps", " world"], 1),
    ("hello", [" world", ",", " models is fun", " a"], 2),
    ("1 2 3", [" 4", " 4 5"], 1),
]


def _tokenizer(add_bos: bool):
    return hf_fixtures.tiny_tokenizer(CORPUS, add_bos)


class Setup:
    """A tiny checkpoint as transformers runs it (`hf_forward`) and as we load it (`config`, `params`)."""

    def __init__(self, arch, tmp_path):
        self.arch = arch
        hf_arch, overrides = ARCHS[arch]
        self.tokenizer = _tokenizer(add_bos=arch != "gpt2")
        vocab = len(self.tokenizer)
        self.hf_model, self.hf_params, hf_config = hf_fixtures.make_flax_model(
            hf_arch, seed=3, vocab_size=vocab, bos_token_id=1, eos_token_id=2, **overrides
        )
        path = hf_fixtures.write_checkpoint(
            tmp_path / arch, hf_config, hf_fixtures.pt_state_dict(self.hf_params)
        )
        model = hm3_jax.load_pretrained(path)
        self.config, self.params = model.config, model.params
        fwd = jax.jit(lambda ids, mask: self.hf_model(ids, attention_mask=mask, params=self.hf_params).logits)
        self.hf_forward = fwd

    def hf_logits(self, ids):
        """float32 [len(ids), V]: transformers' logits of one unpadded sequence."""
        buf, mask = np.zeros((1, BUF), np.int32), np.zeros((1, BUF), np.int32)
        buf[0, : len(ids)], mask[0, : len(ids)] = ids, 1
        return np.asarray(self.hf_forward(buf, mask), np.float32)[0, : len(ids)]

    def hf_greedy(self, prompt_ids, num_new):
        ids = list(prompt_ids)
        for _ in range(num_new):
            ids.append(int(np.argmax(self.hf_logits(ids)[-1])))
        return ids[len(prompt_ids) :]


@pytest.fixture(scope="module", params=list(ARCHS))
def setup(request, tmp_path_factory):
    return Setup(request.param, tmp_path_factory.mktemp("hf"))


def _texts(tokenizer, rows, eos_ids, stop):
    """The reference post-processing, written out: cut at the first eos id, decode, cut at stop strings, strip."""
    out = []
    for row in rows:
        cut = [j for j, t in enumerate(row) if t in eos_ids]
        text = tokenizer.decode(row[: cut[0] if cut else len(row)], skip_special_tokens=True)
        for s in stop:
            if s in text:
                text = text[: text.index(s)]
        out.append(text.strip())
    return out


def _generation_case(setup):
    """Prompts, HF greedy tokens, EOS ids (the tokenizer's + one the model emits mid-way), a stop string."""
    tok = setup.tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    assert len({len(p) for p in prompts}) > 3  # different lengths in one batch
    if setup.config.family == "llama":
        assert all(p[0] == tok.bos_token_id for p in prompts)
    greedy = [setup.hf_greedy(p, MAX_NEW) for p in prompts]
    eos_ids = (tok.eos_token_id, greedy[0][2])  # row 0 stops after 2 tokens (other rows wherever it appears)
    plain = _texts(tok, greedy, eos_ids, ())
    stop_row = next(i for i, t in enumerate(plain) if len(t) >= 3 and i > 0)
    stop = (plain[stop_row][1:3], "\n\n")  # cuts row stop_row after its first character
    return prompts, greedy, eos_ids, stop


def _identity(setup):
    return models.shell_of(setup.params), setup.params["blocks"], np.arange(setup.config.num_layers)


def test_generation_matches_transformers(setup):
    tok = setup.tokenizer
    prompts, greedy, eos_ids, stop = _generation_case(setup)
    texts = _texts(tok, greedy, eos_ids, stop)
    # our decode: every prompt left-padded into batches of 4 (6 prompts -> 8 rows)
    em = generation.make_generation_objective(
        "gen", prompts, texts, tok, 4, "exact_match", MAX_NEW, eos_ids, stop
    )
    shell, pool, path = _identity(setup)
    tokens = np.asarray(scoring.path_device_scores(setup.config, shell, pool, jnp.asarray(path), None, em))
    assert tokens.shape == (8, MAX_NEW)
    np.testing.assert_array_equal(tokens[: len(prompts)], greedy)
    assert generation.decode_generations(tok, tokens[: len(prompts)], eos_ids, stop) == texts

    # targets: half the rows are the model's own stripped output (correct), half are not
    targets = [t if i % 2 == 0 else t + " x" for i, t in enumerate(texts)]
    targets = [" " + t + "\n" if i == 2 else t for i, t in enumerate(targets)]  # targets are stripped too
    expected = np.array([i % 2 == 0 for i in range(len(texts))])
    em = generation.make_generation_objective(
        "gen", prompts, targets, tok, 4, "exact_match", MAX_NEW, eos_ids, stop
    )
    assert em.metric == "generated_exact_match"
    score = scoring.score_model(setup.config, setup.params, em)
    assert score == pytest.approx(100.0 * expected.mean())
    np.testing.assert_array_equal(em.example_fn(tokens), expected)
    assert bootstrap.full_score(em.example_fn(tokens), em.metric) == pytest.approx(score)

    chrf_targets = [t if i % 2 == 0 else CORPUS[i % len(CORPUS)] for i, t in enumerate(texts)]
    ch = generation.make_generation_objective(
        "gen", prompts, chrf_targets, tok, 4, "chrf", MAX_NEW, eos_ids, stop
    )
    score = scoring.score_model(setup.config, setup.params, ch)
    want = metrics.chrf(texts, chrf_targets)
    assert score == pytest.approx(want, abs=1e-9) and 0 < want < 100
    stats = ch.example_fn(tokens)
    np.testing.assert_array_equal(stats, bootstrap.chrf_sentence_stats(texts, chrf_targets))
    assert bootstrap.full_score(stats, "chrf") == pytest.approx(score, abs=1e-9)


def test_hf_generate_agrees_with_the_reference_greedy(setup):
    """transformers' own `generate` (one left-padded batch, its attention mask) gives the reference tokens."""
    tok = setup.tokenizer
    prompts, greedy, eos_ids, _ = _generation_case(setup)
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), tok.eos_token_id, np.int32)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    generate = jax.jit(
        lambda i, m: setup.hf_model.generate(
            i, attention_mask=m, params=setup.hf_params, do_sample=False, max_new_tokens=MAX_NEW,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
        ).sequences
    )  # fmt: skip
    sequences = generate(jnp.asarray(ids), jnp.asarray(mask))
    # Flax generate takes one eos id; cutting its output at the first of eos_ids is what a list gives
    generated = np.asarray(sequences)[:, width:].tolist()
    assert _texts(tok, generated, eos_ids, ()) == _texts(tok, greedy, eos_ids, ())


def _mc_case(setup):
    tok = setup.tokenizer
    prompt_ids, choice_ids = [], []
    for prompt, choices, _ in MC:
        p = tok(prompt)["input_ids"]
        prompt_ids.append(p)
        choice_ids.append([tok(prompt + c)["input_ids"][len(p) :] for c in choices])  # as lm-eval splits
    return prompt_ids, choice_ids


def _hf_choice_logprobs(setup, prompt_ids, choice_ids):
    out = []
    for p, cs in zip(prompt_ids, choice_ids, strict=True):
        row = []
        for c in cs:
            logits = setup.hf_logits(p + c)
            logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
            row.append(sum(float(logp[len(p) - 1 + t, tok]) for t, tok in enumerate(c)))
        out.append(np.array(row))
    return out


def test_multiple_choice_matches_transformers(setup):
    prompt_ids, choice_ids = _mc_case(setup)
    hf = _hf_choice_logprobs(setup, prompt_ids, choice_ids)
    hf_pred = np.array([int(np.argmax(r)) for r in hf])
    answers = [a for _, _, a in MC]
    answers[3] = int(hf_pred[3])  # at least one example right
    answers[0] = (int(hf_pred[0]) + 1) % 3  # and one wrong
    expected = hf_pred == np.array(answers)
    mc = make_multiple_choice_objective("mc", prompt_ids, choice_ids, answers, pad_id=0, batch_size=4)
    assert mc.metric == "multiple_choice"
    shell, pool, path = _identity(setup)
    raw = np.asarray(scoring.path_device_scores(setup.config, shell, pool, jnp.asarray(path), None, mc))
    _, order, offsets = pack_multiple_choice(prompt_ids, choice_ids, 0, 4)
    rows = raw[np.argsort(order)]
    for i, want in enumerate(hf):
        np.testing.assert_allclose(rows[offsets[i] : offsets[i + 1]], want, rtol=1e-4, atol=1e-4)
    score = scoring.score_model(setup.config, setup.params, mc)
    assert score == pytest.approx(100.0 * expected.mean()) and 0 < score < 100
    np.testing.assert_array_equal(mc.example_fn(raw), expected)
    assert bootstrap.full_score(mc.example_fn(raw), mc.metric) == pytest.approx(score)
    # a full-logits forward (no `positions`) gives the same sums
    full = mc.device_fn(lambda ids: models.apply(setup.config, setup.params, ids))
    np.testing.assert_allclose(np.asarray(full), raw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefix_sharing", [True, False])
def test_path_engine_scores_equal_score_model(setup, prefix_sharing):
    if setup.arch != "llama" and not prefix_sharing:
        pytest.skip("one plain-engine run (llama) is enough; the tree is checked on every model")
    tok = setup.tokenizer
    prompts, _, eos_ids, stop = _generation_case(setup)
    targets = ["hello", "the quick brown", "a b", "", "x", "1 2"]
    prompt_ids, choice_ids = _mc_case(setup)
    objs = [
        generation.make_generation_objective(
            "em", prompts, targets, tok, 4, "exact_match", MAX_NEW, eos_ids, stop
        ),
        generation.make_generation_objective(
            "chrf", prompts, targets, tok, 4, "chrf", MAX_NEW, eos_ids, stop
        ),
        make_multiple_choice_objective("mc", prompt_ids, choice_ids, [0, 1, 2, 1], pad_id=0, batch_size=4),
    ]
    if not prefix_sharing:
        objs = objs[2:]  # decode objectives run plain either way
    shell, pool, path = _identity(setup)
    engine = make_engine(
        setup.config, shell, pool, objs, strategy="map", prefix_sharing=prefix_sharing, num_threads=1
    )
    got = engine.evaluate(path[None].astype(np.int32)).scores[0]
    want = [scoring.score_model(setup.config, setup.params, o) for o in objs]
    np.testing.assert_allclose(got, want, atol=1e-9)


class _ToyTokenizer:
    """Token t decodes to chr(ord('a') + t % 26); ids below 3 are special; id 2 is eos."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + t % 26) for t in ids if not (skip_special_tokens and t < 3))


def _old_chrf_host(tokenizer, references, tokens):
    """The chrF objective's host function before generation objectives (decode_until_eos + corpus chrF)."""
    hyps = []
    for row in np.asarray(tokens).tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        hyps.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return metrics.chrf(hyps, [r.strip() for r in references])


def test_zoo_chrf_objective_keeps_its_numbers():
    tok = _ToyTokenizer()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 30, size=int(n)).tolist() for n in rng.integers(1, 6, size=7)]
    refs = [" abcd", "efg hij ", "klm", "nopq", "rs tu", "vw", "xyz a"]
    obj = generation.make_chrf_objective("toy", prompts, refs, tok, batch_size=3, max_new_tokens=5)
    assert obj.metric == "chrf" and obj.kernel is generation.generation_kernel
    for seed in range(4):
        tokens = np.random.default_rng(seed).integers(
            0, 30, size=(9, 5)
        )  # padded rows, eos (2) here and there
        assert obj.host_fn(tokens) == _old_chrf_host(tok, refs, tokens[:7])
        assert bootstrap.full_score(obj.example_fn(tokens), "chrf") == pytest.approx(
            obj.host_fn(tokens), abs=1e-9
        )


def test_bootstrap_knows_every_metric():
    idx = np.array([[0, 0, 1], [2, 2, 2]])
    for metric in ("exact_match", "generated_exact_match", "multiple_choice", "accuracy"):
        np.testing.assert_allclose(
            bootstrap.resampled_scores(np.array([1, 0, 1]), metric, idx), [200 / 3, 100.0]
        )
        assert bootstrap.full_score(np.array([1, 0, 1]), metric) == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="unknown metric"):
        bootstrap.full_score(np.array([1]), "bleu")


def test_generation_objective_validates_its_arguments():
    tok = _ToyTokenizer()
    with pytest.raises(ValueError, match="generation metric"):
        generation.make_generation_objective("t", [[3]], ["a"], tok, 1, "bleu", 2, (2,))
    with pytest.raises(ValueError, match="eos id"):
        generation.make_generation_objective("t", [[3]], ["a"], tok, 1, "chrf", 2, ())
    with pytest.raises(ValueError, match="1 prompts but 2 targets"):
        generation.make_generation_objective("t", [[3]], ["a", "b"], tok, 1, "chrf", 2, (2,))
    with pytest.raises(ValueError, match="answer"):
        make_multiple_choice_objective("t", [[3]], [[[4], [5]]], [2], pad_id=0, batch_size=1)
