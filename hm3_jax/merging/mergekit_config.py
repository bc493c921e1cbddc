"""mergekit's YAML merge configuration, read into the arguments of the streaming merges (`streaming.py`).

Supported (anything else is an error naming the key):

* top level: `merge_method`, `base_model`, `models`, `parameters`, `dtype`, `out_dtype`, `slices`,
  `tokenizer_source` (a checkpoint directory, or `base`: the base's directory, with which the streaming merge
  maps models with other vocabularies onto the base's token ids);
* `models: [{model: DIR, parameters: {weight, density}}]`;
* `weight` (per model, or under top-level `parameters` as every model's default) is, as mergekit's
  `evaluate_setting`:
  - a number;
  - a list of numbers, a "gradient" `[v_0, ..., v_{n-1}]`, evaluated at `t` as
    `s = t (n - 1), i = floor(s), f = s - i: (1 - f) v_i + f v_{min(i + 1, n - 1)}`, with `t = l / (L - 1)`
    for block `l` of `L` (`t = 1` when `L = 1`), `t = 0` for the embeddings and `t = 1` for the final norm
    and head (`groups.shell_end`: mergekit evaluates `pre_weights` at 0 and `post_weights` at 1);
  - a list of `{filter: SUBSTRING, value: NUMBER_OR_GRADIENT}` conditions: a tensor takes the first whose
    `filter` is a substring of its name (no `filter`, or `*`, matches every tensor); when none matches, the
    top-level `parameters` value, then 1;
* `density` (per model or top level) is a number; slerp's `t` (top level) is a number, a gradient or a list
  of conditions, as `weight` (a tensor no condition matches is an error);
* `parameters`: method-level values (`normalize`, `rescale`, `int8_mask` (accepted, no effect: our masks are
  booleans), `t`, `lambda` (= our `scale`), and our own hyperparameter names such as `drop_rate`, `k`,
  `tall_lambda`, `base_method`);
* `slices` only with `merge_method: passthrough`, each slice one source `{model, layer_range: [start, end]}`
  (`start == end` is an empty slice: no block, but the first slice gives the embeddings and the last the final
  norm and head, as in mergekit).

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

from hm3_jax.merging import methods
from hm3_jax.merging.groups import layer_index, shell_end

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


def evaluate_gradient(values, t: float) -> float:
    """mergekit's gradient at `t` in [0, 1]: `s = t (n - 1)`, `(1 - f) v_i + f v_{i+1}` with `i = floor(s)`,
    `f = s - i` (the last anchor at `t = 1`)."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return float((1 - frac) * values[i0] + frac * values[i1])


def gradient(values: list[float], num_layers: int) -> np.ndarray:
    """A gradient evaluated on the blocks: `[L]`, block `l` at `t = l / (L - 1)` (`t = 1` when `L = 1`)."""
    ts = [l / (num_layers - 1) for l in range(num_layers)] if num_layers > 1 else [1.0]
    return np.asarray([evaluate_gradient(values, t) for t in ts], np.float32)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_setting(name: str, value: Any, where: str) -> Any:
    """A `weight` setting as a hashable value: a float, a gradient tuple, or a tuple of (filter, value)."""
    if _is_number(value):
        return float(value)
    if isinstance(value, list) and value and all(_is_number(v) for v in value):
        return tuple(float(v) for v in value)
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        conditions = []
        for j, cond in enumerate(value):
            unknown = sorted(set(cond) - {"filter", "value"})
            if unknown or "value" not in cond:
                raise ValueError(
                    f"{where}: {name}[{j}]: a condition is {{filter, value}}, got keys {sorted(cond)}"
                )
            flt = cond.get("filter")
            if flt is not None and not isinstance(flt, str):
                raise ValueError(f"{where}: {name}[{j}].filter must be a string, got {flt!r}")
            inner = cond["value"]
            if not (_is_number(inner) or (isinstance(inner, list) and inner and all(map(_is_number, inner)))):
                raise ValueError(
                    f"{where}: {name}[{j}].value must be a number or a gradient list, got {inner!r}"
                )
            conditions.append((None if flt in (None, "*") else flt, _check_setting(name, inner, where)))
        return tuple(conditions)
    raise ValueError(f"{where}: unsupported value for {name!r}: {value!r}")


def _evaluate(setting: Any, tensor_name: str, t: float) -> float | None:
    if isinstance(setting, float):
        return setting
    if setting and isinstance(setting[0], float):
        return evaluate_gradient(setting, t)
    for flt, value in setting:
        if flt is None or flt in tensor_name:
            return _evaluate(value, tensor_name, t)
    return None


