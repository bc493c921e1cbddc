"""`tokenizer_source: base`: experts with other vocabularies re-indexed onto the base tokenizer's ids, on tiny
checkpoints and tokenizers written by transformers / tokenizers."""

import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from hm3_jax import models
from hm3_jax.io.checkpoint import load_pretrained
from hm3_jax.io.vocab import align_to_base_vocab, check_same_vocab, source_rows, vocab_of
from tests import hf_fixtures

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "merging models keeps what each expert learned",
    "a fox and a dog merge their models",
] * 10


def _tokenizer(specials, vocab_size, added=()):
    """A BPE tokenizer trained in the test (whitespace pre-tokenizer), wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tok_models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>")
    fast.add_tokens(list(added))
    return fast


def _checkpoint(path, arch, tokenizer, seed, pad_rows=0):
    """A random tiny checkpoint whose embedding has one row per token (+ `pad_rows`), with its tokenizer."""
    hf_fixtures.make_checkpoint(path, arch, seed=seed, vocab_size=len(tokenizer) + pad_rows)
    tokenizer.save_pretrained(path)
    return load_pretrained(path)


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """Base: trained vocab + one added token `<base_only>` + 3 padding rows. Expert: the same trained vocab with
    two added tokens `<x1>`, `<x2>` and embeddings resized to them -- so `<x1>` has the id of `<base_only>`."""
    root = tmp_path_factory.mktemp("vocab")
    base_tok = _tokenizer(["[UNK]", "<s>"], 60, added=["<base_only>"])
    expert_tok = _tokenizer(["[UNK]", "<s>"], 60, added=["<x1>", "<x2>"])
    base = _checkpoint(root / "base", "LlamaForCausalLM", base_tok, seed=0, pad_rows=3)
    expert = _checkpoint(root / "expert", "LlamaForCausalLM", expert_tok, seed=1)
    return root, base, expert


def test_vocab_of_includes_added_tokens(llama_pair):
    root, base, expert = llama_pair
    vb, ve = vocab_of(root / "base"), vocab_of(root / "expert")
    assert len(vb) == base.config.vocab_size - 3 and len(ve) == expert.config.vocab_size
    assert ve["<x1>"] == vb["<base_only>"] == len(vb) - 1 and ve["<x2>"] == len(vb)
    assert "<x1>" not in vb and "<base_only>" not in ve


def test_check_same_vocab_names_the_expert_and_the_option(llama_pair):
    root, _, _ = llama_pair
    check_same_vocab(root / "base", root / "base", "itself")  # no error
    with pytest.raises(ValueError) as err:
        check_same_vocab(root / "base", root / "expert", "chat")
    msg = str(err.value)
    assert "'chat'" in msg and "tokenizer_source: base" in msg and str(root / "expert") in msg
    assert "2 tokens only the expert has" in msg and "1 tokens only the base has" in msg
    assert "vocab_size 62 vs the base's 64" in msg


def test_check_same_vocab_sees_a_size_difference_alone(tmp_path, llama_pair):
    root, _, _ = llama_pair
    shutil.copytree(root / "base", tmp_path / "padded")
    hf_fixtures.make_checkpoint(tmp_path / "padded", "LlamaForCausalLM", vocab_size=80)
    with pytest.raises(ValueError, match=r"vocab_size 80 vs the base's 64.*tokenizer_source: base"):
        check_same_vocab(root / "base", tmp_path / "padded", "padded")


def test_source_rows_hand_computed():
    base = {"a": 0, "b": 1, "c": 2, "far": 9}  # "far" has no row in a 5-row table; rows 3, 4 are padding
    expert = {"b": 0, "a": 1, "z": 2, "c": 7}  # "c" beyond the expert's 3 rows: absent, as in mergekit
    np.testing.assert_array_equal(source_rows(base, expert, 5, 3), [1, 0, -1, -1, -1])


def test_align_hand_computed_rows_tied_and_untied():
    cfg = models.ModelConfig(family="llama", vocab_size=4, hidden_size=8, num_heads=2, num_layers=1)
    base_vocab, expert_vocab = {"a": 0, "b": 1, "c": 2, "d": 3}, {"d": 0, "x": 1, "a": 2}
    base = {
        "embed": {"embedding": jnp.arange(32.0).reshape(4, 8)},
        "head": {"kernel": -jnp.arange(32.0).reshape(8, 4)},
    }
    expert = {
        "embed": {"embedding": 100 + jnp.arange(24.0).reshape(3, 8)},
        "head": {"kernel": 100 + jnp.arange(24.0).reshape(8, 3)},
        "blocks": {"w": jnp.ones(2)},
    }
    out = align_to_base_vocab(base_vocab, expert_vocab, expert, base, cfg)
    e, h = np.asarray(expert["embed"]["embedding"]), np.asarray(expert["head"]["kernel"])
    be, bh = np.asarray(base["embed"]["embedding"]), np.asarray(base["head"]["kernel"])
    np.testing.assert_array_equal(out["embed"]["embedding"], np.stack([e[2], be[1], be[2], e[0]]))
    np.testing.assert_array_equal(
        out["head"]["kernel"], np.stack([h[:, 2], bh[:, 1], bh[:, 2], h[:, 0]], axis=1)
    )
    assert out["blocks"] is expert["blocks"]
    tied = align_to_base_vocab(
        base_vocab,
        expert_vocab,
        dict(expert, head={}),
        dict(base, head={}),
        cfg.replace(tie_word_embeddings=True),
    )
    assert tied["head"] == {} and np.array_equal(tied["embed"]["embedding"], out["embed"]["embedding"])
    with pytest.raises(ValueError, match="head/kernel: the expert's LM head is tied, the base's untied"):
        align_to_base_vocab(base_vocab, expert_vocab, dict(expert, head={}), base, cfg)
    with pytest.raises(ValueError, match="hidden sizes differ"):
        small = dict(expert, embed={"embedding": jnp.zeros((3, 4))})
        align_to_base_vocab(base_vocab, expert_vocab, small, base, cfg)


def _shared_ids(vb, ve):
    shared = sorted(set(vb) & set(ve), key=vb.get)
    return np.array([vb[t] for t in shared]), np.array([ve[t] for t in shared])


def _check_aligned_function(base, expert, vb, ve, seed=0):
    """The aligned expert: rows from the expert for shared tokens, from the base otherwise, and on shared-token
    inputs its logits over shared base ids equal the expert's own logits over the same tokens."""
    aligned = align_to_base_vocab(vb, ve, expert.params, base.params, expert.config)
    config = expert.config.replace(vocab_size=base.config.vocab_size)
    b_ids, e_ids = _shared_ids(vb, ve)
    emb, e_emb, b_emb = (np.asarray(p["embed"]["embedding"]) for p in (aligned, expert.params, base.params))
    assert emb.shape == b_emb.shape
    np.testing.assert_array_equal(emb[b_ids], e_emb[e_ids])
    others = np.setdiff1d(np.arange(emb.shape[0]), b_ids)  # base-only tokens and padding rows
    assert others.size > 0
    np.testing.assert_array_equal(emb[others], b_emb[others])
    if base.params["head"]:
        head, e_head, b_head = (
            np.asarray(p["head"]["kernel"]) for p in (aligned, expert.params, base.params)
        )
        np.testing.assert_array_equal(head[:, b_ids], e_head[:, e_ids])
        np.testing.assert_array_equal(head[:, others], b_head[:, others])
    pick = np.random.default_rng(seed).integers(0, len(b_ids), size=(2, 12))
    ours = models.apply(config, aligned, jnp.asarray(b_ids[pick], jnp.int32))
    theirs = models.apply(expert.config, expert.params, jnp.asarray(e_ids[pick], jnp.int32))
    np.testing.assert_allclose(
        np.asarray(ours)[..., b_ids], np.asarray(theirs)[..., e_ids], rtol=1e-5, atol=1e-5
    )
    assert ours.shape[-1] == base.config.vocab_size


