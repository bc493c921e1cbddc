"""Vocabularies of experts: `tokenizer_source: base` (mergekit's meaning) and the same-vocabulary check.

An expert fine-tuned with extra tokens (chat markers, a pad token) or a re-ordered vocabulary has embedding and
LM-head rows that do not line up with the base model's token ids, so merging its params row by row with the
base's would mix unrelated tokens. `align_to_base_vocab` re-indexes the expert onto the base tokenizer's ids:

    row_b = expert_row[expert_id(token(b))]   if the expert's vocabulary has token(b) (and a row for it)
    row_b = base_row[b]                       otherwise (base-only tokens, padding rows without a token)

for every base row b, both for the input embedding `embed/embedding` [V, D] and the untied LM head
`head/kernel` [D, V] (columns). Tokens only the expert has are dropped. The aligned expert then has the base's
`vocab_size` and, on inputs and outputs made of shared tokens, computes exactly the expert's function.

`check_same_vocab` is the guard for merges without that option: it refuses experts whose token -> id map or
`vocab_size` differs from the base's, naming the expert and the option to set.
"""

from __future__ import annotations

import logging
import os

import jax.numpy as jnp
import numpy as np

from hm3_jax.io import hf_config
from hm3_jax.io.tokenizer import load_tokenizer
from hm3_jax.models.config import ModelConfig

log = logging.getLogger(__name__)


def vocab_of(tokenizer_dir: str | os.PathLike) -> dict[str, int]:
    """The token -> id map of the tokenizer saved in a local directory, added tokens included.

    Args:
      tokenizer_dir: a checkpoint or tokenizer directory (`tokenizer.json`, ...), loaded through
        `hm3_jax.io.load_tokenizer` (local files only, never remote code).
    Returns:
      `{token: id}` as `PreTrainedTokenizerFast.get_vocab()` gives it (model vocabulary plus added tokens).
    """
    return dict(load_tokenizer(tokenizer_dir).get_vocab())


def _config_vocab_size(path: str | os.PathLike) -> int | None:
    if not os.path.isfile(os.path.join(os.fspath(path), hf_config.CONFIG_NAME)):
        return None
    return hf_config.read_hf_config(path)[0].vocab_size


def check_same_vocab(base_dir: str | os.PathLike, expert_dir: str | os.PathLike, name: str) -> None:
    """Raises `ValueError` unless expert `name` has the base's vocabulary (same token -> id map and, when both
    directories hold a `config.json`, the same `vocab_size`), saying to set `tokenizer_source: base`.

    Args:
      base_dir, expert_dir: local checkpoint directories with tokenizer files.
      name: how the merge spec names the expert (used in the message).
    """
    base, expert = vocab_of(base_dir), vocab_of(expert_dir)
    problems = []
    if base != expert:
        only_expert = sorted(set(expert) - set(base), key=expert.get)
        only_base = sorted(set(base) - set(expert), key=base.get)
        moved = sorted((t for t in set(base) & set(expert) if base[t] != expert[t]), key=base.get)
        for what, tokens in (
            ("tokens only the expert has", only_expert),
            ("tokens only the base has", only_base),
            ("tokens with other ids", moved),
        ):
            if tokens:
                problems.append(f"{len(tokens)} {what} (e.g. {tokens[:3]})")
    base_size, expert_size = _config_vocab_size(base_dir), _config_vocab_size(expert_dir)
    if base_size is not None and expert_size is not None and base_size != expert_size:
        problems.append(f"config.json vocab_size {expert_size} vs the base's {base_size}")
    if problems:
        raise ValueError(
            f"expert {name!r} ({os.fspath(expert_dir)}) has a different vocabulary from the base "
            f"({os.fspath(base_dir)}): {'; '.join(problems)}. Its embedding and LM-head rows do not line up with "
            "the base's token ids; set `tokenizer_source: base` in the merge spec to map them onto the base "
            "tokenizer (hm3_jax.io.vocab.align_to_base_vocab)."
        )


