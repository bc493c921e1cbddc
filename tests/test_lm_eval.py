"""hm3_jax as an lm-evaluation-harness model (`hm3_jax.evaluation`), offline, on one tiny Llama checkpoint.

* the adapter's ``loglikelihood`` (empty context, trailing-space context, left truncation), its
  ``loglikelihood_rolling`` (a text longer than the context: several windows) and ``generate_until`` (stop
  strings, ``max_gen_toks``, a left-truncated context) equal transformers' Flax reference on the same
  checkpoint (its forward, and its greedy step: argmax of the last position, as `generate(do_sample=False)`,
  tests/test_hf_objectives.py checks that step against `generate`);
* requests of many lengths compile the jitted programs once per bucket shape, not once per request;
* the harness's scores through hm3_jax (local task YAMLs over local JSONL files: a generate-until task with
  regex filters and exact match, a multiple-choice task) equal the spec-file path's scores on the same data
  (`spec_objectives.make_objectives` + `score_model`) where the definitions coincide, and the other filter's score
  equals the one computed from transformers' generations;
* `model_args`: ``pretrained=DIR``, ``run=DIR,preference=...`` (both export forms) and ``path_model=DIR``
  give the same model; mistakes are one error naming the key or file;
* the harness tasks as HM3 objectives (`hm3_jax.tasks.harness_task`: the harness's prompts, filters and
  metric on the run's batched kernels): the whole document set scores what the harness scores, each seeded
  split the mean of the harness's per-document values, through `score_model` and the path engine alike.

Offline: conftest sets HF_HUB_OFFLINE, which `datasets` (the harness's loader of local JSONL files) obeys.
"""

import json
import re

import jax
import jax.numpy as jnp
import lm_eval
import numpy as np
import pytest
from lm_eval import utils as lm_eval_utils
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from hm3_jax.evaluation import token_requests
from hm3_jax.evaluation.lm_eval_model import HM3JaxLM
from hm3_jax.evaluation.sources import ModelArgsError
from hm3_jax.paths.engine import make_engine
from hm3_jax.tasks import scoring, spec_data, spec_objectives, spec_zoo
from hm3_jax.tasks import spec as spec_lib
from tests import hf_fixtures

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, merging models is fun",
    "a b c d e f g 1 2 3 4 5",
    "question: what is two plus two? answer: four",
]
PROMPTS = ["the quick brown", "hello", "a b c d e f", "question: what is", "lazy dog jumps over the", "1 2",
           "hello world, merging", "fox"]  # fmt: skip
CONTEXT = 64  # the tiny Llama's max_position_embeddings
MAX_GEN = 5
NUMBER = r"(-?[0-9]+)"  # the generate-until task's second filter: the first number, as gsm8k's flexible one


class Reference:
    """transformers' Flax model of the checkpoint: logits of one unpadded sequence, greedy steps."""

    def __init__(self, model, params):
        self.forward = jax.jit(lambda ids, mask: model(ids, attention_mask=mask, params=params).logits)

    def logprobs(self, ids):
        """float64 [len(ids), V] log-softmax of transformers' logits (right-padded buffer: causal)."""
        buf, mask = np.zeros((1, CONTEXT), np.int32), np.zeros((1, CONTEXT), np.int32)
        buf[0, : len(ids)], mask[0, : len(ids)] = ids, 1
        logits = np.asarray(self.forward(buf, mask), np.float64)[0, : len(ids)]
        return (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True)
        )

    def loglikelihood(self, context, continuation):
        """The hf backend's answer for token lists: (sum log p, greedy) over (c ++ y)[-(L+1):][:-1]."""
        row = (context + continuation)[-(CONTEXT + 1) :]
        logp = self.logprobs(row[:-1])[-len(continuation) :]
        picked = logp[np.arange(len(continuation)), continuation]
        return float(picked.sum()), bool(np.all(logp.argmax(-1) == continuation))

    def greedy(self, prompt, num_new):
        ids = list(prompt)
        for _ in range(num_new):
            ids.append(int(np.argmax(self.logprobs(ids)[-1])))
        return ids[len(prompt) :]


