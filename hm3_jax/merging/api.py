"""Parameter-space merges of whole pytrees, the method registry `merge`, and HM3's `hm3_merge`.

A merge is `merge(method, base, models, key=None, **hparams) -> merged`, where `base` and every entry of
`models` are pytrees of the same structure and shapes (nested dicts of arrays, e.g. our `{"embed", "blocks",
"final", "head"}` params, or a flat `{hf_name: array}` dict). It maps a per-tensor kernel (`kernels.py`) over
the leaves with `jax.tree` utilities; it is pure and jit-able (`jax.jit(functools.partial(merge, "ties",
density=0.5))(base, models)`), and the library never jits by itself.

Conventions (mergekit's, see docs/merging.md):
* `weights`: one per model; each a number, a per-block `[L]` vector or a per-group mapping (`groups.py`).
* `density`: fraction of a task vector KEPT by magnitude trimming (TIES, PCB), in (0, 1].
* `drop_rate`: DARE's drop probability p, in [0, 1); survivors are rescaled by `1 / (1 - p)`.
* `normalize`: divide by the sum of the (agreeing) weights; defaults per method as in mergekit.
* dtype: each output leaf has the base leaf's dtype (for `linear`, the first model's); arithmetic is float32.
  Non-floating leaves (integer buffers) are copied from the base unchanged.
* Randomness (DARE): leaf `i` (in `jax.tree` order) uses `fold_in(key, i)`, model `k` `fold_in(that, k)`, and
  block `l` of a stacked leaf `fold_in(that leaf key, l)` before the model fold. The streaming merge of
  checkpoints (`streaming.py`) numbers tensors in sorted-name order, which is the `jax.tree` order of a flat
  `{name: array}` dict, so both draw identical masks.
* Leaves under the top-level `"blocks"` key are stacked `[L, ...]`: every kernel is vmapped over the
  blocks, so per-tensor operations (top-k trimming, SLERP angle, PCB normalisation) act on one block at a
  time, exactly as they would on the per-layer Hugging Face tensors.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax.merging import chunked, kernels, tsv
from hm3_jax.merging.groups import (
    GroupFn,
    check_leaf_weights,
    default_param_group,
    is_stacked,
    leaf_weights,
    path_name,
)

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


@functools.partial(jax.jit, static_argnames=("kernel", "out_dtype", "stacked"))
def merge_tensor(kernel, out_dtype, stacked, key, base, thetas, weights):
    """One leaf: float32 merge, cast to `out_dtype`, plus a non-finite flag per input (`[1 + K]`, base first).

    Shared by the in-memory and the streaming merge, so both run the same compiled code.

    Args:
      kernel: a `BoundKernel`.
      stacked: vmap over the leading (block) axis; block `l` uses `fold_in(key, l)`.
      key: PRNG key of this leaf.
      base: `[...]` any float dtype; thetas: K arrays like `base`; weights: `[K]` (`[L, K]` when stacked).
    """
    base32 = base.astype(jnp.float32)
    stacked_thetas = jnp.stack([t.astype(jnp.float32) for t in thetas])  # [K, ...]
    bad = jnp.stack([~jnp.all(jnp.isfinite(base32))] + [~jnp.all(jnp.isfinite(t)) for t in stacked_thetas])
    if stacked:
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(base32.shape[0]))
        out = jax.vmap(kernel, in_axes=(0, 0, 1, 0))(keys, base32, stacked_thetas, weights)
    else:
        out = kernel(key, base32, stacked_thetas, weights)
    return out.astype(out_dtype), bad


def first_mismatch(base: Any, models: Sequence[Any]) -> str | None:
    """A message naming the first leaf where `models` differ from `base` in structure or shape, else None."""
    base_leaves = jax.tree_util.tree_flatten_with_path(base)[0]
    base_names = [path_name(p) for p, _ in base_leaves]
    for index, model in enumerate(models):
        leaves = jax.tree_util.tree_flatten_with_path(model)[0]
        names = [path_name(p) for p, _ in leaves]
        if names != base_names:
            missing = [n for n in base_names if n not in set(names)]
            extra = [n for n in names if n not in set(base_names)]
            first = (
                (f"tensor {missing[0]!r} missing" if missing else f"unexpected tensor {extra[0]!r}")
                if (missing or extra)
                else "tensors in a different order"
            )
            return f"model {index} has a different architecture than the base: {first}"
        for name, (_, a), (_, b) in zip(base_names, base_leaves, leaves, strict=True):
            if np.shape(a) != np.shape(b):
                return (
                    f"model {index} differs from the base at tensor {name!r}: shape {tuple(np.shape(b))} vs "
                    f"{tuple(np.shape(a))}"
                )
    return None


def _check_finite(name: str, arrays: Sequence[Any], labels: Sequence[str]) -> None:
    for array, label in zip(arrays, labels, strict=True):
        if isinstance(array, jax.core.Tracer):
            return
        host = np.asarray(array)
        if not (np.issubdtype(host.dtype, np.floating) or host.dtype.name == "bfloat16"):
            continue
        host = host.astype(np.float32)
        if not np.all(np.isfinite(host)):
            kind = "NaN" if np.any(np.isnan(host)) else "Inf"
            raise ValueError(f"{kind} in {label} at tensor {name!r}")


# A stacked leaf whose K + 1 float32 copies exceed this is merged block by block (`merge`); smaller ones in one
# program over all blocks (fewer dispatches: what small models' many merges spend their time on).
BLOCKWISE_MERGE_BYTES = 2**28
# A non-stacked leaf (embeddings, LM head) whose K + 1 float32 copies exceed this is merged in flat chunks of
# CHUNK_ELEMENTS (`chunked.merge_chunked`, bitwise the whole-leaf merge) by the elementwise methods
# (`chunked.CHUNKED_METHODS`); the others merge it whole.
CHUNKED_MERGE_BYTES = 2**28
CHUNK_ELEMENTS = chunked.DEFAULT_CHUNK_ELEMENTS


def _merge_leaf_in_chunks(kernel, dtype, leaf_key, ref_leaf, inputs, leaf_w):
    """`merge_tensor`'s merged leaf (not stacked) through `chunked.merge_chunked`; None if an input is not finite
    (the caller then merges it whole, as it would without the chunks)."""
    merged, _ = chunked.merge_chunked(
        kernel, dtype, leaf_key, np.asarray(ref_leaf), [np.asarray(x) for x in inputs], np.asarray(leaf_w),
        CHUNK_ELEMENTS, {},
    )  # fmt: skip
    return None if merged is None else jnp.asarray(merged)


def merge(
    method: str,
    base: Any,
    models: Sequence[Any],
    key: jax.Array | None = None,
    *,
    weights: Sequence[Any] | None = None,
    group_fn: GroupFn = default_param_group,
    check_finite: bool = True,
    **hparams: Any,
) -> Any:
    """Merges `models` (fine-tuned from `base`) into one pytree with `method`.

    Args:
      method: one of `known_methods()`: linear, task_arithmetic, ties, dare_linear, dare_ties, slerp,
        consensus, pcb (see `kernels.py` for each one's equation and hyperparameters), tsv (`tsv.py`).
      base: pytree of arrays (ignored by `linear`, which may get None).
      models: non-empty sequence of K pytrees with the base's structure and shapes.
      key: PRNG key, required by the DARE methods.
      weights: K per-model weights (number, `[L]` per-block vector, or per-group mapping); default all 1.
        For `slerp`, pass `t=` instead (same forms).
      group_fn: leaf name -> parameter group, for per-group weights.
      check_finite: raise on NaN/Inf in an input leaf (skipped under jit tracing).
      **hparams: the method's hyperparameters (`density`, `drop_rate`, `scale`, `normalize`, ...).
    Returns:
      The merged pytree, each leaf with the base leaf's dtype.
    Raises:
      ValueError: unknown method or hyperparameter, empty model list, wrong-length weights, values out of
        range, structure/shape mismatch (naming the first tensor that differs), NaN/Inf in an input.
    """
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; known methods: {', '.join(known_methods())}")
    models = list(models)
    if not models:
        raise ValueError(f"{method}: the list of models to merge is empty")
    if method in RANDOM_METHODS and key is None:
        raise ValueError(f"{method} draws random drop masks: pass an explicit PRNG key")
    reference = models[0] if base is None else base
    if base is None and method != "linear":
        raise ValueError(f"{method} needs a base model (only linear works without one)")
    mismatch = first_mismatch(reference, models)
    if mismatch:
        raise ValueError(mismatch)
    if method == "slerp" and weights is not None:
        raise ValueError("slerp takes its interpolation factor as t=..., not weights")
    if weights is not None and len(weights) != len(models):
        raise ValueError(f"weights: got {len(weights)} values for {len(models)} models")
    t = hparams.get("t")
    kernel = make_kernel(method, len(models), **hparams)
    per_leaf_weights = [t] if method == "slerp" else weights

    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(reference)
    model_leaves = [jax.tree_util.tree_leaves(m) for m in models]
    out = []
    for index, (path, ref_leaf) in enumerate(leaves_with_path):
        name = path_name(path)
        inputs = [leaves[index] for leaves in model_leaves]
        if not jnp.issubdtype(jnp.asarray(ref_leaf).dtype, jnp.floating):
            out.append(ref_leaf)
            continue
        if check_finite:
            arrays = ([] if base is None else [ref_leaf]) + inputs
            labels = ([] if base is None else ["the base model"]) + [f"model {k}" for k in range(len(inputs))]
            _check_finite(name, arrays, labels)
        leaf_w = leaf_weights(
            per_leaf_weights,
            name,
            tuple(np.shape(ref_leaf)),
            len(models),
            group_fn,
            "t" if method == "slerp" else "weights",
        )
        check_leaf_weights(leaf_w, name, "t" if method == "slerp" else "weights", kernel.divides_by_weights)
        leaf_key = None if key is None else jax.random.fold_in(key, index)
        if leaf_key is None:
            leaf_key = jax.random.key(0)  # unused by the deterministic methods
        dtype = np.dtype(ref_leaf.dtype)
        stacked = is_stacked(name) and np.ndim(ref_leaf) >= 1
        copies_bytes = (len(inputs) + 1) * 4 * np.size(ref_leaf)  # K + 1 float32 copies of the leaf
        merged = None
        if stacked and copies_bytes > BLOCKWISE_MERGE_BYTES:
            # block by block: K + 1 float32 copies of one block at a time, not of the whole stacked leaf (a
            # Llama-2-7B MLP leaf [32, 4096, 11008] is 5.8 GB per float32 copy); the values of merge_tensor's
            # vmap over the blocks (block l: fold_in(leaf key, l)) bit for bit, PCB's within a float32 ulp
            merged = jnp.stack([
                merge_tensor(kernel, dtype, False, jax.random.fold_in(leaf_key, l), ref_leaf[l],
                             [x[l] for x in inputs], jnp.asarray(leaf_w)[l])[0]
                for l in range(np.shape(ref_leaf)[0])
            ])  # fmt: skip
        elif (
            not stacked
            and kernel.method in chunked.CHUNKED_METHODS
            and copies_bytes > CHUNKED_MERGE_BYTES
            and not any(isinstance(x, jax.core.Tracer) for x in [ref_leaf, *inputs, leaf_w])
        ):
            merged = _merge_leaf_in_chunks(kernel, dtype, leaf_key, ref_leaf, inputs, leaf_w)
        if merged is None:  # one program over the leaf (all blocks of a stacked one)
            merged, _ = merge_tensor(kernel, dtype, stacked, leaf_key, ref_leaf, inputs, leaf_w)
        out.append(merged)
    return jax.tree_util.tree_unflatten(treedef, out)


def _method_fn(method: str):
    def fn(base, models, key=None, **hparams):
        return merge(method, base, models, key, **hparams)

    fn.__name__ = method
    fn.__doc__ = (
        f"`merge({method!r}, base, models, key, **hparams)`; see `kernels.{method}` for the equation."
    )
    return fn


linear = _method_fn("linear")
task_arithmetic = _method_fn("task_arithmetic")
ties = _method_fn("ties")
dare_linear = _method_fn("dare_linear")
dare_ties = _method_fn("dare_ties")
slerp = _method_fn("slerp")
consensus = _method_fn("consensus")
pcb = _method_fn("pcb")


def hm3_merge(
    base: Any,
    experts: Sequence[Any],
    preference: Any,
    key: jax.Array,
    density: float = 1.0,
    drop_rate: float = 0.0,
    **hparams: Any,
) -> Any:
    """HM3's parameter-level merge Theta(lambda) (HM3_SPEC, Eq. 5): DARE-TIES with task weights = preference.

    `Theta = base + sum_k lambda_k * M_k * DARE_p(delta_k)`, `M_k` the TIES mask (trim to the top-`density`
    magnitudes, elect signs, keep agreeing entries); no division by the weights (`normalize=False`).

    Args:
      base: base pytree; experts: K fine-tuned pytrees.
      preference: `[K]` on the simplex (lambda_k >= 0, sum 1); each entry may also be a per-block vector or
        per-group mapping, as any merge weight.
      key: PRNG key for the DARE masks.
      density: TIES trim fraction kept, (0, 1]. drop_rate: DARE p, [0, 1).
    """
    if len(preference) != len(experts):
        raise ValueError(f"preference has {len(preference)} entries for {len(experts)} experts")
    hparams.setdefault("normalize", False)
    return merge(
        "dare_ties",
        base,
        experts,
        key,
        weights=list(preference),
        density=density,
        drop_rate=drop_rate,
        **hparams,
    )
