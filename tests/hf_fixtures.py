"""Tiny Hugging Face checkpoints for tests, built with transformers' own Flax classes (no torch needed).

`FlaxPreTrainedModel.save_pretrained(safe_serialization=True)` writes *Flax* names (`.../kernel`, metadata
`format=flax`), not the PyTorch names real checkpoints on the Hub carry. So these helpers write the
safetensors file themselves, renaming Flax params to PyTorch names and layouts with the exact inverse of
transformers' `modeling_flax_pytorch_utils.rename_key_and_reshape_tensor` (which needs torch only for the
other direction):

    .../kernel (2-D, Flax [in, out])      -> .../weight [out, in]     (nn.Linear; also GPT-2's Conv1D,
                                                                    which Flax GPT-2 stores [out, in])
    .../kernel (4-D, Flax [kh, kw, C, D]) -> .../weight [D, C, kh, kw] (nn.Conv2d)
    .../scale, .../embedding              -> .../weight

and metadata `{"format": "pt"}`, so `FlaxXxx.from_pretrained(dir)` reads the file through transformers'
PyTorch converter, exactly as it reads a Hub checkpoint. `test_io_fixtures_roundtrip` checks that loop.

Public helpers (usable by every test module):
  `tiny_hf_config(arch, **overrides)`          a tiny transformers config for one supported architecture
  `random_params(shape_tree, seed)`           informative random values for a Flax param shape tree
  `make_flax_model(arch, seed=0, **overrides)` (flax_model, params, hf_config) with random weights
  `pt_state_dict(params)`                      {pytorch_name: np.ndarray} of a Flax param tree
  `write_checkpoint(path, hf_config, state, ...)`  config.json + model.safetensors (or shards + index)
  `make_checkpoint(path, arch, seed=0, ...)`   all of the above; returns (flax_model, params, hf_config)
  `tiny_tokenizer(corpus, add_bos)`            a byte-level BPE (300 tokens; <pad> 0, <s> 1, </s> 2) trained on
                                               `corpus`; with `add_bos` it puts <s> before every text, as Llama's
"""

from __future__ import annotations

import json
import os

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.numpy import save_file

# Imported lazily inside functions: transformers' Flax modules are slow to import.

TINY = {
    "llama": dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
    ),
    "gpt2": dict(vocab_size=97, n_embd=32, n_layer=3, n_head=4, n_positions=64),
    "vit": dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=48,
        image_size=16,
        patch_size=4,
        num_channels=3,
    ),
}

_ARCH = {
    "LlamaForCausalLM": ("LlamaConfig", "FlaxLlamaForCausalLM", "llama"),
    "MistralForCausalLM": ("MistralConfig", "FlaxMistralForCausalLM", "llama"),
    "Qwen2ForCausalLM": ("Qwen2Config", None, "llama"),
    "GPT2LMHeadModel": ("GPT2Config", "FlaxGPT2LMHeadModel", "gpt2"),
    "ViTModel": ("ViTConfig", "FlaxViTModel", "vit"),
    "ViTForImageClassification": ("ViTConfig", "FlaxViTForImageClassification", "vit"),
}


def tiny_hf_config(arch: str, **overrides):
    """A tiny transformers config of architecture `arch` (e.g. "LlamaForCausalLM"), `architectures` set."""
    import transformers

    config_cls, _, family = _ARCH[arch]
    kwargs = dict(TINY[family])
    kwargs.update(overrides)
    config = getattr(transformers, config_cls)(**kwargs)
    config.architectures = [arch]
    return config


