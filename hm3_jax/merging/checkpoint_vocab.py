"""Vocabularies of checkpoints in a streaming merge: which tensors are token tables, whether two checkpoints'
token ids line up, and re-indexing a model's token rows onto the reference's ids (`tokenizer_source: base`).

    row_b = model_row[model_id(token(b))]  if the model has token(b),  else  base_row[b]

(`vocab.source_rows`), as `hm3_jax.io.vocab.align_to_base_vocab` does on params.
"""

from __future__ import annotations

import filecmp
import os
from collections.abc import Sequence

import numpy as np
from absl import logging

from hm3_jax.io import vocab
from hm3_jax.merging.groups import layer_index
from hm3_jax.merging.safetensors_stream import Checkpoint

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "vocab.txt",
)
# HF names of tables indexed by token id (`<...>.<part>.weight`, [V, D]): input embeddings and LM heads
_TOKEN_TABLE_PARTS = frozenset(
    {"embed_tokens", "lm_head", "wte", "embed_out", "word_embeddings", "tok_embeddings"}
)


def is_token_table(name: str) -> bool:
    """Whether HF tensor `name` has one row per token id (`model.embed_tokens.weight`, `lm_head.weight`,
    GPT-2's `transformer.wte.weight`, ...): a `.weight` outside the blocks whose module is a token table."""
    parts = name.split(".")
    return (
        layer_index(name) is None
        and len(parts) >= 2
        and parts[-1] == "weight"
        and parts[-2] in _TOKEN_TABLE_PARTS
    )


def _has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, n)) for n in TOKENIZER_FILES)


def _same_tokenizer_files(a: str, b: str) -> bool:
    """Both directories hold the same tokenizer files with the same bytes (then the vocabularies are equal)."""
    for name in TOKENIZER_FILES:
        fa, fb = os.path.join(a, name), os.path.join(b, name)
        if os.path.isfile(fa) != os.path.isfile(fb):
            return False
        if os.path.isfile(fa) and not filecmp.cmp(fa, fb, shallow=False):
            return False
    return True


def vocab_maps(reference: Checkpoint, inputs: Sequence[Checkpoint], align: bool) -> list:
    """Per input, None when its token rows already line up with the reference's token ids, else
    `(reference vocab, its vocab)` (`vocab.vocab_of`) for `rows_onto`.

    Vocabularies are compared only when both directories hold tokenizer files (else the shape check speaks);
    equal tokenizer files and row counts are the same vocabulary without loading them. A different vocabulary
    without `align` is a ValueError naming the model and `tokenizer_source: base` (`vocab.check_same_vocab`).
    """
    tables = [n for n in reference.names if is_token_table(n)]
    ref_vocab, out = None, []
    for ckpt in inputs:
        rows_differ = any(n in ckpt.names and ckpt.shape(n)[0] != reference.shape(n)[0] for n in tables)
        if (
            not tables
            or not (_has_tokenizer(reference.path) and _has_tokenizer(ckpt.path))
            or (not rows_differ and _same_tokenizer_files(reference.path, ckpt.path))
        ):
            out.append(None)
            continue
        if not align:
            name = os.path.basename(os.path.normpath(ckpt.path))
            try:
                vocab.check_same_vocab(reference.path, ckpt.path, name)
            except ValueError as err:
                raise ValueError(
                    f"{err} (streaming.merge_checkpoints: tokenizer_source=<the base directory>; "
                    "experiments.merge: `tokenizer_source: base` in the YAML or --tokenizer_source=<base dir>)"
                ) from None
            out.append(None)
            continue
        if ref_vocab is None:
            ref_vocab = vocab.vocab_of(reference.path)
        model_vocab = vocab.vocab_of(ckpt.path)
        out.append(None if model_vocab == ref_vocab and not rows_differ else (ref_vocab, model_vocab))
        if out[-1] is not None:
            logging.info(
                "tokenizer_source base: %s's token rows mapped onto %s's ids (%d tokens only it has, dropped)",
                ckpt.path,
                reference.path,
                len(set(model_vocab) - set(ref_vocab)),
            )
    return out


def rows_onto(rows: np.ndarray, vocabs: tuple, reference_rows: np.ndarray) -> np.ndarray:
    """A model's token table `rows` [V_m, D] re-indexed onto the reference's ids: [V_b, D] whose row b is
    `rows[src[b]]`, or `reference_rows[b]` where `src[b] = -1` (`src = vocab.source_rows`)."""
    ref_vocab, model_vocab = vocabs
    src = vocab.source_rows(ref_vocab, model_vocab, reference_rows.shape[0], rows.shape[0])  # [V_b]
    out = np.asarray(rows)[np.maximum(src, 0)]
    missing = src < 0
    out[missing] = np.asarray(reference_rows)[missing].astype(out.dtype)
    return out
