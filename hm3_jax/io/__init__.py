"""Hugging Face checkpoint I/O: config.json <-> ModelConfig, safetensors <-> stacked params.

Public entry points live in `hm3_jax.io.checkpoint` (`load_pretrained`, `save_pretrained`, `Model`); this
package holds the pieces: `hf_config` (config.json -> ModelConfig; `hf_rope` its RoPE forms), `hf_config_write`
(the way back), `safetensors_io` (files, shards), `mapping` (the family tables of tensor names; `layouts` the
orientations; `param_load` / `param_save` read and write params with them), `tokenizer` (`load_tokenizer`),
`vocab` (`tokenizer_source: base`: align an expert's token rows to the base tokenizer; `check_same_vocab`).
"""

from hm3_jax.io.hf_config import (
    SUPPORTED_ARCHITECTURES,
    UnsupportedArchitectureError,
    check_no_remote_code,
    config_from_hf_dict,
    read_hf_config,
)
from hm3_jax.io.hf_config_write import hf_dict_from_config
from hm3_jax.io.safetensors_io import CheckpointError, find_weight_files, parse_size
from hm3_jax.io.tokenizer import load_tokenizer
from hm3_jax.io.vocab import align_to_base_vocab, check_same_vocab, vocab_of

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "CheckpointError",
    "UnsupportedArchitectureError",
    "align_to_base_vocab",
    "check_no_remote_code",
    "check_same_vocab",
    "config_from_hf_dict",
    "find_weight_files",
    "hf_dict_from_config",
    "load_tokenizer",
    "parse_size",
    "read_hf_config",
    "vocab_of",
]
