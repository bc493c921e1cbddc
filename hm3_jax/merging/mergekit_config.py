"""mergekit's YAML merge configuration, read into the arguments of the streaming merges (`streaming.py`).

Supported (anything else is an error naming the key):

* top level: `merge_method`, `base_model`, `models`, `parameters`, `dtype`, `out_dtype`, `slices`,
  `tokenizer_source` (a checkpoint directory, or `base`);
* `models: [{model: DIR, parameters: {weight, density, ...}}]`; a parameter value is a number, or a list
  (a mergekit "gradient": interpolated linearly over the blocks, `np.interp` at `l / (L - 1)` of anchors
  spread evenly on [0, 1], giving a per-block weight);
* `parameters`: method-level values (`normalize`, `rescale`, `int8_mask` (accepted, no effect: our masks are
  booleans), `t`, `lambda` (= our `scale`), and our own hyperparameter names such as `drop_rate`, `k`,
  `tall_lambda`, `base_method`); `weight`/`density` here are defaults for every model;
* `slices` only with `merge_method: passthrough`, each slice one source `{model, layer_range: [start, end]}`.

Name mapping: mergekit's `density` for `dare_linear`/`dare_ties` is DARE's keep fraction, so it becomes our
`drop_rate = 1 - density`; for `ties`/`pcb`/`consensus` it is the magnitude-trim `density`. For `slerp`,
`base_model` is `v0` and the other model `v1`. For `linear`, models listed include whatever the user lists
(mergekit's `linear` ignores `base_model` unless it is also under `models`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
import yaml

from hm3_jax.merging import api

TOP_LEVEL_KEYS = frozenset(
    {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "slices", "tokenizer_source"}
)
MODEL_KEYS = frozenset({"model", "parameters"})
PER_MODEL_PARAMS = frozenset({"weight", "density"})
RENAMED = {"lambda": "scale"}
DARE_METHODS = frozenset({"dare_linear", "dare_ties"})


@dataclasses.dataclass(frozen=True)
class MergePlan:
    """A parsed configuration: what `experiments.merge` passes to the streaming merge."""

    method: str
    base: str | None
    models: tuple[str, ...]
    weights: tuple[Any, ...] | None
    hparams: dict[str, Any]
    dtype: str | None
    slices: tuple[tuple[str, int, int], ...] | None
    tokenizer_source: str | None


def _num_layers(model_dir: str) -> int | None:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        config = json.load(f)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in config:
            return int(config[key])
    return None


def gradient(values: list[float], num_layers: int) -> np.ndarray:
    """mergekit's gradient: anchors evenly on [0, 1], linearly interpolated at `l / (L - 1)` -> `[L]`."""
    anchors = np.linspace(0.0, 1.0, len(values))
    where = np.linspace(0.0, 1.0, num_layers) if num_layers > 1 else np.zeros(1)
    return np.interp(where, anchors, np.asarray(values, dtype=np.float64)).astype(np.float32)


def _value(name: str, value: Any, num_layers: int | None, where: str) -> Any:
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, list) and all(isinstance(v, int | float) for v in value):
        if num_layers is None:
            raise ValueError(
                f"{where}: {name} is a gradient list but the layer count is unknown (no config.json)"
            )
        return gradient(value, num_layers)
    raise ValueError(f"{where}: unsupported value for {name!r}: {value!r} (filters are not supported)")