def _text(tokenizer, tokens, until):
    """The hf backend's text, written out: tokens to the first EOS (inclusive), decoded without specials, cut."""
    if 2 in tokens:
        tokens = tokens[: tokens.index(2) + 1]
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    for stop in until + ["</s>"]:
        text = text.split(stop)[0]
    return text


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The checkpoint (config.json, model.safetensors, tokenizer), its reference and one adapter on it."""
    root = tmp_path_factory.mktemp("lm_eval")
    tok = hf_fixtures.tiny_tokenizer(CORPUS, add_bos=True)
    hf_model, hf_params, hf_config = hf_fixtures.make_flax_model(
        "LlamaForCausalLM", seed=3, vocab_size=len(tok), bos_token_id=1, eos_token_id=2, num_hidden_layers=2
    )
    ckpt = hf_fixtures.write_checkpoint(root / "model", hf_config, hf_fixtures.pt_state_dict(hf_params))
    tok.save_pretrained(ckpt)
    lm = HM3JaxLM.create_from_arg_string(f"pretrained={ckpt}", {"batch_size": 4})
    return {"root": root, "ckpt": ckpt, "tok": lm.tokenizer, "ref": Reference(hf_model, hf_params), "lm": lm}


def _requests(kind, args):
    return [Instance(kind, {}, a, i, ("t", i, 1)) for i, a in enumerate(args)]


def test_loglikelihood_matches_transformers(env):
    lm, tok, ref = env["lm"], env["tok"], env["ref"]
    long_context = " ".join(CORPUS * 3)  # > CONTEXT tokens: left-truncated
    pairs = [
        (p, " " + c)
        for p, c in zip(
            PROMPTS, ["fox", "world", "g", "two plus", "dog", "3 4 5", "models", "x"], strict=True
        )
    ]
    pairs += [("hello ", "world"), ("", "hello world"), (long_context, " four")]  # fmt: skip
    got = lm.loglikelihood(_requests("loglikelihood", pairs))
    for (context, continuation), (ll, greedy) in zip(pairs, got, strict=True):
        if (
            context
        ):  # the harness's split: trailing spaces move to the continuation; ids(whole) after ids(ctx)
            stripped = context.rstrip()
            c_ids = tok(stripped)["input_ids"]
            y_ids = tok(context + continuation)["input_ids"][len(c_ids) :]
        else:  # an empty context is the prefix token (BOS)
            c_ids, y_ids = [tok.bos_token_id], tok(continuation, add_special_tokens=False)["input_ids"]
        want_ll, want_greedy = ref.loglikelihood(c_ids, y_ids)
        assert ll == pytest.approx(want_ll, abs=2e-4), (context, continuation)
        assert greedy == want_greedy
    assert len(tok(long_context)["input_ids"]) > CONTEXT
    # a continuation that is the model's own greedy output is greedy
    c_ids = tok(PROMPTS[0])["input_ids"]
    y_ids = ref.greedy(c_ids, 3)
    ll, greedy = lm._loglikelihood_tokens([(None, c_ids, y_ids)])[0]
    assert greedy and ll == pytest.approx(ref.loglikelihood(c_ids, y_ids)[0], abs=2e-4)


def test_requests_compile_once_per_bucket(env):
    """40 requests of 2 to 60 tokens: one program per (row width, target width) bucket."""
    lm = env["lm"]
    rng = np.random.default_rng(0)
    reqs = [(rng.integers(3, 200, size=int(n)).tolist(), rng.integers(3, 200, size=int(m)).tolist())
            for n, m in zip(rng.integers(1, 50, size=40), rng.integers(1, 10, size=40), strict=True)]  # fmt: skip
    before = token_requests._score_batch._cache_size()
    ll, _ = token_requests.loglikelihoods(lm.model, reqs, 4, CONTEXT)
    shapes = {(token_requests.bucket(len(c) + len(y) - 1, CONTEXT), token_requests.bucket(len(y), CONTEXT))
              for c, y in reqs}  # fmt: skip
    assert token_requests._score_batch._cache_size() - before <= len(shapes) <= 8
    np.testing.assert_allclose(ll[:3], [env["ref"].loglikelihood(c, y)[0] for c, y in reqs[:3]], atol=2e-4)


def test_loglikelihood_rolling_matches_transformers(env):
    lm, tok, ref = env["lm"], env["tok"], env["ref"]
    texts = [" ".join(CORPUS * 4), "hello world"]
    got = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]))
    for text, total in zip(texts, got, strict=True):
        ids = tok(text)["input_ids"]
        windows = list(lm_eval_utils.get_rolling_token_windows(ids, tok.bos_token_id, CONTEXT, 1))
        assert (len(windows) > 1) == (len(ids) > CONTEXT)
        want = 0.0
        for inp, pred in windows:  # each token predicted once, from the longest context the window allows
            logp = ref.logprobs(inp)[-len(pred) :]
            want += float(logp[np.arange(len(pred)), pred].sum())
        assert total == pytest.approx(want, abs=1e-3)
    assert len(tok(texts[0])["input_ids"]) > 2 * CONTEXT


def _generation_case(env):
    """Prompts, transformers' greedy tokens and texts with a stop string that cuts one row."""
    tok, ref = env["tok"], env["ref"]
    greedy = [ref.greedy(tok(p)["input_ids"], MAX_GEN) for p in PROMPTS]
    plain = [_text(tok, g, []) for g in greedy]
    row = next(i for i, t in enumerate(plain) if len(t.strip()) >= 3 and i > 0)
    until = [plain[row].strip()[1:3], "\n\n"]
    return greedy, until


