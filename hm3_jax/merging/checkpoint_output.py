"""The output directory of a streaming merge: a temporary sibling renamed into place when complete, the
config.json and tokenizer files copied without remote-code keys, and the check that the config it will carry
agrees with the tensors written.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence

from absl import logging

from hm3_jax.io import atomic, hf_config, param_load
from hm3_jax.merging.checkpoint_vocab import TOKENIZER_FILES

CONFIG_FILES = ("config.json", "generation_config.json")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def atomic_output(out: str, overwrite: bool) -> str:
    """The temporary sibling directory of `out` the merge writes into (`commit_output` renames it to `out`).

    Raises FileExistsError (`out` exists without `overwrite`) or ValueError naming `out` and why it cannot be
    written (a read-only directory, a path below a file), before anything is written."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"output directory {out!r} exists (pass overwrite=True / --overwrite)")
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        return atomic.make_temp_dir(out)
    except OSError as e:
        raise ValueError(
            f"output directory {out!r} cannot be written: {_why_unwritable(parent, e)}"
        ) from None


def _why_unwritable(directory: str, err: OSError) -> str:
    """Why `directory` cannot hold a new directory, naming the path at fault (not a temp file's name)."""
    existing = directory
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing!r} is a file, not a directory"
    if not os.access(existing, os.W_OK):
        return f"no permission to write in {existing!r}"
    return err.strerror or str(err)


def commit_output(tmp: str, out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"output directory {os.path.abspath(out)!r} appeared during the merge")
    atomic.commit_directory(tmp, out, overwrite)


def copy_side_files(
    tmp: str, config_source: str, tokenizer_source: str, dtype_name: str | None, updates=None
):
    """config.json (with `torch_dtype` and `updates` applied) and tokenizer files, without remote-code keys.

    `hf_config.NEVER_WRITTEN_KEYS` (`auto_map`, `trust_remote_code`, ...) would make transformers import code
    shipped with the source checkpoint, which the merged weights do not come with and nobody reviewed, so a
    merge never writes them (from config.json or tokenizer_config.json)."""
    changes = {**({"torch_dtype": dtype_name} if dtype_name else {}), **(updates or {})}
    for name in CONFIG_FILES:
        src = os.path.join(config_source, name)
        if os.path.isfile(src):
            _copy_side_file(src, os.path.join(tmp, name), changes if name == "config.json" else {})
    for name in TOKENIZER_FILES:
        src = os.path.join(tokenizer_source, name)
        if os.path.isfile(src):
            _copy_side_file(src, os.path.join(tmp, name), {})


def _copy_side_file(src: str, dst: str, changes: dict) -> None:
    """Copies `src` to `dst`; a JSON config (`*config.json`) is rewritten with `changes` and without
    `hf_config.NEVER_WRITTEN_KEYS` when either applies (a tokenizer config that is not JSON is copied as is)."""
    config, dropped = None, []
    if src.endswith("config.json"):
        try:
            with open(src) as f:
                config, dropped = hf_config.without_remote_code(json.load(f))
        except (ValueError, AttributeError):  # not JSON, or not an object
            config = None
    if config is None or not (dropped or changes):
        shutil.copy2(src, dst)
        return
    if dropped:
        logging.warning(
            "%s: %s dropped from the merged %s (remote code)", src, dropped, os.path.basename(src)
        )
    with open(dst, "w") as f:
        json.dump({**config, **changes}, f, indent=2)


def check_output_options(tokenizer_source: str | None, max_shard_bytes: int) -> None:
    """A `tokenizer_source` that is not a directory, or a shard size below one byte, is a ValueError naming it
    (before anything is written; a missing tokenizer directory would otherwise give a merge without one)."""
    if tokenizer_source is not None and not os.path.isdir(tokenizer_source):
        raise ValueError(f"tokenizer_source {tokenizer_source!r} is not a directory")
    if max_shard_bytes < 1:
        raise ValueError(f"the shard size limit must be positive, got {max_shard_bytes} bytes")


def check_against_config(config_source: str, updates: dict, entries: Sequence[tuple]) -> None:
    """The output's tensors (`entries`: `(name, dtype, shape)`) agree with the config.json it will carry
    (`config_source`'s, with `updates`), so the merged checkpoint loads (`load_pretrained` makes the same
    check). A config of an architecture hm3_jax does not model is not checked (the merge itself needs none).

    Raises:
      ValueError naming the config.json, the tensor and the config fields (e.g. hidden_size 48, tensors 32).
    """
    config_path = os.path.join(config_source, "config.json")
    if not os.path.isfile(config_path):
        return
    hf = hf_config.read_config_dict(config_path)
    hf, _ = hf_config.without_remote_code(hf)  # dropped from the output
    try:
        config = hf_config.config_from_hf_dict({**hf, **updates}, where=config_path)
    except ValueError as e:  # an architecture or feature we do not model: nothing to check against
        logging.info("%s: weights not checked against it (%s)", config_path, e)
        return
    shapes = {name: tuple(shape) for name, _, shape in entries}
    try:
        param_load.check_tensors(config, sorted(shapes), shapes.__getitem__)
    except ValueError as e:
        raise ValueError(f"{config_path} disagrees with the weights to be written: {e}") from None
