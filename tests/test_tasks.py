"""tiny3 tasks: generators, splits, tokenizer and metrics (checked against hand-computed values)."""

import numpy as np
import pytest

from hm3_jax.tasks import arithmetic, code_output, corpus, data, metrics, translation
from hm3_jax.tasks import tokenizer as tok_lib


@pytest.fixture(scope="module")
def small_data():
    return data.generate_all(seed=3, num_eval=60, num_train=200)


def test_generation_is_deterministic_per_seed(small_data):
    again = data.generate_all(seed=3, num_eval=60, num_train=200)
    assert again == small_data
    other = data.generate_all(seed=4, num_eval=60, num_train=200)
    for task in data.TASK_NAMES:
        assert other[task]["search"] != small_data[task]["search"]


def test_splits_are_70_30_and_disjoint(small_data):
    for task, parts in small_data.items():
        assert len(parts["search"]) == 42 and len(parts["heldout"]) == 18 and len(parts["train"]) == 200
        prompts = {split: {e["prompt"] for e in parts[split]} for split in data.SPLITS}
        for split in data.SPLITS:
            assert len(prompts[split]) == len(parts[split]), f"{task}/{split} has duplicate prompts"
            assert all(e["split"] == split and e["task"] == task for e in parts[split])
        assert not prompts["search"] & prompts["heldout"]
        assert not prompts["train"] & (prompts["search"] | prompts["heldout"])


def test_prompt_formats_are_distinct(small_data):
    starts = {"translation": "translate: ", "math": "Q: ", "code": "code:\n"}
    ends = {"translation": " =>", "math": " A:", "code": "\noutput:"}
    for task, parts in small_data.items():
        for e in parts["search"]:
            assert e["prompt"].startswith(starts[task]) and e["prompt"].endswith(ends[task])
            assert e["target"].startswith(" ") and e["target"].strip() == e["target"][1:]


def test_translation_rules_by_hand():
    dog, cats = ("the big dog", "wuna kesh ti", False), ("some small cats", "pirali lo sa", True)
    verb_see = translation.VERBS[0]
    assert translation.translate_parts(dog, cats, verb_see, "past", ("today", "tomu")) == (
        "the big dog saw some small cats today",
        "tomu wuna kesh ti pirali lo sa mo gorta",
    )
    # plural subject: English base form in the present, Velan plural-subject suffix -n
    assert translation.translate_parts(cats, dog, verb_see, "present", None) == (
        "some small cats see the big dog",
        "pirali lo sa wuna kesh ti mo gorran",
    )


def test_math_answers_are_correct_by_reparsing():
    rng = np.random.default_rng(0)
    words = {"doubles": 2, "triples": 3}
    for _ in range(200):
        prompt, target = arithmetic.sample(rng)
        sentences = prompt[3:-3].split(". ")
        value = int(sentences[0].split()[2])
        for s in sentences[1:-1]:
            numbers = [int(t) for t in s.replace(".", "").split() if t.isdigit()]
            if any(w in s for w in words):
                value *= next(v for w, v in words.items() if w in s)
            elif any(w in s for w in (" gives ", "loses", "sells")) and " more" not in s:
                value -= numbers[0]
            else:
                value += numbers[0]
        assert target == f" {value}" and value >= 0, prompt


def test_code_labels_come_from_running_the_snippet():
    assert code_output.run_snippet("a = 3\nb = a * 4\nprint(b - 2)") == "10"
    assert code_output.run_snippet("xs = [1, 2]\nxs.append(5)\nprint(xs)") == "[1, 2, 5]"
    with pytest.raises(ValueError, match="exactly one line"):
        code_output.run_snippet("x = 1")
    with pytest.raises(NameError):  # no imports / open in the builtins table
        code_output.run_snippet("print(open)")
    rng = np.random.default_rng(1)
    for _ in range(50):
        prompt, target = code_output.sample(rng)
        snippet = prompt[len("code:\n") : -len("\noutput:")]
        assert code_output.run_snippet(snippet) == target[1:]


def test_unknown_task_and_exhausted_generator_raise():
    with pytest.raises(ValueError, match="unknown task"):
        data.generate_task("poetry", 0, 10, 10)
    with pytest.raises(ValueError, match="distinct prompts"):
        data.unique_samples(lambda rng: ("same", "x"), np.random.default_rng(0), 3, name="const")


def test_jsonl_roundtrip(tmp_path, small_data):
    examples = small_data["code"]["search"]
    path = str(tmp_path / "code.jsonl")
    data.write_jsonl(path, examples)
    assert data.read_jsonl(path) == examples
    assert [p.name for p in tmp_path.iterdir()] == ["code.jsonl"]  # no temp file left behind
    grouped = data.group_by_split(small_data["math"]["search"] + small_data["math"]["heldout"])
    assert grouped["search"] == small_data["math"]["search"] and grouped["train"] == []