def test_generate_until_matches_transformers(env):
    lm, tok, ref = env["lm"], env["tok"], env["ref"]
    greedy, until = _generation_case(env)
    kwargs = {"until": until, "max_gen_toks": MAX_GEN, "do_sample": False}
    long_prompt = " ".join(CORPUS * 3)
    args = [(p, dict(kwargs)) for p in PROMPTS] + [(PROMPTS[1], {"until": ["\n"], "max_gen_toks": 3}),
                                                  (long_prompt, dict(kwargs))]  # fmt: skip
    got = lm.generate_until(_requests("generate_until", args))
    want = [_text(tok, g, until) for g in greedy]
    want.append(_text(tok, greedy[1][:3], ["\n"]))
    truncated = tok(long_prompt)["input_ids"][-(CONTEXT - MAX_GEN) :]  # left-truncated to leave MAX_GEN slots
    want.append(_text(tok, ref.greedy(truncated, MAX_GEN), until))
    assert got == want
    assert any(t != _text(tok, g, []) for t, g in zip(want, greedy, strict=False))  # a stop string did cut
    with pytest.raises(ValueError, match="sampling"):
        lm.generate_until(_requests("generate_until", [("hello", {"do_sample": True, "temperature": 1.0})]))


GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
  cache_dir: {cache}
output_type: generate_until
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: {until}
  max_gen_toks: {max_gen}
  do_sample: false
filter_list:
  - name: strip
    filter:
      - function: regex
        regex_pattern: "(?s)^(.*)$"
      - function: take_first
  - name: number
    filter:
      - function: regex
        regex_pattern: "{number}"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
  cache_dir: {cache}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
