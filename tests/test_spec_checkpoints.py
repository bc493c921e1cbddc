"""Checkpoints written by transformers through the spec path (hm3_jax/tasks/spec_zoo.py): Llama (BOS), Qwen2 (q/k/v
bias, tied embeddings, no BOS), GPT-2 and Mistral load, tokenise with their own rule and score; and every bad
checkpoint is one error naming the expert and the field (or file, or row), raised before anything is written."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from hm3_jax.tasks import scoring, spec_zoo
from hm3_jax.tasks.spec import SpecError
from tests import hf_fixtures

CORPUS = ["the quick brown fox jumps over the lazy dog", "one plus one is two", "two plus two is four"]
GEN = [
    ("one plus one is", " two"),
    ("two plus two is", " four"),
    ("the quick brown", " fox"),
    ("the lazy", " dog"),
]
MC = [("one plus one is", [" two", " four"], 0), ("the quick brown", [" dog", " fox"], 1)]
ARCHS = {  # name: (architecture, adds BOS, config overrides)
    "llama": ("LlamaForCausalLM", True, dict(num_hidden_layers=2)),
    "mistral": ("MistralForCausalLM", True, dict(num_hidden_layers=2)),
    "gpt2": ("GPT2LMHeadModel", False, dict(n_layer=2)),
    "qwen2": ("Qwen2ForCausalLM", False, dict(num_hidden_layers=2)),
}


def _checkpoint(path, arch: str, seed: int, tokenizer, **overrides):
    """A transformers-written checkpoint of `arch` with `tokenizer`'s vocabulary and ids, tokenizer files beside."""
    import transformers

    name, _, kw = ARCHS[arch]
    ids = dict(bos_token_id=1, eos_token_id=2)
    kw = dict(kw, vocab_size=len(tokenizer), **ids, **overrides)
    if (
        arch == "qwen2"
    ):  # no Flax Qwen2 in transformers: Llama weights with q/k/v biases, written as Qwen2Config
        _, params, _ = hf_fixtures.make_flax_model("LlamaForCausalLM", seed=seed, attention_bias=True, **kw)
        state = hf_fixtures.pt_state_dict(params)
        for n in [n for n in state if n.endswith("o_proj.bias") or n == "lm_head.weight"]:
            del state[n]
        cfg = transformers.Qwen2Config(**{**hf_fixtures.TINY["llama"], **kw}, tie_word_embeddings=True)
        cfg.architectures = [name]
        hf_fixtures.write_checkpoint(path, cfg, state)
    else:
        hf_fixtures.make_checkpoint(path, name, seed=seed, **kw)
    tokenizer.save_pretrained(str(path))
    return str(path)


