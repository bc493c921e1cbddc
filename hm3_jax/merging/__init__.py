"""Parameter-space model merging as pytree arithmetic, streaming merges of HF checkpoints, mergekit YAML.

* `merge(method, base, models, key=None, **hparams)`: the registry; `known_methods()` lists the methods.
* `linear`, `task_arithmetic`, `ties`, `dare_linear`, `dare_ties`, `slerp`, `consensus`, `pcb`:
  one per method.
* `hm3_merge(base, experts, preference, key, density, drop_rate)`: HM3's Theta(lambda) (HM3_SPEC Eq. 5).
* `merge_checkpoints(...)` (`streaming.py`): the same merges on Hugging Face safetensors directories,
  tensor by tensor, with bounded memory.
* `groups.py`: parameter groups and per-block / per-group weights.

See docs/merging.md.
"""

from hm3_jax.merging.api import (
    METHODS,
    consensus,
    dare_linear,
    dare_ties,
    hm3_merge,
    known_methods,
    linear,
    merge,
    pcb,
    slerp,
    task_arithmetic,
    ties,
)
from hm3_jax.merging.groups import default_param_group, layer_index, leaf_weights

__all__ = [
    "METHODS",
    "consensus",
    "dare_linear",
    "dare_ties",
    "default_param_group",
    "hm3_merge",
    "known_methods",
    "layer_index",
    "leaf_weights",
    "linear",
    "merge",
    "pcb",
    "slerp",
    "task_arithmetic",
    "ties",
]