MC = [  # (prompt, choices): the spec's rows, choices with their leading space
    ("question: what is two plus two? answer:", [" four", " five", " two plus"]),
    ("the quick brown", [" fox", " dog jumps", " world"]),
    ("hello", [" world", ",", " models is fun", " a"]),
    ("1 2 3", [" 4", " 4 5"]),
    ("a b c", [" d", " e f"]),
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def harness(env):
    """Local JSONL data and task YAMLs (targets half the model's own outputs, answers half its best choice), and
    the harness's evaluation of the adapter on them."""
    lm, tok, ref, root = env["lm"], env["tok"], env["ref"], env["root"]
    greedy, until = _generation_case(env)
    texts = [_text(tok, g, until) for g in greedy]
    targets = [t.strip() if i % 2 == 0 else t.strip() + " x" for i, t in enumerate(texts)]  # half right
    gen_data = _write_jsonl(root / "gen.jsonl", [{"prompt": p, "target": t}
                                                for p, t in zip(PROMPTS, targets, strict=True)])  # fmt: skip
    answers = []
    for (
        prompt,
        choices,
    ) in MC:  # the reference's best choice for even rows (right), another for odd rows (wrong)
        c_ids = tok(prompt)["input_ids"]
        lls = [ref.loglikelihood(c_ids, tok(prompt + c)["input_ids"][len(c_ids) :])[0] for c in choices]
        best = int(np.argmax(lls))
        answers.append(best if len(answers) % 2 == 0 else (best + 1) % len(choices))
    mc_data = _write_jsonl(root / "mc.jsonl", [{"prompt": p, "choices": c, "answer": a}
                                              for (p, c), a in zip(MC, answers, strict=True)])  # fmt: skip
    tasks = root / "tasks"
    tasks.mkdir()
    cache = root / "datasets_cache"
    (tasks / "gen.yaml").write_text(GEN_YAML.format(data=gen_data, cache=cache, until=json.dumps(until),
                                                    max_gen=MAX_GEN, number=NUMBER))  # fmt: skip
    (tasks / "mc.yaml").write_text(MC_YAML.format(data=mc_data, cache=cache))
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_gen", "tiny_mc"], task_manager=manager,
                                  bootstrap_iters=0, log_samples=True)  # fmt: skip
    return {"tasks": tasks, "texts": texts, "targets": targets, "until": until, "gen_data": gen_data,
            "mc_data": mc_data, "out": out}  # fmt: skip


