"""Parameter-space model merging as pytree arithmetic, streaming merges of HF checkpoints, mergekit YAML.

* `merge(method, base, models, key=None, **hparams)`: the registry; `known_methods()` lists the methods.
* `linear`, `task_arithmetic`, `ties`, `dare_linear`, `dare_ties`, `slerp`, `consensus`, `pcb`:
  one per method; TSV-M (`tsv.py`) as `merge("tsv", ...)`.
* Data-aware merges (issue 19), fitted on unlabelled search-split inputs (`Calibration`, `calibration.py`):
  `merge_with_data(method, base, models, key, calibration, weights=lambda, **hparams)` (`data_aware.py`) for
  `regmean` (`regmean.py`), `regmean_plusplus` (`regmean_plusplus.py`), `fisher` (`fisher.py`), `adamerging` (`adamerging.py`); per-linear-layer input
  Gram matrices of any pure forward in `layer_inputs.py`.
* `hm3_merge(base, experts, preference, key, density, drop_rate)`: HM3's Theta(lambda) (HM3_SPEC Eq. 5).
* `merge_checkpoints(...)` (`streaming.py`): the same merges on Hugging Face safetensors directories,
  tensor by tensor, with bounded memory; `passthrough_checkpoints` (`passthrough.py`) stacks layer ranges;
  the output directory (`checkpoint_output.py`), token tables across vocabularies (`checkpoint_vocab.py`),
  lazy reading and the shard writer (`safetensors_stream.py`).
* `methods.py`: the registry `METHODS` and the checks of a merge's arguments; `kernels.py` the per-tensor
  kernels, `topk.py` the exact top-k magnitude masks.
* `groups.py`: parameter groups and per-block / per-group weights.

See docs/merging.md.
"""

from hm3_jax.merging.adamerging import AdaMergingResult, adamerging, merge_with_coefficients
from hm3_jax.merging.api import (
    consensus,
    dare_linear,
    dare_ties,
    hm3_merge,
    linear,
    merge,
    pcb,
    slerp,
    task_arithmetic,
    ties,
)
from hm3_jax.merging.calibration import Calibration
from hm3_jax.merging.continuation import own_continuation
from hm3_jax.merging.data_aware import (
    DATA_AWARE_METHODS,
    CalibrationPasses,
    calibration_passes,
    known_data_aware_methods,
    merge_with_data,
)
from hm3_jax.merging.fisher import diagonal_fisher, fisher_from_data, fisher_merge, model_fishers
from hm3_jax.merging.groups import default_param_group, layer_index, leaf_weights
from hm3_jax.merging.layer_inputs import InputStats, layer_input_grams, linear_input_stats
from hm3_jax.merging.methods import METHODS, known_methods
from hm3_jax.merging.regmean import model_grams, regmean, regmean_from_data
from hm3_jax.merging.regmean_plusplus import regmean_plusplus
from hm3_jax.merging.tsv import tsv_kernel

__all__ = [
    "DATA_AWARE_METHODS",
    "METHODS",
    "AdaMergingResult",
    "Calibration",
    "CalibrationPasses",
    "InputStats",
    "adamerging",
    "calibration_passes",
    "diagonal_fisher",
    "fisher_from_data",
    "fisher_merge",
    "known_data_aware_methods",
    "layer_input_grams",
    "linear_input_stats",
    "merge_with_coefficients",
    "merge_with_data",
    "model_fishers",
    "own_continuation",
    "model_grams",
    "regmean",
    "regmean_from_data",
    "regmean_plusplus",
    "tsv_kernel",
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
