"""Tokenizers of a local checkpoint directory, through transformers' `AutoTokenizer` (never remote code)."""

from __future__ import annotations

import os

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def load_tokenizer(path: str | os.PathLike, **kwargs):
    """Loads the tokenizer saved in the local directory `path` with `transformers.AutoTokenizer`.

    Args:
      path: a local checkpoint directory holding the tokenizer files (e.g. `tokenizer.json`).
      kwargs: passed to `AutoTokenizer.from_pretrained` (e.g. `padding_side="left"`); `trust_remote_code` and
        hub lookups are refused.
    Returns:
      a transformers tokenizer.
    """
    path = os.fspath(path)
    if kwargs.get("trust_remote_code"):
        raise ValueError("load_tokenizer never runs remote code; trust_remote_code=True is refused")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
    if not any(os.path.isfile(os.path.join(path, name)) for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{path!r} holds no tokenizer files (looked for {', '.join(_TOKENIZER_FILES)})"
        )
    from transformers import AutoTokenizer

    kwargs = dict(kwargs, trust_remote_code=False, local_files_only=True)
    return AutoTokenizer.from_pretrained(path, **kwargs)