def test_harness_scores_equal_the_spec_path(env, harness):
    lm, tok, root, tasks, out = env["lm"], env["tok"], env["root"], harness["tasks"], harness["out"]
    texts, targets, until = harness["texts"], harness["targets"], harness["until"]
    gen_data, mc_data = harness["gen_data"], harness["mc_data"]
    results = out["results"]
    assert [s["resps"][0][0] for s in out["samples"]["tiny_gen"] if s["filter"] == "strip"] == texts

    # the spec-file path on the same files (one expert = the checkpoint itself): the JSONL tasks, and the harness
    # YAMLs as spec tasks (the harness's own prompts, filters and metric on the run's kernels)
    spec_file = root / "spec.yaml"
    spec_file.write_text(
        f"base: {env['ckpt']}\nexperts: {{a: {env['ckpt']}}}\neval_batch_size: 8\ntasks:\n"
        f"  gen: {{data: {gen_data}, metric: exact_match, objective: a, max_new_tokens: {MAX_GEN}, "
        f"stop: {json.dumps(until)}}}\n  mc: {{data: {mc_data}, metric: multiple_choice, objective: a}}\n"
        "  h_gen: {lm_eval_yaml: tasks/gen.yaml, objective: a, lm_eval_filter: strip}\n"
        "  h_number: {lm_eval_yaml: tasks/gen.yaml, objective: a, lm_eval_filter: number}\n"
        "  h_mc: {lm_eval_yaml: tasks/mc.yaml, objective: a}\n"
    )
    spec = spec_lib.load_spec(str(spec_file))
    assert spec.tasks["h_gen"].metric == "lm_eval" and spec.tasks["h_gen"].data == str(tasks / "gen.yaml")
    whole = {n: {"heldout": spec_data.read_rows(t) if t.metric != "lm_eval" else [{"row": r} for r in range(1, 9)]}
             for n, t in spec.tasks.items()}  # fmt: skip
    whole["h_mc"]["heldout"] = whole["h_mc"]["heldout"][: len(MC)]
    config, eos_ids = lm.model.config, spec_zoo.eos_ids_of(env["ckpt"], tok)
    objs = spec_objectives.make_objectives(spec, whole, tok, config, eos_ids, splits=("heldout",))["heldout"]
    params = {**lm.model.shell, "blocks": lm.model.pool}
    score = {n: scoring.score_model(config, params, o) for n, o in objs.items()}
    assert score["gen"] == pytest.approx(50.0) and 0 < score["mc"] < 100
    for name, key in [("gen", "tiny_gen/exact_match,strip"), ("h_gen", "tiny_gen/exact_match,strip"),
                      ("mc", "tiny_mc/acc,none"), ("h_mc", "tiny_mc/acc,none"),
                      ("h_number", "tiny_gen/exact_match,number")]:  # fmt: skip
        task, metric = key.split("/")
        assert score[name] == pytest.approx(100 * results[task][metric]), name
    # a run's seeded 70 / 30 split of the harness documents, scored by the path engine: the mean of the
    # harness's per-document values over each split (batches of 8: one shape per kernel, one compilation)
    loaded = spec_zoo.load_tasks(str(spec_file), seed=0)
    per_doc = {name: {s["doc_id"]: s[m] for s in out["samples"][t] if s["filter"] == f}
               for name, t, m, f in [("h_gen", "tiny_gen", "exact_match", "strip"), ("h_mc", "tiny_mc", "acc", "none")]}  # fmt: skip
    cases = [(n, s) for n in per_doc for s in spec_lib.SPLITS]
    assert [len(loaded.splits["h_gen"][s]) for s in spec_lib.SPLITS] == [6, 2]
    engine = make_engine(config, lm.model.shell, lm.model.pool, [loaded.objectives[s][n] for n, s in cases],
                         strategy="map", num_threads=1)  # fmt: skip
    got = engine.evaluate(np.asarray(lm.model.path)[None]).scores[0]
    want = [100 * np.mean([per_doc[n][d] for d in loaded.splits[n][s]]) for n, s in cases]
    np.testing.assert_allclose(got, want, atol=1e-9)
    bad = [("{lm_eval_yaml: tasks/nope.yaml, objective: a}", "does not exist"),
           ("{lm_eval_yaml: tasks/gen.yaml, objective: a, metric: exact_match}", "takes its data"),
           ("{lm_eval_yaml: tasks/gen.yaml, objective: a, lm_eval_filter: nope}", "no filter 'nope'"),
           ("{lm_eval_yaml: tasks/mc.yaml, objective: a, lm_eval_metric: bleu}", "no metric 'bleu'"),
           ("{data: gen.jsonl, metric: exact_match, objective: a, lm_eval_metric: acc}", "go with lm_eval_yaml")]  # fmt: skip
    for task_yaml, match in bad:
        spec_file.write_text(
            f"base: {env['ckpt']}\nexperts: {{a: {env['ckpt']}}}\ntasks:\n  t: {task_yaml}\n"
        )
        with pytest.raises(spec_lib.SpecError, match=match):
            spec_zoo.load_tasks(str(spec_file))
    numbers = [(re.findall(NUMBER, t) or ["[invalid]"])[0].strip() for t in texts]  # the second filter
    assert results["tiny_gen"]["exact_match,number"] == pytest.approx(
        np.mean([n == t for n, t in zip(numbers, targets, strict=True)])
    )