def test_tokenizer_roundtrip_hf(tmp_path, small_data):
    from transformers import AutoTokenizer

    docs = corpus.documentation_paragraphs()[:200]
    docs += [e["prompt"] + e["target"] for t in small_data.values() for e in t["train"]]
    tok = tok_lib.train_tokenizer(docs, vocab_size=400)
    path = str(tmp_path / "tokenizer")
    tok_lib.save_tokenizer(tok, path)
    loaded = AutoTokenizer.from_pretrained(path)
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert len(loaded) == 400
    for e in small_data["code"]["search"][:10] + small_data["translation"]["search"][:10]:
        text = e["prompt"] + e["target"]
        ids = tok_lib.encode(loaded, text)
        assert loaded.decode(ids) == text
        assert ids == tok_lib.encode(tok, text)
    # digits are single tokens
    assert [loaded.decode([i]) for i in tok_lib.encode(loaded, "x 1234")][-4:] == ["1", "2", "3", "4"]
    with pytest.raises(ValueError, match="vocab_size"):
        tok_lib.train_tokenizer(docs, vocab_size=100)


def test_base_corpus_mixes_task_share(small_data):
    rng = np.random.default_rng(0)
    examples = [e for t in small_data.values() for e in t["train"]]
    docs = corpus.base_corpus(rng, examples, task_share=0.2, max_prose_chars=20000)
    task_chars = sum(len(d) for d in docs if d.startswith(("translate: ", "Q: ", "code:\n")))
    share = task_chars / sum(len(d) for d in docs)
    assert 0.15 < share < 0.3
    with pytest.raises(ValueError, match="task_share"):
        corpus.base_corpus(rng, examples, task_share=1.0)


def test_chrf_hand_computed():
    # default chrF: char n-grams 1..6 over whitespace-stripped text, effective order, beta = 2:
    # F = (1 + b^2) P R / (b^2 P + R) with P, R averaged over orders that exist on both sides.
    def f_beta(p, r, beta=2.0):
        return 100 * (1 + beta**2) * p * r / (beta**2 * p + r)

    # "ab" vs "ac": unigrams P = R = 1/2; bigrams P = R = 0.
    assert metrics.chrf(["ab"], ["ac"]) == pytest.approx(f_beta(0.25, 0.25))
    assert metrics.chrf(["ab"], ["ac"]) == pytest.approx(25.0)
    # "abc" vs "abcd": P = 1 at orders 1..3, R = 3/4, 2/3, 1/2.
    assert metrics.chrf(["abc"], ["abcd"]) == pytest.approx(f_beta(1.0, (3 / 4 + 2 / 3 + 1 / 2) / 3))
    # corpus level sums the statistics of both sentences before the ratios.
    p = (4 / 5 + 2 / 3 + 1 / 1) / 3
    r = (4 / 6 + 2 / 4 + 1 / 2) / 3
    assert metrics.chrf(["ab", "abc"], ["ac", "abcd"]) == pytest.approx(f_beta(p, r))
    assert metrics.chrf(["a b c"], ["abc"]) == pytest.approx(100.0)  # whitespace is ignored
    assert metrics.chrf(["xyz"], ["abc"]) == 0.0
    with pytest.raises(ValueError, match="hypotheses"):
        metrics.chrf(["a"], ["a", "b"])


def test_chrf_scorer_equals_sacrebleu_bit_for_bit():
    """The cached scorer gives exactly `metrics.chrf` (sacrebleu's corpus_score), memo hits included."""
    rng = np.random.default_rng(0)
    words = ["la", "maison", "est", "rouge", "un", "chat", "noir", "dort", "!", "l'eau", ""]
    refs = [" ".join(rng.choice(words[:-1], rng.integers(1, 6))) for _ in range(12)]
    score = metrics.make_chrf_scorer(refs, max_cached=30)
    systems = [[" ".join(rng.choice(words, rng.integers(0, 6))) for _ in refs] for _ in range(6)]
    systems += [systems[0], list(refs), [""] * len(refs), systems[1][:6] + systems[2][6:]]
    for hyps in systems:  # 10 systems x 12 segments: the memo is cleared on the way (max_cached=30)
        assert score(hyps) == metrics.chrf(hyps, refs)  # exact float equality
    assert score(list(refs)) == 100.0
    assert metrics.make_chrf_scorer(["ac"])(["ab"]) == pytest.approx(25.0)  # the hand value above
    with pytest.raises(ValueError, match="hypotheses"):
        score(["a"])
    with pytest.raises(ValueError, match="no examples"):
        metrics.make_chrf_scorer([])


def test_exact_match_and_final_number_by_hand():
    assert metrics.exact_match([" 5", "6", "[1, 2]"], ["5", "7", "[1, 2]"]) == pytest.approx(200 / 3)
    assert metrics.final_number("so 3 + 4 = 7 apples") == "7"
    assert metrics.final_number("x is -12.") == "-12"
    assert metrics.final_number("none") is None
    with pytest.raises(ValueError, match="no examples"):
        metrics.exact_match([], [])