def random_params(shape_tree, seed: int = 0) -> dict:
    """Random values for every leaf of a Flax param shape tree, all informative (no zeros, no ones).

    Kernels/embeddings ~ N(0, 0.08^2), biases ~ N(0, 0.1^2), 1-D norm weights ~ 1 + N(0, 0.2^2): unlike the
    library's default init (zero biases, unit norms), a bias or norm put in the wrong place changes outputs.
    """
    rng = np.random.default_rng(seed)
    flat = {}
    for key, leaf in flatten_dict(shape_tree).items():
        shape = tuple(leaf.shape)
        if key[-1] == "bias":
            value = rng.normal(0.0, 0.1, shape)
        elif key[-1] in ("scale", "weight") and len(shape) == 1:
            value = 1.0 + rng.normal(0.0, 0.2, shape)
        else:
            value = rng.normal(0.0, 0.08, shape)
        flat[key] = value.astype(np.float32)
    return unflatten_dict(flat)


def make_flax_model(arch: str, seed: int = 0, **overrides):
    """`(flax_model, params, hf_config)`: transformers' Flax class for `arch` (built with `_do_init=False`)
    and random params from `random_params(seed)`; run it as `flax_model(inputs, params=params)`."""
    import transformers

    config = tiny_hf_config(arch, **overrides)
    flax_cls = _ARCH[arch][1]
    if flax_cls is None:
        raise ValueError(f"transformers has no Flax class for {arch}")
    model = getattr(transformers, flax_cls)(config, _do_init=False)
    return model, random_params(model.params_shape_tree, seed), config


def pt_state_dict(params: dict) -> dict[str, np.ndarray]:
    """PyTorch-named state dict of a Flax param tree (inverse of transformers' PT->Flax rename)."""
    state = {}
    for key, value in flatten_dict(params).items():
        value = np.asarray(value)
        last = key[-1]
        if last == "kernel":
            if value.ndim == 4:
                value = value.transpose(3, 2, 0, 1)
            elif value.ndim == 2:
                value = value.T
            else:
                raise ValueError(f"unexpected kernel rank {value.ndim} at {key}")
            last = "weight"
        elif last in ("scale", "embedding"):
            last = "weight"
        state[".".join(key[:-1] + (last,))] = np.ascontiguousarray(value)
    return state


def write_checkpoint(
    path: str | os.PathLike,
    hf_config,
    state: dict[str, np.ndarray],
    shard_names: list[list[str]] | None = None,
) -> str:
    """Writes `config.json` and `state` (PyTorch names) as an HF safetensors checkpoint into `path`.

    Args:
      hf_config: a transformers config (or a plain dict written as is).
      state: {pytorch_name: array}.
      shard_names: None for one `model.safetensors`; else the tensor names of each shard, written as
        `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`.
    Returns: `path` as a string.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    if isinstance(hf_config, dict):
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
    else:
        hf_config.save_pretrained(path)
    metadata = {"format": "pt"}
    if shard_names is None:
        save_file(state, os.path.join(path, "model.safetensors"), metadata=metadata)
        return path
    n = len(shard_names)
    weight_map = {}
    for i, names in enumerate(shard_names):
        file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: state[k] for k in names}, os.path.join(path, file), metadata=metadata)
        weight_map.update({k: file for k in names})
    total = sum(v.nbytes for v in state.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return path


def make_checkpoint(path: str | os.PathLike, arch: str, seed: int = 0, num_shards: int = 1, **overrides):
    """Builds a random tiny Flax model of `arch` and writes it as a PyTorch-named HF checkpoint at `path`.

    Returns `(flax_model, params, hf_config)`; `num_shards > 1` splits the tensors round-robin over that many
    shards (so each shard holds tensors of every block, as real shards often do not -- both must load).
    """
    model, params, config = make_flax_model(arch, seed=seed, **overrides)
    state = pt_state_dict(params)
    shards = None
    if num_shards > 1:
        names = list(state)
        shards = [names[i::num_shards] for i in range(num_shards)]
    write_checkpoint(path, config, state, shards)
    return model, params, config


def tiny_tokenizer(corpus, add_bos: bool):
    """A `PreTrainedTokenizerFast`: byte-level BPE of 300 tokens trained on `corpus` (x10), specials <pad> (0),
    <s> (1), </s> (2), no pad token set; `add_bos`: Llama's rule, "<s>" before every encoded text."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(list(corpus) * 10, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