def _fake_run(root, ckpt):
    """A finished run's files `suggest` reads, with two front models: pref_0 exported as a plain checkpoint,
    pref_1 as an hm3_jax path model (identity junction over the same blocks)."""
    import shutil

    run = root / "run"
    (run / "exports" / "pref_1" / "path_model_hm3").mkdir(parents=True)
    shutil.copytree(ckpt, run / "exports" / "pref_0" / "path_model")
    (run / "run.json").write_text(json.dumps({"config": {"seed": 0}}))
    hm3 = {"preferences": [[0.8, 0.2], [0.2, 0.8]], "paths": [[0, 1], [0, 1]], "points": [[1, 2], [2, 1]],
           "normalised_points": [[0.5, 1], [1, 0.5]]}  # fmt: skip
    (run / "report.json").write_text(json.dumps({"tasks": ["a", "b"], "methods": {"hm3": hm3}}))
    pm = run / "exports" / "pref_1" / "path_model_hm3"
    (pm / "path.json").write_text(json.dumps({"path": [0, 1], "sources": [str(ckpt)], "preference": [0.2, 0.8],
                                              "num_layers": 2}))  # fmt: skip
    np.savez(pm / "junction.npz", scale=np.ones((2, 32), np.float32), shift=np.zeros((2, 32), np.float32))
    return run


def test_model_args_sources_and_errors(env):
    lm, root, ckpt = env["lm"], env["root"], env["ckpt"]
    run = _fake_run(root, ckpt)
    reqs = [(lm.tok_encode("the quick brown"), lm.tok_encode(" fox jumps", add_special_tokens=False))]
    want, _ = token_requests.loglikelihoods(lm.model, reqs, 1, CONTEXT)
    for args, source in [(f"run={run},preference=0.7:0.3", "pref_0"), (f"run={run},preference=0.1:0.9", "pref_1"),
                         (f"path_model={run}/exports/pref_1/path_model_hm3", "pref_1")]:  # fmt: skip
        other = HM3JaxLM.create_from_arg_string(args, {"batch_size": 1})
        assert source in other.directory
        assert (other.model.junction is None) == (source == "pref_0")
        got, _ = token_requests.loglikelihoods(other.model, reqs, 1, CONTEXT)
        np.testing.assert_allclose(got, want, atol=1e-5)
    bad = [
        ("", "exactly one of"),
        (f"pretrained={ckpt},run={run}", "exactly one of"),
        (f"pretrained={ckpt},preference=0.5:0.5", "preference"),
        (f"run={run}", "needs a preference"),
        (f"pretrained={root}/nowhere", "no such directory"),
        (f"run={run},preference=0.5;0.5", "preference"),
        (f"run={run},preference=0.5:0.3:0.2", "3 entries"),
        (f"pretrained={ckpt},batch_sz=4", "unknown model_args"),
        (f"pretrained={ckpt},dtype=float16", "dtype"),
        (f"pretrained={ckpt},max_length=100", "max_length"),
        (f"path_model={ckpt}", "path.json"),
        (f"pretrained={root}", "config.json"),
    ]
    for args, match in bad:
        with pytest.raises(ModelArgsError, match=match):
            HM3JaxLM.create_from_arg_string(args)
    assert jnp.asarray(lm.model.path).tolist() == [0, 1]


def test_registered_model_and_command_line(env, harness, monkeypatch, capsys):
    """`model="hm3_jax"` with a model_args string goes through the harness's registry; `experiments.harness_eval`
    (the harness's CLI with the model registered; its run indexes the harness's ~thousands of default YAMLs, 7 s
    here, so it is not run) turns a bad model_args into one line naming the key."""
    from experiments import harness_eval

    manager = TaskManager(include_path=str(harness["tasks"]), include_defaults=False)
    out = lm_eval.simple_evaluate(model="hm3_jax", model_args=f"pretrained={env['ckpt']}", tasks=["tiny_mc"],
                                  batch_size=4, task_manager=manager, bootstrap_iters=0)  # fmt: skip
    assert out["results"]["tiny_mc"]["acc,none"] == harness["out"]["results"]["tiny_mc"]["acc,none"]
    assert out["config"]["model"] == "hm3_jax"

    def cli_evaluate():  # what the harness's CLI does with --model hm3_jax --model_args ...
        lm_eval.api.registry.get_model("hm3_jax").create_from_arg_string(
            f"pretrained={env['ckpt']},prefrence=1"
        )

    monkeypatch.setattr(harness_eval, "cli_evaluate", cli_evaluate)
    with pytest.raises(SystemExit) as exit_info:
        harness_eval.main()
    assert exit_info.value.code == 2
    assert "error: unknown model_args ['prefrence']" in capsys.readouterr().err


