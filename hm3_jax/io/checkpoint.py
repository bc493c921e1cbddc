"""`load_pretrained` / `save_pretrained`: Hugging Face checkpoint directories <-> `Model(config, params)`.

    model = hm3_jax.load_pretrained("path/to/Llama-2-7b-hf", dtype=jnp.bfloat16)
    logits = hm3_jax.models.apply(model.config, model.params, input_ids)      # [B, S, V]
    hm3_jax.save_pretrained(model, "out/merged", max_shard_size="2GB")       # transformers loads it

Supported architectures: see `hm3_jax.io.SUPPORTED_ARCHITECTURES`. Weights are read from safetensors only
(single file or shards with an index); pickled `pytorch_model.bin` files are never opened. See docs/io.md.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from hm3_jax.io import atomic, mapping, param_load, param_save, safetensors_io
from hm3_jax.io import hf_config as hf_config_lib
from hm3_jax.io.hf_config_write import hf_dict_from_config
from hm3_jax.models.config import ModelConfig

log = logging.getLogger(__name__)

_DTYPES = {
    np.dtype(np.float32): "float32",
    np.dtype(ml_dtypes.bfloat16): "bfloat16",
}


class Model(NamedTuple):
    """A model: static `config` and `params` (`{"embed", "blocks", "final", "head"}`, blocks [L, ...]).

    `hf_config` is the `config.json` dict the model was loaded from (None for models built in code); saving
    keeps its fields we do not model (token ids, label names) when they still describe `config`.
    """

    config: ModelConfig
    params: dict
    hf_config: dict[str, Any] | None = None


def _check_dtype(dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt not in _DTYPES:
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    return dt


def _progress(desc: str, total: int):
    return lambda it: tqdm(it, desc=desc, total=total, leave=False, disable=total < 2 or None)


def load_pretrained(path: str | os.PathLike, dtype=jnp.float32, on_host: bool = False) -> Model:
    """Loads a local Hugging Face checkpoint directory into our stacked layout.

    Args:
      path: directory with `config.json` and `model.safetensors` or sharded
        `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`.
      dtype: `jnp.float32` or `jnp.bfloat16`; every parameter is cast to it while it is read.
      on_host: params as host (numpy) arrays, nothing placed on a device (a run on a mesh places only its
        pools' shards); default: every tensor `jax.device_put` on the default device.
    Returns:
      `Model(config, params, hf_config)`; `hm3_jax.models.apply(model.config, model.params, inputs)` gives
      logits `[B, S, V]` (LMs) or ViT outputs.
    Raises:
      FileNotFoundError (no directory or no config.json), UnsupportedArchitectureError (lists the supported
      ones), CheckpointError (no safetensors weights -- with conversion instructions for `.bin`-only
      directories -- or a missing, unexpected or wrongly shaped tensor, named, or a tensor holding NaN/Inf,
      named with its file), ValueError (bad dtype).
    """
    dt = _check_dtype(dtype)
    config, hf = hf_config_lib.read_hf_config(path)
    weight_files = safetensors_io.find_weight_files(path)
    with safetensors_io.TensorReader(weight_files) as reader:
        try:  # headers only, before any data is read; names the checkpoint (load_params checks the same)
            param_load.check_tensors(config, reader.names(), reader.shape)
        except safetensors_io.CheckpointError as e:
            config_path = os.path.join(os.fspath(path), hf_config_lib.CONFIG_NAME)
            raise safetensors_io.CheckpointError(f"{config_path} disagrees with the weights: {e}") from None
        num_entries = len(mapping.family_mapping(config).entries)
        params = param_load.load_params(
            config, reader, dt, progress=_progress("loading tensors", num_entries), on_host=on_host
        )
    log.info(
        "loaded %s (%s, %d layers) from %s", hf["architectures"][0], _DTYPES[dt], config.num_layers, path
    )
    return Model(config, params, hf)


def save_pretrained(model: Model, path: str | os.PathLike, max_shard_size: int | str = "2GB") -> None:
    """Writes `model` as a Hugging Face checkpoint directory (PyTorch tensor names, safetensors).

    Args:
      model: a `Model` (or any `(config, params)` pair with those attribute names).
      path: target directory. Written into a temporary sibling first and renamed into place; files of an
        existing directory other than weights and `config.json` (e.g. tokenizer files) are carried over.
      max_shard_size: bytes or a string like `"2GB"`; larger models are split into
        `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`.
    Parameters keep their dtype (float32 or bfloat16; all leaves must share one). transformers' PyTorch
    classes load the result with `from_pretrained(path)`; its Flax classes load the single-file form.
    """
    config, params = model.config, model.params
    if not isinstance(config, ModelConfig):
        raise TypeError(f"model.config must be a ModelConfig, got {type(config).__name__}")
    dtypes = {np.dtype(x.dtype) for x in jax.tree.leaves(params)}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPES:
        raise ValueError(
            f"params must all be float32 or all bfloat16 to save, got dtypes {sorted(map(str, dtypes))}"
        )
    hf = hf_dict_from_config(config, getattr(model, "hf_config", None))
    hf["torch_dtype"] = _DTYPES[dtypes.pop()]
    hf.setdefault("transformers_version", _transformers_version())
    # Bare base models (ViTModel) name tensors without the base-model prefix ("vit."), as transformers does.
    prefix_base = hf["architectures"][0] != "ViTModel"
    specs = param_save.hf_tensor_specs(config, params, prefix_base=prefix_base)
    tensor_fn = param_save.hf_tensor_fn(config, params, prefix_base=prefix_base)
    num_shards = len(
        safetensors_io.plan_shards(
            ((n, int(np.prod(s)) * np.dtype(d).itemsize) for n, s, d in specs),
            safetensors_io.parse_size(max_shard_size),
        )
    )
    path = os.path.abspath(os.fspath(path))
    with atomic.atomic_directory(path) as tmp:
        with open(os.path.join(tmp, hf_config_lib.CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(hf, f, indent=2, sort_keys=True)
            f.write("\n")
        safetensors_io.write_safetensors(
            tmp,
            specs,
            tensor_fn,
            max_shard_size,
            metadata={"format": "pt"},
            progress=_progress("writing shards", num_shards),
        )
        if os.path.isdir(path):
            _carry_over(path, tmp)
    log.info("saved %s (%d shard(s)) to %s", hf["architectures"][0], num_shards, path)


def _is_weight_or_config(name: str) -> bool:
    return (
        name == hf_config_lib.CONFIG_NAME
        or name.endswith(".safetensors")
        or name == safetensors_io.SAFE_WEIGHTS_INDEX_NAME
        or name.startswith("pytorch_model")
        or name in ("flax_model.msgpack", "flax_model.msgpack.index.json", "tf_model.h5")
    )


def _carry_over(old: str, new: str) -> None:
    """Copies files of `old` that are not weights or config (tokenizer, README, ...) into `new`."""
    for name in os.listdir(old):
        if _is_weight_or_config(name) or os.path.exists(os.path.join(new, name)):
            continue
        src = os.path.join(old, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(new, name))
        else:
            shutil.copy2(src, os.path.join(new, name))


def _transformers_version() -> str:
    try:
        return importlib.metadata.version("transformers")
    except Exception:  # noqa: BLE001 - only a label in config.json
        return "unknown"