def source_rows(
    base_vocab: dict[str, int], expert_vocab: dict[str, int], num_base_rows: int, num_expert_rows: int
) -> np.ndarray:
    """For each base row b, the expert row holding the same token, or -1 to keep the base's row.

    Args:
      base_vocab, expert_vocab: `{token: id}` maps (`vocab_of`).
      num_base_rows, num_expert_rows: rows of each embedding table (may exceed the tokenizers' sizes: padding).
    Returns:
      int64 [num_base_rows]; -1 where the expert lacks token(b), where b has no token (padding), or where the
      expert's id has no row (a tokenizer larger than its model, treated as absent, as mergekit does).
    """
    src = np.full((num_base_rows,), -1, np.int64)
    dropped = []
    for token, b in base_vocab.items():
        if b >= num_base_rows:
            dropped.append(token)
            continue
        e = expert_vocab.get(token)
        if e is not None and e < num_expert_rows:
            src[b] = e
    if dropped:
        log.warning(
            "%d base tokens have ids beyond its %d embedding rows (e.g. %r)",
            len(dropped),
            num_base_rows,
            dropped[:3],
        )
    return src


def _table(params: dict, path: tuple[str, str], who: str) -> jnp.ndarray:
    try:
        return params[path[0]][path[1]]
    except KeyError:
        raise ValueError(f"{who} params have no {'/'.join(path)} tensor") from None


def align_to_base_vocab(
    base_vocab: dict[str, int],
    expert_vocab: dict[str, int],
    expert_params: dict,
    base_params: dict,
    config: ModelConfig,
) -> dict:
    """Re-indexes an expert's token rows onto the base tokenizer's ids (`tokenizer_source: base`).

    Args:
      base_vocab, expert_vocab: `{token: id}` of the base's and the expert's tokenizers (`vocab_of`).
      expert_params, base_params: params of family `llama` or `gpt2` (see `hm3_jax/models/llama.py`,
        `gpt2.py`): `embed/embedding` [V_e, D] / [V_b, D], and `head/kernel` [D, V_e] / [D, V_b] when the
        head is untied (`head == {}` when tied; both models must agree).
      config: the expert's `ModelConfig` (family and tying are checked against the params).
    Returns:
      the expert's params with `embed/embedding` [V_b, D] and (untied) `head/kernel` [D, V_b] where row
      (column) b is the expert's row for token(b) if the expert has that token, else the base's row b
      (see the module docstring); every other leaf is the expert's, unchanged. The matching config is
      `config.replace(vocab_size=V_b)`.
    """
    if config.family not in ("llama", "gpt2"):
        raise ValueError(f"align_to_base_vocab: family {config.family!r} has no token vocabulary")
    key = ("embed", "embedding")
    expert_embed, base_embed = _table(expert_params, key, "expert"), _table(base_params, key, "base")
    if expert_embed.shape[1] != base_embed.shape[1]:
        raise ValueError(
            f"embed/embedding: expert is {tuple(expert_embed.shape)} and base {tuple(base_embed.shape)}; "
            "the hidden sizes differ"
        )
    expert_tied, base_tied = (
        "kernel" not in expert_params.get("head", {}),
        "kernel" not in base_params.get("head", {}),
    )
    if expert_tied != base_tied or expert_tied != (config.tie_word_embeddings or config.family == "gpt2"):
        raise ValueError(
            f"head/kernel: the expert's LM head is {'tied' if expert_tied else 'untied'}, the base's "
            f"{'tied' if base_tied else 'untied'}, config.tie_word_embeddings={config.tie_word_embeddings}; "
            "they must agree"
        )
    src = source_rows(base_vocab, expert_vocab, base_embed.shape[0], expert_embed.shape[0])
    has = jnp.asarray(src >= 0)  # [V_b]
    take = jnp.asarray(np.maximum(src, 0))  # [V_b]
    dtype = expert_embed.dtype
    embed = jnp.where(has[:, None], jnp.take(expert_embed, take, axis=0), base_embed.astype(dtype))
    out = dict(expert_params, embed=dict(expert_params["embed"], embedding=embed))
    if not expert_tied:
        expert_head, base_head = expert_params["head"]["kernel"], base_params["head"]["kernel"]  # [D, V]
        head = jnp.where(
            has[None, :], jnp.take(expert_head, take, axis=1), base_head.astype(expert_head.dtype)
        )
        out["head"] = dict(expert_params["head"], kernel=head)
    log.info(
        "tokenizer_source base: %d of %d base rows from the expert, %d from the base; %d expert tokens dropped",
        int(has.sum()),
        src.shape[0],
        src.shape[0] - int(has.sum()),
        len(set(expert_vocab) - set(base_vocab)),
    )
    return out
