"""Writing our params as Hugging Face tensors with the family tables (`mapping.py`): the names, shapes and
dtypes of the tensors in PyTorch's state_dict order (`hf_tensor_specs`), and each tensor built lazily in HF
layout (`hf_tensor_fn`), one at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from hm3_jax.io.layouts import to_hf
from hm3_jax.io.mapping import (
    check_covers,
    entry_hf_shape,
    family_mapping,
    hf_names,
    leaf_at,
    leaf_paths,
    param_shapes,
)
from hm3_jax.models.config import ModelConfig


def hf_tensor_specs(
    config: ModelConfig, params: dict, prefix_base: bool = True
) -> list[tuple[str, tuple, np.dtype]]:
    """`(hf_name, hf_shape, dtype)` of every tensor `params` saves to, in a stable order (blocks by index).

    Raises a ValueError naming the leaf when `params` does not match `config`'s layout (missing leaf, wrong
    shape, mixed dtypes within a split entry).
    """
    mapping = family_mapping(config)
    expected = param_shapes(config, np.float32)
    check_covers(mapping, expected, config)
    for leaf in leaf_paths(expected):
        try:
            value = leaf_at(params, leaf)
        except (KeyError, TypeError):
            raise ValueError(f"params have no leaf {'/'.join(leaf)}, which config requires") from None
        if tuple(value.shape) != tuple(leaf_at(expected, leaf).shape):
            raise ValueError(
                f"params leaf {'/'.join(leaf)} has shape {tuple(value.shape)}, config implies "
                f"{tuple(leaf_at(expected, leaf).shape)}"
            )
    # Order as PyTorch's state_dict: embeddings, blocks 0..L-1, then final norm and head; entries of a family
    # table list the embeddings first.
    globals_ = [e for e in mapping.entries if not e.per_block]
    blocks = [e for e in mapping.entries if e.per_block]
    first = [e for e in globals_ if e.leaves[0][0] == "embed"]
    last = [e for e in globals_ if e.leaves[0][0] != "embed"]
    specs = [_spec(e, None, params, expected, config, mapping, prefix_base) for e in first]
    for l in range(config.num_layers):
        specs.extend(_spec(e, l, params, expected, config, mapping, prefix_base) for e in blocks)
    specs.extend(_spec(e, None, params, expected, config, mapping, prefix_base) for e in last)
    return specs


def _spec(entry, l, params, expected, config, mapping, prefix_base):
    name = entry.hf if l is None else entry.hf.format(l=l)
    if not prefix_base and name.startswith(mapping.base_prefix):
        name = name[len(mapping.base_prefix) :]
    dtypes = {np.dtype(leaf_at(params, leaf).dtype) for leaf in entry.leaves}
    if len(dtypes) != 1:
        raise ValueError(f"leaves {entry.leaves} that form HF tensor {name} have different dtypes {dtypes}")
    return (name, entry_hf_shape(entry, expected, config), dtypes.pop())


def hf_tensor_fn(config: ModelConfig, params: dict, prefix_base: bool = True) -> Callable[[str], np.ndarray]:
    """`hf_name -> np.ndarray` in HF layout, built lazily from `params` (one tensor at a time)."""
    mapping = family_mapping(config)
    expected = param_shapes(config, np.float32)
    lookup = {}
    for entry in mapping.entries:
        for l, name in enumerate(hf_names(entry, config.num_layers)):
            if not prefix_base and name.startswith(mapping.base_prefix):
                name = name[len(mapping.base_prefix) :]
            lookup[name] = (entry, l if entry.per_block else None)

    def tensor_fn(name: str) -> np.ndarray:
        entry, l = lookup[name]
        parts = []
        for leaf in entry.leaves:
            value = leaf_at(params, leaf)
            parts.append(np.asarray(value[l] if l is not None else value))
        joined = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
        return to_hf(entry.kind, joined, entry_hf_shape(entry, expected, config))

    return tensor_fn