def parse_config(config: dict[str, Any] | str) -> MergePlan:
    """Reads a mergekit YAML (a path, a YAML string, or the loaded dict) into a `MergePlan`.

    Raises ValueError naming an unsupported key or method, or a missing required entry.
    """
    if isinstance(config, str):
        if os.path.isfile(config):
            with open(config) as f:
                config = yaml.safe_load(f)
        else:
            config = yaml.safe_load(config)
    if not isinstance(config, dict):
        raise ValueError("merge config must be a YAML mapping")
    unknown = sorted(set(config) - TOP_LEVEL_KEYS)
    if unknown:
        raise ValueError(
            f"unsupported key(s) in merge config: {unknown}; supported: {sorted(TOP_LEVEL_KEYS)}"
        )
    method = config.get("merge_method")
    if method is None:
        raise ValueError("merge config has no merge_method")
    known = set(api.known_methods()) | {"passthrough"}
    if method not in known:
        raise ValueError(f"unsupported merge_method {method!r}; supported: {sorted(known)}")
    dtype = config.get("out_dtype") or config.get("dtype")
    base = config.get("base_model")
    tokenizer_source = config.get("tokenizer_source")
    if tokenizer_source == "base":
        tokenizer_source = base
    elif tokenizer_source is not None and not isinstance(tokenizer_source, str):
        raise ValueError(f"unsupported tokenizer_source {tokenizer_source!r} (a directory or 'base')")

    if method == "passthrough":
        return _parse_passthrough(config, base, dtype, tokenizer_source)
    if "slices" in config:
        raise ValueError(f"slices are supported only with merge_method: passthrough, not {method!r}")

    entries = config.get("models") or []
    if not isinstance(entries, list):
        raise ValueError("models must be a list of {model, parameters}")
    num_layers = _num_layers(base) if base else (_num_layers(entries[0]["model"]) if entries else None)
    global_params = dict(config.get("parameters") or {})
    models, weights, densities = [], [], []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"model": entry}
        unknown = sorted(set(entry) - MODEL_KEYS)
        if unknown:
            raise ValueError(f"models[{i}]: unsupported key(s) {unknown}; supported: {sorted(MODEL_KEYS)}")
        if "model" not in entry:
            raise ValueError(f"models[{i}] has no 'model'")
        params = dict(entry.get("parameters") or {})
        unknown = sorted(set(params) - PER_MODEL_PARAMS)
        if unknown:
            raise ValueError(
                f"models[{i}].parameters: unsupported key(s) {unknown}; supported: {sorted(PER_MODEL_PARAMS)}"
            )
        if entry["model"] == base and method != "linear":
            continue  # mergekit lets the base appear under models; it contributes no task vector
        where = f"models[{i}] ({entry['model']})"
        models.append(entry["model"])
        weight = params.get("weight", global_params.get("weight", 1.0))
        weights.append(_value("weight", weight, num_layers, where))
        density = params.get("density", global_params.get("density"))
        densities.append(None if density is None else _value("density", density, None, where))

    hparams: dict[str, Any] = {}
    for name, value in global_params.items():
        if name in PER_MODEL_PARAMS:
            continue
        if name == "int8_mask":
            continue
        hparams[RENAMED.get(name, name)] = _value(name, value, num_layers, "parameters")
    if any(d is not None for d in densities):
        full = [1.0 if d is None else d for d in densities]
        if method in DARE_METHODS:
            if "drop_rate" in hparams:
                raise ValueError("give either mergekit's density or drop_rate for a DARE method, not both")
            hparams["drop_rate"] = [1.0 - d for d in full]
        elif method in ("ties", "pcb", "consensus"):
            hparams["density"] = full if method != "pcb" else full[0]
            if method == "pcb" and len(set(full)) > 1:
                raise ValueError("pcb takes one density for all models")
        else:
            raise ValueError(f"{method} has no 'density' parameter")
    if method == "slerp":
        if len(models) != 1:
            raise ValueError(f"slerp needs base_model plus exactly one other model, got {len(models)} others")
        weights_out = None
    else:
        weights_out = tuple(weights)
    if method == "linear" and base not in (None, *models):
        base = None  # mergekit's linear does not use base_model
    api.resolve_hparams(method, max(len(models), 1), {k: v for k, v in hparams.items()})
    return MergePlan(method, base, tuple(models), weights_out, hparams, dtype, None, tokenizer_source)


def _parse_passthrough(config, base, dtype, tokenizer_source) -> MergePlan:
    if config.get("models") and config.get("slices"):
        raise ValueError("passthrough: give either models or slices, not both")
    if config.get("parameters"):
        raise ValueError(f"passthrough: unsupported parameters {sorted(config['parameters'])}")
    slices = []
    if config.get("models"):
        entries = config["models"]
        if len(entries) != 1:
            raise ValueError("passthrough with models needs exactly one model (use slices to stack layers)")
        model = entries[0]["model"] if isinstance(entries[0], dict) else entries[0]
        num_layers = _num_layers(model)
        if num_layers is None:
            raise ValueError(f"passthrough: no layer count in {model}/config.json")
        slices.append((model, 0, num_layers))
    for i, item in enumerate(config.get("slices") or []):
        unknown = sorted(set(item) - {"sources"})
        if unknown:
            raise ValueError(f"slices[{i}]: unsupported key(s) {unknown}")
        sources = item.get("sources") or []
        if len(sources) != 1:
            raise ValueError(
                f"slices[{i}]: passthrough needs exactly one source per slice, got {len(sources)}"
            )
        source = sources[0]
        unknown = sorted(set(source) - {"model", "layer_range"})
        if unknown:
            raise ValueError(f"slices[{i}].sources[0]: unsupported key(s) {unknown}")
        start, end = source["layer_range"]
        slices.append((source["model"], int(start), int(end)))
    if not slices:
        raise ValueError("passthrough needs slices (or one model)")
    return MergePlan("passthrough", base, (), None, {}, dtype, tuple(slices), tokenizer_source)
