"""The merge methods: the registry `METHODS` (kernel and hyperparameter defaults), the checks of a merge's
arguments and hyperparameters, and `make_kernel`, a kernel with its hyperparameters bound.

Shared by the in-memory merge of pytrees (`api.merge`) and the streaming merge of checkpoints
(`streaming.merge_checkpoints`), so both accept the same methods and refuse the same arguments. Conventions
for `weights`, `density`, `drop_rate` and `normalize`: `api.py`'s module docstring and docs/merging.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from hm3_jax.merging import kernels, tsv

Kernel = Callable[..., jax.Array]

# method -> (kernel, {hparam: default}); `weights`, `group_fn`, `check_finite` are accepted by every method.
METHODS: dict[str, tuple[Kernel, dict[str, Any]]] = {
    "linear": (kernels.linear, {"normalize": True}),
    "task_arithmetic": (kernels.task_arithmetic, {"scale": 1.0, "normalize": False}),
    "ties": (kernels.ties, {"density": 1.0, "scale": 1.0, "normalize": True, "consensus": "sum"}),
    "dare_linear": (
        kernels.dare_linear,
        {"drop_rate": 0.0, "scale": 1.0, "normalize": False, "rescale": True},
    ),
    "dare_ties": (
        kernels.dare_ties,
        {
            "drop_rate": 0.0,
            "density": 1.0,
            "scale": 1.0,
            "normalize": False,
            "rescale": True,
            "consensus": "sum",
        },
    ),
    "slerp": (kernels.slerp, {"t": None, "dot_threshold": 0.9995, "eps": 1e-8}),
    "consensus": (
        kernels.consensus,
        {
            "base_method": "task_arithmetic",
            "k": 2,
            "tall_lambda": 0.4,
            "density": 1.0,
            "scale": 1.0,
            "normalize": None,
            "consensus": "sum",
        },
    ),
    "pcb": (kernels.pcb, {"density": 0.2, "scale": 1.0}),
    "tsv": (tsv.tsv_kernel, {"scale": 1.0, "rank_fraction": None}),
}
RANDOM_METHODS = frozenset({"dare_linear", "dare_ties"})
COMMON_HPARAMS = ("weights", "group_fn", "check_finite")


def known_methods() -> tuple[str, ...]:
    return tuple(sorted(METHODS))


def _check_range(name: str, value: Any, num_models: int, low_open: bool) -> None:
    """`value` (a number or one per model) in (0, 1] (`low_open`, density) or [0, 1) (drop rate)."""
    values = [value] if isinstance(value, int | float) else list(value)
    if not isinstance(value, int | float) and len(values) != num_models:
        raise ValueError(f"{name}: got {len(values)} values for {num_models} models")
    for v in values:
        v = float(v)
        ok = (0.0 < v <= 1.0) if low_open else (0.0 <= v < 1.0)
        if not ok:
            raise ValueError(f"{name} must be in {'(0, 1]' if low_open else '[0, 1)'}, got {v}")


def resolve_hparams(method: str, num_models: int, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Checks a method's hyperparameters and fills in defaults.

    Raises ValueError for an unknown method (listing the known ones), an unknown hyperparameter (listing the
    accepted ones), `density` outside (0, 1], `drop_rate` outside [0, 1), or a per-model list of the wrong
    length.
    """
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; known methods: {', '.join(known_methods())}")
    _, defaults = METHODS[method]
    unknown = sorted(set(hparams) - set(defaults) - set(COMMON_HPARAMS))
    if unknown:
        accepted = sorted(set(defaults) | set(COMMON_HPARAMS))
        raise ValueError(f"{method}: unknown hyperparameter(s) {unknown}; accepted: {accepted}")
    resolved = {**defaults, **{k: v for k, v in hparams.items() if k in defaults}}
    if "density" in resolved:
        _check_range("density", resolved["density"], num_models, low_open=True)
    if "drop_rate" in resolved:
        _check_range("drop_rate", resolved["drop_rate"], num_models, low_open=False)
    if "tall_lambda" in resolved and not isinstance(resolved["tall_lambda"], int | float):
        if len(resolved["tall_lambda"]) != num_models:
            raise ValueError(
                f"tall_lambda: got {len(resolved['tall_lambda'])} values for {num_models} models"
            )
    if method == "slerp":
        if num_models != 1:
            raise ValueError(f"slerp merges the base with exactly one model, got {num_models} models")
        if resolved["t"] is None:
            raise ValueError(
                "slerp needs the interpolation factor t (a number, per-block vector or per-group map)"
            )
    if (
        method == "tsv"
        and resolved["rank_fraction"] is not None
        and not 0.0 < resolved["rank_fraction"] <= 1.0
    ):
        raise ValueError(f"tsv: rank_fraction must be in (0, 1], got {resolved['rank_fraction']}")
    if method == "consensus" and not 1 <= int(resolved["k"]) <= num_models:
        raise ValueError(f"consensus: k must be in [1, {num_models}] (number of models), got {resolved['k']}")
    return resolved


def _hashable(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, np.ndarray):
        return tuple(value.tolist())
    return value


@dataclasses.dataclass(frozen=True)
class BoundKernel:
    """A method's kernel with its hyperparameters bound; hashable by value, so it is a static jit argument
    and merges with the same hyperparameters share compiled code."""

    method: str
    hparams: tuple[tuple[str, Any], ...]

    def __call__(self, key, base, thetas, weights, **extra):
        return METHODS[self.method][0](key, base, thetas, weights, **dict(self.hparams), **extra)

    @property
    def divides_by_weights(self) -> bool:
        """Whether the merge divides by the sum of the weights (`normalize`; consensus: its base method's)."""
        hp = dict(self.hparams)
        if self.method == "consensus" and hp["normalize"] is None:
            return hp["base_method"] == "ties"
        return bool(hp.get("normalize"))


def make_kernel(method: str, num_models: int, **hparams: Any) -> BoundKernel:
    """`kernel(key, base, thetas [K, ...], weights [K]) -> merged` with the method's hyperparameters bound.

    `t` (SLERP) and `weights` are per-leaf values resolved by the caller, not bound here.
    """
    resolved = resolve_hparams(method, num_models, hparams)
    bound = tuple(sorted((k, _hashable(v)) for k, v in resolved.items() if k != "t"))
    return BoundKernel(method, bound)


def check_merge_call(method: str, models: Sequence[Any], key: jax.Array | None, has_base: bool) -> None:
    """Refuses an unknown `method`, an empty list of `models`, a random method without a PRNG `key`, and a
    merge without a base (`has_base` False) for any method but `linear` (ValueError, in that order)."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; known methods: {', '.join(known_methods())}")
    if not models:
        raise ValueError(f"{method}: the list of models to merge is empty")
    if method in RANDOM_METHODS and key is None:
        raise ValueError(f"{method} draws random drop masks: pass an explicit PRNG key")
    if not has_base and method != "linear":
        raise ValueError(f"{method} needs a base model (only linear works without one)")


def check_weights_arg(method: str, weights: Sequence[Any] | None, num_models: int) -> None:
    """Refuses `weights` for `slerp` (which takes `t=`) and a `weights` list of the wrong length."""
    if method == "slerp" and weights is not None:
        raise ValueError("slerp takes its interpolation factor as t=..., not weights")
    if weights is not None and len(weights) != num_models:
        raise ValueError(f"weights: got {len(weights)} values for {num_models} models")