@dataclasses.dataclass(frozen=True)
class TensorSetting:
    """One model's mergekit `weight` as a function of the tensor name (mergekit's `evaluate_setting`).

    `settings` are tried in order (the model's own, then the top-level `parameters` one); the first that
    gives a value for the tensor wins, else `default`. The gradient position is `t = l / (L - 1)` for block
    `l` (`L = num_layers`; `t = 1` when `L = 1`), 0 for the embeddings and 1 for the final norm and head.
    """

    settings: tuple[Any, ...]
    num_layers: int | None
    default: float | None = 1.0
    where: str = ""
    name: str = "weight"

    def __call__(self, tensor_name: str) -> float:
        index = layer_index(tensor_name)
        if index is None:
            t = 0.0 if shell_end(tensor_name) == "pre" else 1.0
        elif self.num_layers is None:
            raise ValueError(
                f"{self.where}: {self.name} is a gradient but the layer count is unknown (no config.json)"
            )
        else:
            t = index / (self.num_layers - 1) if self.num_layers > 1 else 1.0
        for setting in self.settings:
            value = _evaluate(setting, tensor_name, t)
            if value is not None:
                return value
        if self.default is None:
            raise ValueError(
                f"{self.where}: no {self.name} for tensor {tensor_name!r} (no filter matches it)"
            )
        return self.default


def _weight(model_value: Any, global_value: Any, num_layers: int | None, where: str) -> Any:
    """A model's weight: a float when it is one number for every tensor, else a `TensorSetting`."""
    settings = tuple(_check_setting("weight", v, where) for v in (model_value, global_value) if v is not None)
    if not settings:
        return 1.0
    if isinstance(settings[0], float):
        return settings[0]
    return TensorSetting(settings, num_layers, 1.0, where)


def _value(name: str, value: Any, num_layers: int | None, where: str) -> Any:
    if isinstance(value, bool | str) or value is None:
        return value
    if _is_number(value):
        return float(value)
    if isinstance(value, list) and all(_is_number(v) for v in value):
        if num_layers is None:
            raise ValueError(
                f"{where}: {name} is a gradient list but the layer count is unknown (no config.json)"
            )
        return gradient(value, num_layers)
    raise ValueError(
        f"{where}: unsupported value for {name!r}: {value!r} (filters are supported for 'weight' only)"
    )


def parse_config(config: dict[str, Any] | str) -> MergePlan:
    """Reads a mergekit YAML (a path, a YAML string, or the loaded dict) into a `MergePlan`.

    Raises ValueError naming an unsupported key or method, or a missing required entry.
    """
    where = "merge config"
    if isinstance(config, str):
        text = config
        if os.path.isfile(config):
            where = config
            with open(config) as f:
                text = f.read()
        elif "\n" not in config and (config.endswith((".yml", ".yaml")) or os.sep in config):
            raise FileNotFoundError(f"merge config {config!r} does not exist")
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ValueError(f"{where} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{where} must be a YAML mapping (key: value lines), got {type(config).__name__}")
    unknown = sorted(set(config) - TOP_LEVEL_KEYS)
    if unknown:
        raise ValueError(
            f"unsupported key(s) in merge config: {unknown}; supported: {sorted(TOP_LEVEL_KEYS)}"
        )
    method = config.get("merge_method")
    if method is None:
        raise ValueError("merge config has no merge_method")
    known = set(methods.known_methods()) | {"passthrough"}
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
        weights.append(_weight(params.get("weight"), global_params.get("weight"), num_layers, where))
        density = params.get("density", global_params.get("density"))
        if density is not None and not _is_number(density):
            raise ValueError(
                f"{where}: density must be a number, got {density!r} (gradients and filters: 'weight' only)"
            )
        densities.append(None if density is None else float(density))

    hparams: dict[str, Any] = {}
    for name, value in global_params.items():
        if name in PER_MODEL_PARAMS:
            continue
        if name == "int8_mask":
            continue
        if name == "t" and not _is_number(value):  # slerp's factor: gradients and filters as a weight
            hparams["t"] = TensorSetting(
                (_check_setting("t", value, "parameters"),), num_layers, None, "parameters", "t"
            )
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
    methods.resolve_hparams(method, max(len(models), 1), {k: v for k, v in hparams.items()})
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
        if "model" not in source or "layer_range" not in source:
            raise ValueError(f"slices[{i}].sources[0] needs 'model' and 'layer_range'")
        start, end = (int(v) for v in source["layer_range"])
        if not 0 <= start <= end:
            raise ValueError(
                f"slices[{i}].sources[0].layer_range: need 0 <= start <= end, got {[start, end]}"
            )
        slices.append((source["model"], start, end))
    if not slices:
        raise ValueError("passthrough needs slices (or one model)")
    return MergePlan("passthrough", base, (), None, {}, dtype, tuple(slices), tokenizer_source)
