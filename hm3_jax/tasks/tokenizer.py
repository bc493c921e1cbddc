"""Byte-level BPE tokenizer for tiny3, trained locally with `tokenizers` and saved in Hugging Face format.

Digits are split into single-digit tokens before BPE (numbers are read digit by digit), everything else is
GPT-2 style byte-level BPE. Special tokens: ``<pad>`` (id 0), ``<s>`` (bos, id 1), ``</s>`` (eos, id 2). The
saved directory (tokenizer.json, tokenizer_config.json, special_tokens_map.json) loads with
``transformers.AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hm3_jax.io import atomic

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Trains the byte-level BPE.

    Args:
      texts: training documents.
      vocab_size: total vocabulary size including the 256 byte symbols and 3 special tokens.

    Returns:
      A `transformers.PreTrainedTokenizerFast` with pad/bos/eos set.
    """
    from transformers import (
        PreTrainedTokenizerFast,  # transformers: ~15 s to import, paid only where it is used
    )

    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (256 bytes + specials + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, clean_up_tokenization_spaces=False
    )


def save_tokenizer(tokenizer, path: str) -> None:
    """Saves in HF format atomically: written to a temp directory beside `path`, then renamed into place."""
    with atomic.atomic_directory(path) as tmp:
        tokenizer.save_pretrained(tmp)


def load_tokenizer(path: str):
    """Loads a saved tokenizer with `AutoTokenizer` and checks that pad/bos/eos are set."""
    from transformers import AutoTokenizer  # transformers: ~15 s to import, paid only where it is used

    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json in {path}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(tokenizer, attr) is None:
            raise ValueError(f"tokenizer at {path} has no {attr}")
    return tokenizer


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]
