"""What an evaluation runs: a model named by lm-eval `model_args`, loaded as a `PathModel` with its tokenizer.

Exactly one source per evaluation:

* ``pretrained=DIR``: a Hugging Face checkpoint directory (safetensors, tokenizer files), e.g. a run's
  ``exports/pref_<i>/merged`` or ``path_model``, or any checkpoint `hm3_jax.load_pretrained` reads;
* ``run=DIR,preference=a:b:c``: the front model of a finished HM3 run for that preference (`suggest`: the
  front preference nearest in L1), from the run's exports: its ``path_model/`` (a plain checkpoint) or, with
  junction scalings, its ``path_model_hm3/``;
* ``path_model=DIR``: an hm3_jax path model export (``path.json`` + ``junction.npz``, `load_path_model`).

Generation stops at the EOS ids of the directory's ``generation_config.json`` (else ``config.json``, else the
tokenizer's), as transformers' ``generate`` does (`spec_zoo.eos_ids_of`). Nothing is ever unpickled or run
from a checkpoint directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from hm3_jax import models
from hm3_jax.evaluation.token_requests import PathModel
from hm3_jax.io.checkpoint import load_pretrained
from hm3_jax.io.tokenizer import load_tokenizer
from hm3_jax.models.decode import LM_FAMILIES
from hm3_jax.pipeline.export import load_path_model
from hm3_jax.pipeline.suggest import suggest
from hm3_jax.tasks.spec_zoo import eos_ids_of

SOURCES = ("pretrained", "run", "path_model")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class LoadedModel(NamedTuple):
    """model: the `PathModel`; tokenizer: its transformers tokenizer; eos_ids: generation stops at these;
    directory: the checkpoint (or path model) directory it came from; source: how it was chosen (JSON-able)."""

    model: PathModel
    tokenizer: Any
    eos_ids: tuple[int, ...]
    directory: str
    source: dict


class ModelArgsError(ValueError):
    """Bad `model_args`; the message names the key and, where there is one, the file."""


def parse_preference(value) -> np.ndarray:
    """``"0.6:0.3:0.1"`` (or a sequence of numbers) -> float64 [K]."""
    try:
        parts = value.split(":") if isinstance(value, str) else list(value)
        return np.asarray([float(p) for p in parts], np.float64)
    except (TypeError, ValueError) as e:
        raise ModelArgsError(
            f"model_args preference={value!r}: expected numbers separated by ':', e.g. preference=0.6:0.3:0.1"
        ) from e


def load_model(
    pretrained: str | None = None,
    run: str | None = None,
    preference: str | Sequence | None = None,
    path_model: str | None = None,
    dtype: str = "float32",
) -> LoadedModel:
    """The model `model_args` name (module docstring); raises ModelArgsError naming the key or file."""
    given = {k: v for k, v in (("pretrained", pretrained), ("run", run), ("path_model", path_model)) if v}
    if len(given) != 1:
        raise ModelArgsError(
            f"model_args need exactly one of {', '.join(k + '=DIR' for k in SOURCES)}; got "
            f"{sorted(given) or 'none'}"
        )
    if (preference is not None) != bool(run):
        raise ModelArgsError(
            "model_args preference=a:b:c goes with run=DIR (the run's front model for it), and "
            "run=DIR needs a preference"
        )
    if dtype not in DTYPES:
        raise ModelArgsError(f"model_args dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    ((key, directory),) = given.items()
    if not os.path.isdir(directory):
        raise ModelArgsError(f"model_args {key}={directory}: no such directory")
    if key == "run":
        return _from_run(directory, parse_preference(preference), dtype)
    if key == "path_model":
        return _from_path_model(directory, dtype, {"path_model": directory})
    return _from_pretrained(directory, dtype, {"pretrained": directory})


def _from_pretrained(directory: str, dtype: str, source: dict) -> LoadedModel:
    try:
        loaded = load_pretrained(directory, dtype=DTYPES[dtype])
    except (ValueError, OSError) as e:
        raise ModelArgsError(f"model_args pretrained={directory}: {e}") from e
    _check_family(loaded.config, directory)
    params = loaded.params
    path = np.arange(loaded.config.num_layers, dtype=np.int32)
    model = PathModel(loaded.config, models.shell_of(params), params["blocks"], path)
    return _with_tokenizer(model, directory, directory, source)


def _from_path_model(directory: str, dtype: str, source: dict) -> LoadedModel:
    meta_file = os.path.join(directory, "path.json")
    if not os.path.isfile(meta_file):
        raise ModelArgsError(
            f"model_args path_model={directory}: no path.json (an hm3_jax path model export "
            "holds path.json and junction.npz; a plain checkpoint is pretrained=DIR)"
        )
    with open(meta_file) as f:
        shell_dir = json.load(f)["sources"][-1]  # the parameter-merged model: shell, tokenizer, EOS ids
    try:
        config, shell, pool, path, junction = load_path_model(directory, dtype=DTYPES[dtype])
    except (ValueError, OSError, KeyError) as e:
        raise ModelArgsError(f"model_args path_model={directory}: {e}") from e
    _check_family(config, directory)
    junction = {k: jnp.asarray(v, DTYPES[dtype]) for k, v in junction.items()}
    return _with_tokenizer(PathModel(config, shell, pool, path, junction), directory, shell_dir, source)


def _from_run(run_dir: str, preference: np.ndarray, dtype: str) -> LoadedModel:
    try:
        answer = suggest(run_dir, preference)
    except (ValueError, OSError) as e:
        raise ModelArgsError(f"model_args run={run_dir}, preference={preference.tolist()}: {e}") from e
    source = {
        "run": run_dir,
        "preference": answer["preference"],
        "front_index": answer["front_index"],
        "front_preference": answer["front_preference"],
        "path": answer["path"],
    }
    export = answer["export"]
    if export is None:
        raise ModelArgsError(
            f"model_args run={run_dir}: no exports/pref_{answer['front_index']} (the run was "
            "made with export=False); rerun it with --config.export=True"
        )
    plain, with_junction = os.path.join(export, "path_model"), os.path.join(export, "path_model_hm3")
    if os.path.isdir(plain):
        return _from_pretrained(plain, dtype, source)
    if os.path.isdir(with_junction):
        return _from_path_model(with_junction, dtype, source)
    raise ModelArgsError(f"model_args run={run_dir}: {export} holds neither path_model/ nor path_model_hm3/")


def _check_family(config, directory: str) -> None:
    if config.family not in LM_FAMILIES:
        raise ModelArgsError(
            f"{directory}: lm-eval evaluates language models ({', '.join(LM_FAMILIES)}); this "
            f"checkpoint's family is {config.family!r}"
        )


def _with_tokenizer(model: PathModel, directory: str, tokenizer_dir: str, source: dict) -> LoadedModel:
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")) and os.path.isfile(
        os.path.join(directory, "tokenizer.json")
    ):
        tokenizer_dir = directory
    try:
        tokenizer = load_tokenizer(tokenizer_dir)
        eos_ids = eos_ids_of(tokenizer_dir, tokenizer)
    except (ValueError, OSError) as e:
        raise ModelArgsError(f"{tokenizer_dir}: {e}") from e
    return LoadedModel(model, tokenizer, eos_ids, directory, source)
