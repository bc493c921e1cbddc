"""Parameter-space merges of whole pytrees (`merge`; the methods' registry: `methods.py`) and HM3's `hm3_merge`.

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

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax.merging import chunked
from hm3_jax.merging.groups import (
    GroupFn,
    check_leaf_weights,
    default_param_group,
    is_stacked,
    leaf_weights,
    path_name,
)
from hm3_jax.merging.host_leaves import fetched, on_host, stacked
from hm3_jax.merging.methods import check_merge_call, check_weights_arg, make_kernel


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


def merge_leaf_in_chunks(kernel, dtype, leaf_key, ref_leaf, inputs, leaf_w):
    """`merge_tensor`'s merged leaf (not stacked) through `chunked.merge_chunked`, a host (numpy) array; None if an
    input is not finite (the caller then merges it whole, as it would without the chunks)."""
    merged, _ = chunked.merge_chunked(
        kernel,
        dtype,
        leaf_key,
        np.asarray(ref_leaf),
        [np.asarray(x) for x in inputs],
        np.asarray(leaf_w),
        CHUNK_ELEMENTS,
        {},
    )
    return merged


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
      The merged pytree, each leaf with the base leaf's dtype: host (numpy) arrays when `base` and `models` are
      (a run on a mesh: each tensor fetched as it is made, `host_leaves`), else device arrays.
    Raises:
      ValueError: unknown method or hyperparameter, empty model list, wrong-length weights, values out of
        range, structure/shape mismatch (naming the first tensor that differs), NaN/Inf in an input.
    """
    models = list(models)
    check_merge_call(method, models, key, has_base=base is not None)
    reference = models[0] if base is None else base
    mismatch = first_mismatch(reference, models)
    if mismatch:
        raise ValueError(mismatch)
    check_weights_arg(method, weights, len(models))
    t = hparams.get("t")
    kernel = make_kernel(method, len(models), **hparams)
    per_leaf_weights = [t] if method == "slerp" else weights

    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(reference)
    model_leaves = [jax.tree_util.tree_leaves(m) for m in models]
    # host sources (a run on a mesh): every merged tensor comes back to the host when made (`host_leaves`)
    host = on_host(*models) and (base is None or on_host(base))
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
        is_blocks = is_stacked(name) and np.ndim(ref_leaf) >= 1
        copies_bytes = (len(inputs) + 1) * 4 * np.size(ref_leaf)  # K + 1 float32 copies of the leaf
        merged = None
        if is_blocks and copies_bytes > BLOCKWISE_MERGE_BYTES:
            # block by block: K + 1 float32 copies of one block at a time, not of the whole stacked leaf (a
            # Llama-2-7B MLP leaf [32, 4096, 11008] is 5.8 GB per float32 copy); the values of merge_tensor's
            # vmap over the blocks (block l: fold_in(leaf key, l)) bit for bit, PCB's within a float32 ulp
            merged = stacked(
                [
                    fetched(
                        merge_tensor(
                            kernel,
                            dtype,
                            False,
                            jax.random.fold_in(leaf_key, l),
                            ref_leaf[l],
                            [x[l] for x in inputs],
                            jnp.asarray(leaf_w)[l],
                        )[0],
                        host,
                    )
                    for l in range(np.shape(ref_leaf)[0])
                ],
                host,
            )
        elif (
            not is_blocks
            and kernel.method in chunked.CHUNKED_METHODS
            and copies_bytes > CHUNKED_MERGE_BYTES
            and not any(isinstance(x, jax.core.Tracer) for x in [ref_leaf, *inputs, leaf_w])
        ):
            merged = merge_leaf_in_chunks(kernel, dtype, leaf_key, ref_leaf, inputs, leaf_w)
            merged = merged if merged is None or host else jnp.asarray(merged)
        if merged is None:  # one program over the leaf (all blocks of a stacked one)
            merged = fetched(
                merge_tensor(kernel, dtype, is_blocks, leaf_key, ref_leaf, inputs, leaf_w)[0], host
            )
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
