"""The data-aware merges behind one call, `merge_with_data(method, base, models, key, calibration, **hparams)`.

The data-free merges (`api.merge`, including TSV-M as `merge("tsv", ...)`) see only weights. These also see
`calibration`: one `Calibration` per model (task k's unlabelled SEARCH-split inputs and its `forward_fn`;
`calibration.py`), and take the preference lambda as `weights`:

| method | what it fits on the calibration data | hyperparameters (defaults) |
| --- | --- | --- |
| `regmean` | each expert's input Gram matrices, closed-form least squares per linear layer (`regmean.py`) | `alpha=0.9`, `ridge=0`, `nonlinear_scale=1`, `batch_size=None` |
| `regmean_plusplus` | RegMean with block l's Grams measured through the merged blocks 0..l-1 (`regmean_plusplus.py`) | as `regmean` |
| `fisher` | each expert's diagonal Fisher under its own predictions, Fisher-weighted average (`fisher.py`) | `mode="sample"`, `num_samples=1`, `floor=1e-6` |
| `adamerging` | task-arithmetic coefficients minimising the lambda-weighted prediction entropy (`adamerging.py`) | `num_steps` (required), `granularity="layer"`, `learning_rate=1e-3`, `init=0.3`, `batch_size=16`, `bounds=(0, 1)` |

`calibration_passes` counts the forward and backward passes (in calibration rows) a call costs, for the
equal-budget accounting of the searches that use these merges.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from hm3_jax.merging.adamerging import adamerging
from hm3_jax.merging.calibration import Calibration, check_calibration
from hm3_jax.merging.fisher import fisher_from_data
from hm3_jax.merging.regmean import check_preference, regmean_from_data
from hm3_jax.merging.regmean_plusplus import num_blocks, regmean_plusplus


def _regmean(key, base, models, calibration, weights, **hp):
    del key
    return regmean_from_data(base, models, calibration, weights=weights, **hp)


def _regmean_plusplus(key, base, models, calibration, weights, **hp):
    del key
    return regmean_plusplus(base, models, calibration, weights=weights, **hp)


def _fisher(key, base, models, calibration, weights, **hp):
    return fisher_from_data(key, base, models, calibration, weights=weights, **hp)


def _adamerging(key, base, models, calibration, weights, **hp):
    if hp["num_steps"] is None:
        raise ValueError("adamerging: pass num_steps (the fixed number of optimisation steps)")
    return adamerging(key, base, models, calibration, weights=weights, **hp).merged


# method -> (function, {hparam: default}, needs a key)
DATA_AWARE_METHODS: dict[str, tuple[Callable[..., Any], dict[str, Any], bool]] = {
    "regmean": (_regmean, {"alpha": 0.9, "ridge": 0.0, "nonlinear_scale": 1.0, "batch_size": None}, False),
    "regmean_plusplus": (
        _regmean_plusplus,
        {"alpha": 0.9, "ridge": 0.0, "nonlinear_scale": 1.0, "batch_size": None},
        False,
    ),
    "fisher": (_fisher, {"mode": "sample", "num_samples": 1, "floor": 1e-6}, True),
    "adamerging": (
        _adamerging,
        {
            "num_steps": None,
            "granularity": "layer",
            "learning_rate": 1e-3,
            "init": 0.3,
            "batch_size": 16,
            "bounds": (0.0, 1.0),
        },
        True,
    ),
}


def known_data_aware_methods() -> tuple[str, ...]:
    return tuple(sorted(DATA_AWARE_METHODS))


def _resolve(method: str, hparams: dict) -> dict:
    if method not in DATA_AWARE_METHODS:
        raise ValueError(
            f"unknown data-aware merge method {method!r}; known: {', '.join(known_data_aware_methods())}"
        )
    defaults = DATA_AWARE_METHODS[method][1]
    unknown = sorted(set(hparams) - set(defaults))
    if unknown:
        raise ValueError(f"{method}: unknown hyperparameter(s) {unknown}; accepted: {sorted(defaults)}")
    return {**defaults, **hparams}


def merge_with_data(
    method: str,
    base: Any,
    models: Sequence[Any],
    key: jax.Array | None,
    calibration: Sequence[Calibration],
    *,
    weights: Sequence[float] | None = None,
    **hparams: Any,
) -> Any:
    """Merges `models` (fine-tuned from `base`) with a data-aware `method` (module docstring table).

    Args:
      method: "regmean", "regmean_plusplus", "fisher" or "adamerging".
      base: pytree; models: K pytrees of its structure and shapes.
      key: PRNG key (Fisher's label draws, AdaMerging's minibatches); RegMean ignores it (may be None).
      calibration: K `Calibration`s, calibration[k] = task k's search-split inputs (never held-out data).
      weights: the preference lambda, K numbers >= 0 not all 0 (default uniform).
      **hparams: the method's hyperparameters.
    Returns:
      The merged pytree (base dtypes).
    Raises:
      ValueError: unknown method or hyperparameter, a missing key, and every error of the method itself
        (no calibration data, singular Gram matrices, shape mismatches: each names the task or leaf).
    """
    hp = _resolve(method, hparams)
    fn, _, needs_key = DATA_AWARE_METHODS[method]
    if needs_key and key is None:
        raise ValueError(f"{method} is random (label draws / minibatches): pass an explicit PRNG key")
    return fn(key, base, list(models), list(calibration), weights, **hp)


class CalibrationPasses(NamedTuple):
    """Rows run forward and backward through a model by one data-aware merge (a row = one calibration input
    `[...]`, e.g. one token sequence)."""

    forward_rows: int
    backward_rows: int


def calibration_passes(
    method: str,
    calibration: Sequence[Calibration],
    *,
    weights: Sequence[float] | None = None,
    params: Any = None,
    **hparams: Any,
) -> CalibrationPasses:
    """The cost of `merge_with_data(method, ..., calibration, weights=weights, **hparams)` in calibration rows.

    regmean: one forward per row of every task of positive weight; regmean_plusplus: L + 2 of them (L = the
    blocks of `params`, which it needs); fisher: one forward and `num_samples`
    backwards per row ("sample"), or one backward per (position, class) of each row's logits ("expected",
    which needs `params` to read the logits' shape); adamerging: per step one forward and one backward of
    `min(batch_size, N_k)` rows per task of positive weight.
    """
    hp = _resolve(method, hparams)
    check_calibration(calibration, len(calibration), method)
    lam = check_preference(weights, len(calibration), method)
    live = [c for c, w in zip(calibration, lam, strict=True) if w > 0]
    rows = sum(c.num_rows for c in live)
    if method == "regmean":
        return CalibrationPasses(rows, 0)
    if method == "regmean_plusplus":
        if params is None:
            raise ValueError("calibration_passes: regmean_plusplus needs params to count the blocks")
        return CalibrationPasses(rows * (num_blocks(params) + 2), 0)
    if method == "fisher":
        if hp["mode"] == "sample":
            return CalibrationPasses(rows, rows * int(hp["num_samples"]))
        if params is None:
            raise ValueError(
                "calibration_passes: fisher with mode='expected' needs params to size the logits"
            )
        backward = 0
        for c in live:
            one = jax.eval_shape(
                c.forward_fn,
                params,
                jax.ShapeDtypeStruct((1,) + np.shape(c.inputs)[1:], np.asarray(c.inputs).dtype),
            )
            backward += c.num_rows * int(np.prod(one.shape[1:]))
        return CalibrationPasses(rows, backward)
    if hp["num_steps"] is None:
        raise ValueError("adamerging: pass num_steps (the fixed number of optimisation steps)")
    per_step = sum(min(int(hp["batch_size"]), c.num_rows) for c in live)
    return CalibrationPasses(per_step * int(hp["num_steps"]), per_step * int(hp["num_steps"]))
