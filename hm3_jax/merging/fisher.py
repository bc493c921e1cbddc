"""Fisher merging (Matena & Raffel, NeurIPS 2022): a per-parameter weighted average by diagonal Fisher information.

Each model k gets a diagonal Fisher `F_k` measured on its own task's unlabelled search-split inputs, with labels
drawn from the model's OWN predictive distribution (never ground truth; the "empirical Fisher" of true labels
is not this). Per example x_n with predictions p(. | x_n, s) at positions s (an LM's tokens; one position for
a classifier) and token weights w_{n,s}:

    F = (1/N) sum_n E_{y ~ p(.|x_n)} [ g_n(y) ** 2 ],    g_n(y) = grad_theta sum_s w_{n,s} log p(y_s | x_n, s),

N the number of rows with a positive weight. The positions' labels are independent given x_n (teacher forcing
on the given inputs), so the cross terms of the square vanish in expectation and
`E[g_n ** 2] = sum_s w_{n,s}^2 E_{y_s}[(grad log p(y_s | x_n, s)) ** 2]`. Two estimators:

* `mode="expected"`: the expectation exactly, `sum_s sum_c p(c|x_n, s) (w_{n,s} grad log p(c|x_n, s)) ** 2`;
  one backward pass per (position, class): for classifiers with few classes (the paper's setting).
* `mode="sample"`: `num_samples` draws of every position's label, `y_s ~ p(.|x_n, s)`, then
  `mean_j g_n(y^(j)) ** 2`; one backward pass per draw (unbiased for the same F; what an LM can afford).
  The draws of row n, sample j come from `fold_in(fold_in(key, n), j)` with `jax.random.categorical`.

The merge (paper Eq. 3, with the preference weights lambda_k and the paper's floor on the Fisher):

    theta* = sum_k lambda_k F~_k theta_k / sum_k lambda_k F~_k,   F~_k = max(F_k, floor)   (elementwise),

so a parameter no model is sensitive to gets the lambda-weighted average. Non-floating leaves come from the
base (or model 0).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax.merging.api import first_mismatch
from hm3_jax.merging.calibration import Calibration, broadcast_weights, row_weights
from hm3_jax.merging.groups import path_name
from hm3_jax.merging.regmean import check_preference, on_own_calibration

MODES = ("sample", "expected")


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)


def diagonal_fisher(
    key: jax.Array,
    forward_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    inputs: Any,
    token_weights: Any = None,
    *,
    mode: str = "sample",
    num_samples: int = 1,
) -> Any:
    """The diagonal Fisher `F` of `params` on `inputs` (module docstring), one row at a time.

    Args:
      key: PRNG key of the label draws (`mode="sample"`; unused by `"expected"`).
      forward_fn: `(params, inputs [1, ...]) -> logits [1, ..., C]`, pure.
      params: pytree; only floating leaves are differentiated (the others get F = 0).
      inputs: `[N, ...]`, N >= 1 search-split rows.
      token_weights: None or float `[N, ...]`, a prefix of each row's prediction shape (1 = real token).
      mode: "sample" or "expected". num_samples: label draws per row (sample mode).
    Returns:
      A pytree like `params`, float32, F >= 0 (mean over the rows with a positive weight).
    Raises:
      ValueError: no rows, unknown mode, num_samples < 1, weights of the wrong shape, or (on concrete values)
        token weights that are all 0.
    """
    if mode not in MODES:
        raise ValueError(f"Fisher: mode must be one of {MODES}, got {mode!r}")
    if num_samples < 1:
        raise ValueError(f"Fisher: num_samples must be >= 1, got {num_samples}")
    calib = Calibration(forward_fn, inputs, token_weights)
    if calib.num_rows == 0:
        raise ValueError(f"Fisher: no calibration data (inputs of shape {tuple(np.shape(inputs))})")
    leaves, treedef = jax.tree.flatten(params)
    is_float = [_is_float(x) for x in leaves]
    float_leaves = [x for x, f in zip(leaves, is_float, strict=True) if f]

    def rebuild(float_part):
        it = iter(float_part)
        return jax.tree.unflatten(
            treedef, [next(it) if f else x for x, f in zip(leaves, is_float, strict=True)]
        )

    inputs = jnp.asarray(inputs)
    weights = row_weights(calib)

    def one_row(carry, xs):
        total, count = carry
        n, x, w_row = xs
        logits, vjp_fn = jax.vjp(lambda fl: forward_fn(rebuild(fl), x[None]), float_leaves)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [1, ..., C]
        probs = jnp.exp(logp)
        w = broadcast_weights(w_row[None], logp.shape[:-1], "Fisher")  # [1, ...]

        def squared_grad(cotangent):
            (grads,) = vjp_fn(cotangent.astype(logits.dtype))
            return [jnp.square(g.astype(jnp.float32)) for g in grads]

        if mode == "sample":
            row_key = jax.random.fold_in(key, n)

            def draw(acc, j):
                y = jax.random.categorical(jax.random.fold_in(row_key, j), logp)  # [1, ...]
                cotangent = w[..., None] * (jax.nn.one_hot(y, logp.shape[-1]) - probs)
                return [a + s / num_samples for a, s in zip(acc, squared_grad(cotangent), strict=True)], None

            row, _ = jax.lax.scan(
                draw, [jnp.zeros(x.shape, jnp.float32) for x in float_leaves], jnp.arange(num_samples)
            )
        else:
            num_classes = logp.shape[-1]
            flat_probs = probs.reshape(-1, num_classes)  # [P, C]
            flat_w = w.reshape(-1)

            def one_label(acc, pc):
                p, c = pc // num_classes, pc % num_classes
                row_ct = flat_w[p] * (jax.nn.one_hot(c, num_classes) - flat_probs[p])
                cotangent = jnp.zeros_like(flat_probs).at[p].set(row_ct).reshape(logp.shape)
                weight = flat_probs[p, c]
                return [a + weight * s for a, s in zip(acc, squared_grad(cotangent), strict=True)], None

            row, _ = jax.lax.scan(
                one_label,
                [jnp.zeros(x.shape, jnp.float32) for x in float_leaves],
                jnp.arange(flat_probs.size),
            )
        real = jnp.sum(w) > 0
        total = [t + jnp.where(real, r, 0.0) for t, r in zip(total, row, strict=True)]
        return (total, count + real.astype(jnp.float32)), None

    init = ([jnp.zeros(x.shape, jnp.float32) for x in float_leaves], jnp.zeros((), jnp.float32))
    rows = jnp.arange(calib.num_rows)
    (total, count), _ = jax.lax.scan(one_row, init, (rows, inputs, weights))
    if not isinstance(count, jax.core.Tracer) and float(count) <= 0:
        raise ValueError("Fisher: no calibration data: every token weight is 0 (padding only)")
    fisher = [t / jnp.maximum(count, 1.0) for t in total]
    it = iter(fisher)
    return jax.tree.unflatten(
        treedef,
        [
            next(it) if f else jnp.zeros(np.shape(x), jnp.float32)
            for x, f in zip(leaves, is_float, strict=True)
        ],
    )


# One diagonal Fisher, jitted (the program `model_fishers` runs and the memory plan compiles).
fisher_jit = jax.jit(diagonal_fisher, static_argnums=(1,), static_argnames=("mode", "num_samples"))


def fisher_merge(
    models: Sequence[Any],
    fishers: Sequence[Any],
    *,
    weights: Sequence[float] | None = None,
    floor: float = 1e-6,
    base: Any = None,
) -> Any:
    """`theta* = sum_k lambda_k F~_k theta_k / sum_k lambda_k F~_k`, `F~_k = max(F_k, floor)` (module docstring).

    Args:
      models: K pytrees; fishers: K pytrees of the same structure and shapes (`diagonal_fisher`).
      weights: the preference lambda, K numbers >= 0 not all 0 (default all 1).
      floor: epsilon > 0, the floor of every Fisher entry (Matena & Raffel's `fisher_floor`, 1e-6).
      base: optional; its non-floating leaves are copied (default model 0's).
    Returns:
      The merged pytree in the dtypes of `base` (or model 0).
    Raises:
      ValueError: no models, bad weights, floor <= 0, fishers or models whose structure or shapes differ
        (naming the leaf), a negative or non-finite Fisher entry (naming the leaf).
    """
    models = list(models)
    if not models:
        raise ValueError("Fisher merging: the list of models to merge is empty")
    if floor <= 0:
        raise ValueError(f"Fisher merging: floor must be > 0, got {floor}")
    if len(fishers) != len(models):
        raise ValueError(f"Fisher merging: got {len(fishers)} Fisher pytrees for {len(models)} models")
    reference = models[0] if base is None else base
    for what, trees in (("model", models), ("Fisher of model", list(fishers))):
        mismatch = first_mismatch(reference, trees)
        if mismatch:
            raise ValueError(f"Fisher merging ({what}s): {mismatch}")
    lam = check_preference(weights, len(models), "Fisher merging")
    keep = [k for k in range(len(models)) if lam[k] > 0]
    leaves = jax.tree_util.tree_flatten_with_path(reference)[0]
    for k in keep:
        for (path, ref), f in zip(leaves, jax.tree.leaves(fishers[k]), strict=True):
            if isinstance(f, jax.core.Tracer) or not jnp.issubdtype(jnp.asarray(ref).dtype, jnp.floating):
                continue
            host = np.asarray(f, np.float32)
            if not np.all(np.isfinite(host) & (host >= 0)):
                raise ValueError(
                    f"Fisher merging: model {k}'s Fisher of {path_name(path)!r} has negative or non-finite entries"
                )
    lam_live = jnp.asarray(lam[keep], jnp.float32)
    return _fisher_tree(
        reference, [models[k] for k in keep], [fishers[k] for k in keep], lam_live, float(floor)
    )


@functools.partial(jax.jit, static_argnums=4)
def _fisher_tree(reference, models, fishers, lam, floor):
    """The arithmetic of `fisher_merge` for the models of positive weight."""
    leaves, treedef = jax.tree.flatten(reference)
    model_leaves = [jax.tree.leaves(m) for m in models]
    fisher_leaves = [jax.tree.leaves(f) for f in fishers]
    out = []
    for i, ref in enumerate(leaves):
        if not jnp.issubdtype(ref.dtype, jnp.floating):
            out.append(ref)
            continue
        fs = [lam[k] * jnp.maximum(fl[i].astype(jnp.float32), floor) for k, fl in enumerate(fisher_leaves)]
        num = sum(f * ml[i].astype(jnp.float32) for f, ml in zip(fs, model_leaves, strict=True))
        out.append((num / sum(fs)).astype(ref.dtype))
    return jax.tree.unflatten(treedef, out)


def model_fishers(
    key: jax.Array,
    models: Sequence[Any],
    calibration: Sequence[Calibration],
    *,
    weights: Sequence[float] | None = None,
    mode: str = "sample",
    num_samples: int = 1,
) -> list:
    """Each model's diagonal Fisher on its own task's calibration rows: model k's `diagonal_fisher` on
    `calibration[k]` with key `fold_in(key, k)` (jitted, one compilation per forward and shape). Models of
    weight 0 are not run (their Fisher is zeros, never read by `fisher_merge`). Returns K float32 pytrees."""
    models = list(models)
    fishers = on_own_calibration(
        lambda k, model, calib: fisher_jit(
            jax.random.fold_in(key, k),
            calib.forward_fn,
            model,
            calib.inputs,
            calib.token_weights,
            mode=mode,
            num_samples=num_samples,
        ),
        models,
        calibration,
        weights,
        "Fisher merging",
    )
    return [
        jax.tree.map(lambda x: jnp.zeros(np.shape(x), jnp.float32), model) if fisher is None else fisher
        for fisher, model in zip(fishers, models, strict=True)
    ]


def fisher_from_data(
    key: jax.Array,
    base: Any,
    models: Sequence[Any],
    calibration: Sequence[Calibration],
    *,
    weights: Sequence[float] | None = None,
    mode: str = "sample",
    num_samples: int = 1,
    floor: float = 1e-6,
) -> Any:
    """Fisher merging with the Fishers measured here (`model_fishers`: model k on `calibration[k]`, task k's
    search-split inputs, key `fold_in(key, k)`), then `fisher_merge`. Costs per model one forward and
    `num_samples` ("sample") or positions x classes ("expected") backward passes per calibration row; models of
    weight 0 are not run."""
    models = list(models)
    lam = check_preference(weights, len(models), "Fisher merging")
    fishers = model_fishers(key, models, calibration, weights=lam, mode=mode, num_samples=num_samples)
    return fisher_merge(models, fishers, weights=lam, floor=floor, base=base)