def test_llama_expert_with_added_tokens_aligned_to_base(llama_pair):
    root, base, expert = llama_pair
    vb, ve = vocab_of(root / "base"), vocab_of(root / "expert")
    _check_aligned_function(base, expert, vb, ve)
    # `<base_only>` keeps the base's row although the expert's row with that id (`<x1>`) exists.
    aligned = align_to_base_vocab(vb, ve, expert.params, base.params, expert.config)
    i = vb["<base_only>"]
    np.testing.assert_array_equal(aligned["embed"]["embedding"][i], base.params["embed"]["embedding"][i])


def test_gpt2_tied_expert_with_shifted_ids(tmp_path):
    """GPT-2 (tied head): the expert's tokenizer was trained with an extra special token first, so every shared
    token has another id (+1) -- rows must follow the token strings, not the ids."""
    base_tok = _tokenizer(["[UNK]", "<s>"], 60)
    expert_tok = _tokenizer(["<x1>", "[UNK]", "<s>"], 61, added=["<x2>"])
    base = _checkpoint(tmp_path / "base", "GPT2LMHeadModel", base_tok, seed=2, pad_rows=2)
    expert = _checkpoint(tmp_path / "expert", "GPT2LMHeadModel", expert_tok, seed=3)
    vb, ve = vocab_of(tmp_path / "base"), vocab_of(tmp_path / "expert")
    b_ids, e_ids = _shared_ids(vb, ve)
    assert len(b_ids) == len(vb) and np.all(e_ids == b_ids + 1)  # every base token, each moved by one
    _check_aligned_function(base, expert, vb, ve, seed=1)
    aligned = align_to_base_vocab(vb, ve, expert.params, base.params, expert.config)
    assert aligned["head"] == {} and aligned["embed"]["position"] is expert.params["embed"]["position"]