def _spec(root, experts: dict, extra: str = "", gen_rows=None):
    gen_rows = gen_rows or GEN
    rows = [
        {"prompt": p, "target": t, "split": "search" if i % 2 else "heldout"}
        for i, (p, t) in enumerate(gen_rows)
    ]
    with open(root / "gen.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    mc = [
        {"prompt": p, "choices": c, "answer": a, "split": s}
        for (p, c, a), s in zip(MC, ("search", "heldout"), strict=True)
    ]
    with open(root / "mc.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in mc)
    experts_yaml = "".join(f"  {k}: {v}\n" for k, v in experts.items())
    first = next(iter(experts))
    text = (f"base: base\nexperts:\n{experts_yaml}tasks:\n"
            f"  gen: {{data: gen.jsonl, metric: exact_match, objective: {first}, stop: ['.']}}\n"
            f"  mc: {{data: mc.jsonl, metric: multiple_choice, objective: {first}}}\n{extra}")  # fmt: skip
    (root / "spec.yaml").write_text(text)
    return str(root / "spec.yaml")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_transformers_checkpoints_run_through_the_spec(tmp_path, arch):
    tok = hf_fixtures.tiny_tokenizer(CORPUS, add_bos=ARCHS[arch][1])
    _checkpoint(tmp_path / "base", arch, 0, tok)
    _checkpoint(tmp_path / "expert", arch, 1, tok)
    zoo = spec_zoo.load(_spec(tmp_path, {"a": "expert"}))
    assert zoo.tasks == ("a",) and zoo.groups == {"gen": "a", "mc": "a"}
    assert zoo.eos_ids == (2,)
    # the tokenizer's own special-token rule: BOS for Llama and Mistral, none for GPT-2 and Qwen2
    prompts = zoo.objectives["search"]["gen"].arrays.tree["prompt_ids"].reshape(-1, 8)
    mask = zoo.objectives["search"]["gen"].arrays.tree["prompt_mask"].reshape(-1, 8)
    first = prompts[0][np.argmax(mask[0])]
    assert (first == 1) == ARCHS[arch][1]
    base = zoo.base
    if arch == "qwen2":
        assert base.config.attention_bias and not base.config.attention_out_bias
        assert base.config.tie_word_embeddings
    for split in ("search", "heldout"):
        for obj in zoo.objectives[split].values():
            score = scoring.score_model(base.config, base.params, obj)
            assert 0.0 <= score <= 100.0


@pytest.fixture
def llama_tok():
    return hf_fixtures.tiny_tokenizer(CORPUS, add_bos=True)


def test_expert_with_other_depth_names_expert_and_field(tmp_path, llama_tok):
    _checkpoint(tmp_path / "base", "llama", 0, llama_tok)
    _checkpoint(tmp_path / "deep", "llama", 1, llama_tok, num_hidden_layers=3)
    with pytest.raises(SpecError, match=r"expert 'a' \(.*deep\): num_layers is 3 but the base's is 2"):
        spec_zoo.load(_spec(tmp_path, {"a": "deep"}))


def test_expert_with_other_width_names_expert_and_field(tmp_path, llama_tok):
    _checkpoint(tmp_path / "base", "llama", 0, llama_tok)
    _checkpoint(tmp_path / "wide", "llama", 1, llama_tok, intermediate_size=64)
    with pytest.raises(SpecError, match=r"expert 'a' .*intermediate_size is 64 but the base's is 48"):
        spec_zoo.load(_spec(tmp_path, {"a": "wide"}))


def test_expert_of_other_architecture(tmp_path, llama_tok):
    _checkpoint(tmp_path / "base", "llama", 0, llama_tok)
    _checkpoint(tmp_path / "gpt", "gpt2", 1, llama_tok)
    with pytest.raises(SpecError, match=r"expert 'a' .*family is 'gpt2' but the base's is 'llama'"):
        spec_zoo.load(_spec(tmp_path, {"a": "gpt"}))


def test_other_vocabulary_needs_tokenizer_source(tmp_path, llama_tok):
    """An expert with added tokens: refused (naming it and the option) unless `tokenizer_source: base`, which
    maps its rows onto the base's ids (the shared tokens' rows are the expert's own)."""
    base = _checkpoint(tmp_path / "base", "llama", 0, llama_tok)
    bigger = hf_fixtures.tiny_tokenizer(CORPUS, add_bos=True)
    bigger.add_tokens(["<math>", "<code>"])
    _checkpoint(tmp_path / "added", "llama", 1, bigger)
    with pytest.raises(ValueError, match=r"(?s)'a'.*tokenizer_source: base"):
        spec_zoo.load(_spec(tmp_path, {"a": "added"}))
    zoo = spec_zoo.load(_spec(tmp_path, {"a": "added"}, "tokenizer_source: base\n"))
    import hm3_jax

    own = hm3_jax.load_pretrained(str(tmp_path / "added"))
    expert = zoo.experts["a"]
    assert expert.config == zoo.base.config and expert.config.vocab_size == len(llama_tok)
    n = len(llama_tok)  # the base's ids are the first n of the expert's (added tokens come last)
    np.testing.assert_array_equal(expert.params["embed"]["embedding"], own.params["embed"]["embedding"][:n])
    np.testing.assert_array_equal(expert.params["head"]["kernel"], own.params["head"]["kernel"][:, :n])
    assert os.path.isdir(base)


def test_bin_only_checkpoint_is_never_unpickled(tmp_path, llama_tok):
    _checkpoint(tmp_path / "base", "llama", 0, llama_tok)
    path = _checkpoint(tmp_path / "pt", "llama", 1, llama_tok)
    os.remove(os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
        f.write(b"not to be opened")
    with pytest.raises(Exception, match=r"(?s)pt.*safetensors"):
        spec_zoo.load(_spec(tmp_path, {"a": "pt"}))


def test_remote_code_is_refused(tmp_path, llama_tok):
    _checkpoint(tmp_path / "base", "llama", 0, llama_tok)
    path = _checkpoint(tmp_path / "remote", "llama", 1, llama_tok)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"(?s)remote.*config.json.*auto_map|auto_map.*config.json"):
        spec_zoo.load(_spec(tmp_path, {"a": "remote"}))


def test_prompt_longer_than_the_context_names_the_row(tmp_path, llama_tok):
    _checkpoint(tmp_path / "base", "llama", 0, llama_tok)
    _checkpoint(tmp_path / "expert", "llama", 1, llama_tok)
    long = [*GEN[:3], (" ".join(["the quick brown fox"] * 20), " dog")]  # > 64 positions
    with pytest.raises(SpecError, match=r"task 'gen' .*row 4: the prompt has \d+ tokens.*context of 64"):
        spec_zoo.load(_spec(tmp_path, {"a": "expert"}, gen_rows=long))


def test_bfloat16_spec_loads_every_model_in_bfloat16(tmp_path, llama_tok):
    _checkpoint(tmp_path / "base", "llama", 0, llama_tok)
    _checkpoint(tmp_path / "expert", "llama", 1, llama_tok)
    zoo = spec_zoo.load(_spec(tmp_path, {"a": "expert"}, "dtype: bfloat16\n"))
    for model in (zoo.base, zoo.experts["a"]):
        assert {x.dtype for x in __import__("jax").tree.leaves(model.params)} == {jnp.dtype(jnp.bfloat16)}


def test_t_max_below_depth_is_refused_before_anything_is_written(tmp_path, llama_tok):
    from experiments.configs import checkpoints
    from hm3_jax.pipeline import run as run_lib
    from hm3_jax.pipeline import run_config

    _checkpoint(tmp_path / "base", "llama", 0, llama_tok)
    _checkpoint(tmp_path / "expert", "llama", 1, llama_tok)
    config = checkpoints.get_config(_spec(tmp_path, {"a": "expert"}) + ",smoke")
    assert (config.arch.rl.t_max, config.arch.rl.t_min) == (4, 2)  # from the base's 2 blocks
    config.arch.rl.t_max = 1
    with pytest.raises(run_config.ConfigError, match=r"t_max=1 is smaller than the models' 2 blocks"):
        run_lib.setup(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_cli_mistake_is_one_line_and_exit_code_2(tmp_path, llama_tok):
    import subprocess
    import sys

    _checkpoint(tmp_path / "base", "llama", 0, llama_tok)
    _checkpoint(tmp_path / "expert", "llama", 1, llama_tok)
    spec = _spec(tmp_path, {"a": "expert"})
    with open(tmp_path / "mc.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "p", "choices": ["x"], "answer": 3}) + "\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "experiments.run_hm3", f"--config={repo}/experiments/configs/checkpoints.py:{spec}",
           f"--workdir={tmp_path / 'run'}"]  # fmt: skip
    out = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'mc.jsonl'}:3: answer index 3 is out of range for 1 choices"
    )
    assert "Traceback" not in out.stderr and not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("how", ["truncated", "pickle"])
def test_unreadable_weights_name_the_expert_and_the_file(tmp_path, llama_tok, how):
    import pickle

    _checkpoint(tmp_path / "base", "llama", 0, llama_tok)
    path = _checkpoint(tmp_path / "bad", "llama", 1, llama_tok)
    weights = os.path.join(path, "model.safetensors")
    data = open(weights, "rb").read()
    with open(weights, "wb") as f:
        f.write(data[: len(data) // 2] if how == "truncated" else pickle.dumps({"a": 1}))  # never unpickled
    with pytest.raises(
        SpecError, match=r"expert 'a' \(.*bad\): .*bad/model.safetensors: not a readable safetensors"
    ):
        spec_zoo.load(_spec(tmp_path, {"a": "bad"}))
