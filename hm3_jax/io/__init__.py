"""Hugging Face checkpoint I/O: config.json <-> ModelConfig, safetensors <-> stacked params.

Public entry points live in `hm3_jax.model_io` (`load_pretrained`, `save_pretrained`, `Model`); this package
holds the pieces: `hf_config` (config mapping), `safetensors_io` (files, shards, atomic writes), `mapping`
(tensor names and layouts), `tokenizer` (`load_tokenizer`).
"""

from hm3_jax.io.hf_config import (
    SUPPORTED_ARCHITECTURES,
    UnsupportedArchitectureError,
    config_from_hf_dict,
    hf_dict_from_config,
    read_hf_config,
)
from hm3_jax.io.safetensors_io import CheckpointError, find_weight_files, parse_size
from hm3_jax.io.tokenizer import load_tokenizer

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "CheckpointError",
    "UnsupportedArchitectureError",
    "config_from_hf_dict",
    "find_weight_files",
    "hf_dict_from_config",
    "load_tokenizer",
    "parse_size",
    "read_hf_config",
]