def test_harness_task_by_name_split_key_and_file_hashes(env, harness, monkeypatch):
    """``{lm_eval: NAME, lm_eval_include_path: DIR}`` finds the task a YAML of DIR registers as NAME (before the
    harness's own registry, which is replaced by an empty directory here: indexing its ~15k YAMLs takes ~8 CPU-s);
    a harness task over a JSONL file splits its documents as a JSONL task over that file splits its rows; a run's
    file hashes cover the data files a task YAML names."""
    from hm3_jax.tasks import harness_loader

    root = env["root"]
    monkeypatch.setattr(harness_loader, "REGISTRY_DIR", str(root / "empty_registry"))
    (root / "empty_registry").mkdir()
    named = root / "named"
    named.mkdir()
    data = named / "gen.jsonl"  # the same rows under the same file name as the JSONL task's: the same split
    data.write_text(open(harness["gen_data"]).read())
    yaml_text = (harness["tasks"] / "gen.yaml").read_text()
    (named / "sums.yaml").write_text(
        yaml_text.replace("task: tiny_gen", "task: my_sums").replace(harness["gen_data"], str(data))
    )
    spec_file = root / "spec_named.yaml"
    head = f"base: {env['ckpt']}\nexperts: {{a: {env['ckpt']}}}\neval_batch_size: 8\ntasks:\n"
    spec_file.write_text(
        head + f"  gen: {{data: {harness['gen_data']}, metric: exact_match, objective: a, max_new_tokens: {MAX_GEN}}}\n"
        "  h_yaml: {lm_eval_yaml: tasks/gen.yaml, objective: a}\n"
        "  h_name: {lm_eval: my_sums, lm_eval_include_path: named, objective: a}\n"
    )  # fmt: skip
    loaded = spec_zoo.load_tasks(str(spec_file), seed=3)
    task = loaded.spec.tasks["h_name"]
    assert (task.data, task.lm_eval_task, task.lm_eval_include_path) == (
        str(named / "sums.yaml"),
        "my_sums",
        str(named),
    )
    assert loaded.harness["h_name"].name == "my_sums" and loaded.harness["h_name"].split_key == "gen.jsonl"
    assert loaded.splits["h_name"] == loaded.splits["h_yaml"] == loaded.splits["gen"]
    assert [len(loaded.splits["gen"][s]) for s in spec_lib.SPLITS] == [6, 2]

    # the data files a harness YAML names are hashed with it: an edit shows, an unchanged file does not
    hashes = spec_lib.file_hashes(loaded.spec)
    assert str(data) in hashes and harness["gen_data"] in hashes
    again = spec_lib.file_hashes(loaded.spec)
    assert again == hashes and spec_lib.changed_files(hashes, again) == []
    data.write_text(open(harness["gen_data"]).read() + json.dumps({"prompt": "x", "target": "y"}) + "\n")
    assert spec_lib.changed_files(hashes, spec_lib.file_hashes(loaded.spec, hashes)) == [str(data)]

    bad = [("{lm_eval: my_sum, lm_eval_include_path: named, objective: a}", r"tasks.t.lm_eval: no harness task 'my_sum'.*close matches: my_sums"),
           ("{lm_eval: my_sums, lm_eval_include_path: nowhere, objective: a}", "lm_eval_include_path: directory .* does not exist"),
           ("{lm_eval: my_sums, lm_eval_yaml: tasks/gen.yaml, objective: a}", r"exactly one of lm_eval_yaml \(a task YAML file\) and lm_eval"),
           ("{lm_eval_yaml: tasks/gen.yaml, lm_eval_include_path: named, objective: a}", "goes with lm_eval")]  # fmt: skip
    for task_yaml, match in bad:
        spec_file.write_text(head + f"  t: {task_yaml}\n")
        with pytest.raises(spec_lib.SpecError, match=match):
            spec_lib.load_spec(str(spec_file))
