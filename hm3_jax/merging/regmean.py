"""RegMean: regression-mean merging of linear layers from their input Gram matrices (Jin et al., ICLR 2023).

For a linear layer `y = x @ W` (`W` `[in, out]`) of K models, RegMean picks the W that best reproduces every
model's outputs on that model's own inputs, `min_W sum_k lambda_k ||X_k W - X_k W_k||^2 / N_k`, whose closed
form (paper Eq. 2 with the preference weights lambda_k) is

    W* = (sum_k lambda_k G~_k)^-1 (sum_k lambda_k G~_k W_k),
    G_k = X_k^T X_k / N_k   (the mean input Gram of layer W in model k on task k's calibration tokens),
    G~_k = alpha G_k + (1 - alpha) diag(G_k)        (paper Sec. 3.3: off-diagonal scaling, alpha in [0, 1]),

plus an optional ridge `rho * mean(diag(A)) I` on `A = sum_k lambda_k G~_k` (0 = the paper). With alpha < 1 the
system is positive definite whenever no input dimension is always zero. Leaves without a Gram (embeddings,
norms, biases, anything not used as an `x @ W` kernel) are merged by the preference-weighted average of task
vectors, `base + s * sum_k lambda_k delta_k / sum_k lambda_k` (s = `nonlinear_scale`; s = 1 is the paper's
plain average of the models). Mean (not summed) Grams make lambda_k mean the same for tasks with different
amounts of calibration data.

`regmean` is the closed form given the Grams; `regmean_from_data` measures them first, each expert on its own
task's search-split inputs (`layer_inputs.layer_input_grams`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax import host_blas
from hm3_jax.merging.api import first_mismatch
from hm3_jax.merging.calibration import Calibration, check_calibration
from hm3_jax.merging.groups import path_name
from hm3_jax.merging.layer_inputs import layer_input_grams


def check_models(base: Any, models: Sequence[Any], what: str) -> list:
    """`models` as a list: not empty, each with `base`'s structure and shapes (ValueError naming the first
    tensor that differs otherwise)."""
    models = list(models)
    if not models:
        raise ValueError(f"{what}: the list of models to merge is empty")
    mismatch = first_mismatch(base, models)
    if mismatch:
        raise ValueError(f"{what}: {mismatch}")
    return models


def check_preference(weights: Sequence[float] | None, num_models: int, what: str) -> np.ndarray:
    """K non-negative, finite weights not all 0 (default all 1) as float64 `[K]`; ValueError otherwise."""
    if weights is None:
        return np.ones(num_models)
    w = np.asarray(weights, np.float64)
    if w.shape != (num_models,):
        raise ValueError(f"{what}: weights must be one number per model ({num_models}), got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or not np.any(w > 0):
        raise ValueError(f"{what}: weights must be finite, >= 0 and not all 0, got {w.tolist()}")
    return w


def on_own_calibration(
    fn: Callable[[int, Any, Calibration], Any],
    models: Sequence[Any],
    calibration: Sequence[Calibration],
    weights: Sequence[float] | None,
    what: str,
) -> list:
    """`fn(k, models[k], calibration[k])` for every model k of weight > 0 (task k's search-split rows through
    model k, as the papers do), in order, and None for the models of weight 0 (not run), after checking
    `weights` (`check_preference`) and `calibration` (`check_calibration`), each error naming `what`."""
    lam = check_preference(weights, len(models), what)
    check_calibration(calibration, len(models), what)
    return [
        fn(k, model, calib) if lam[k] > 0 else None
        for k, (model, calib) in enumerate(zip(models, calibration, strict=True))
    ]


def _modified_gram(gram: jax.Array, alpha: float) -> jax.Array:
    """`alpha G + (1 - alpha) diag(G)` for `G` `[..., in, in]`."""
    diag = jnp.diagonal(gram, axis1=-2, axis2=-1)
    return alpha * gram + (1.0 - alpha) * (diag[..., :, None] * jnp.eye(gram.shape[-1], dtype=gram.dtype))


@host_blas.single_threaded
def check_gram_system(name: str, system: Any, alpha: float, rtol: float) -> None:
    """Refuses a singular RegMean system `A` `[..., in, in]` (host-side; skipped under tracing).

    Singular means: an input dimension no calibration token uses (`A_ii <= rtol * max_j A_jj`), or, when
    `alpha == 1` (no diagonal regularisation), an eigenvalue `<= rtol * the largest` (computed in float64).

    Raises:
      ValueError naming the leaf, the block (stacked leaves) and the fix.
    """
    if isinstance(system, jax.core.Tracer):
        return
    a = np.asarray(system, np.float64).reshape((-1,) + tuple(np.shape(system)[-2:]))
    stacked = np.ndim(system) == 3
    for block, mat in enumerate(a):
        where = f"{name!r}" + (f" (block {block})" if stacked else "")
        if not np.all(np.isfinite(mat)):
            raise ValueError(f"RegMean: the Gram matrix of {where} is not finite")
        diag = np.diagonal(mat)
        dead = np.flatnonzero(diag <= rtol * max(float(diag.max()), 0.0))
        if dead.size or diag.max() <= 0:
            dim = int(dead[0]) if dead.size else 0
            raise ValueError(
                f"RegMean: the Gram matrix of {where} is singular: input dimension {dim} is zero on every "
                "calibration token; use more or other calibration data, or ridge > 0"
            )
        if alpha >= 1.0:
            eig = np.linalg.eigvalsh(mat)
            if eig[0] <= rtol * eig[-1]:
                raise ValueError(
                    f"RegMean: the Gram matrix of {where} is singular (smallest/largest eigenvalue "
                    f"{eig[0]:.3g}/{eig[-1]:.3g}, e.g. fewer calibration tokens than input dimensions); use "
                    "alpha < 1, ridge > 0 or more calibration data"
                )


def regmean(
    base: Any,
    models: Sequence[Any],
    grams: Sequence[Mapping[str, Any]],
    *,
    weights: Sequence[float] | None = None,
    alpha: float = 0.9,
    ridge: float = 0.0,
    nonlinear_scale: float = 1.0,
    rtol: float = 1e-6,
) -> Any:
    """RegMean merge of `models` given each model's mean input Gram matrices (module docstring, Eq. 2).

    Args:
      base: pytree (the models' common base; used for the non-linear leaves' task vectors).
      models: K pytrees of the base's structure and shapes.
      grams: K mappings {leaf name: G_k}, the same names for every model, `G_k` float `[in, in]` for a leaf
        `[in, out]` and `[L, in, in]` for a stacked leaf `[L, in, out]` (`layer_inputs.layer_input_grams` of
        model k on task k's search-split inputs).
      weights: the preference lambda, K numbers >= 0, not all 0 (default all 1); a model of weight 0 has no
        influence.
      alpha: off-diagonal scale in [0, 1] (1 = the plain Grams; the paper tunes it, 0.9 is a common choice).
      ridge: rho >= 0, adds `rho * mean(diag(A)) I` to the system (0 = the paper).
      nonlinear_scale: s, the task-vector scale of the leaves without a Gram (1 = weighted average).
      rtol: singularity threshold of `check_gram_system`.
    Returns:
      The merged pytree (each leaf in the base leaf's dtype; non-floating leaves copied from the base).
    Raises:
      ValueError: bad weights or alpha, Gram names that are not leaves or differ between models, a Gram whose
        shape does not match its leaf (naming it), a singular system (naming the leaf and block), a model
        whose structure or shapes differ from the base.
    """
    models = check_models(base, models, "RegMean")
    lam = check_preference(weights, len(models), "RegMean")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"RegMean: alpha must be in [0, 1], got {alpha}")
    if ridge < 0:
        raise ValueError(f"RegMean: ridge must be >= 0, got {ridge}")
    if len(grams) != len(models):
        raise ValueError(f"RegMean: got Gram matrices of {len(grams)} models for {len(models)} models")
    names = set(grams[0])
    for k, g in enumerate(grams):
        if set(g) != names:
            diff = sorted(set(g) ^ names)
            raise ValueError(
                f"RegMean: model {k}'s Gram matrices name other layers than model 0's: {diff[:3]}"
            )
    leaf_shapes = {path_name(p): np.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(base)[0]}
    unknown = sorted(names - set(leaf_shapes))
    if unknown:
        raise ValueError(f"RegMean: Gram matrices for {unknown[:3]}, which are not leaves of the base")
    keep = [k for k in range(len(models)) if lam[k] > 0]
    for name in sorted(names):
        shape = leaf_shapes[name]
        if len(shape) not in (2, 3):
            raise ValueError(
                f"RegMean: leaf {name!r} of shape {shape} is not an [in, out] or [L, in, out] kernel"
            )
        expect = shape[:-1] + shape[-2:-1]
        for k in keep:
            if tuple(np.shape(grams[k][name])) != expect:
                raise ValueError(
                    f"RegMean: model {k}'s Gram matrix of {name!r} has shape {tuple(np.shape(grams[k][name]))}; "
                    f"the leaf {shape} needs {expect}"
                )
    live_grams = [{n: jnp.asarray(grams[k][n], jnp.float32) for n in names} for k in keep]
    lam_live = jnp.asarray(lam[keep] / lam.sum(), jnp.float32)
    merged, systems = _regmean_tree(
        base,
        [models[k] for k in keep],
        live_grams,
        lam_live,
        float(alpha),
        float(ridge),
        float(nonlinear_scale),
    )
    for name in sorted(systems):
        check_gram_system(name, systems[name], alpha if ridge == 0 else 0.0, rtol)
    return merged


def _solve(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a^-1 b` for `a` `[..., n, n]`, `b` `[..., n, m]`, one matrix per LAPACK call (`lax.map` over the leading
    axes). A batched `jnp.linalg.solve` on CPU can hang the whole program when several run at once (jaxlib's
    LAPACK kernel waits on XLA's intra-op pool from inside it; `tsv.py` has the details), which a RegMean of a
    transformer (one batched solve per kernel leaf) does."""
    if a.ndim == 2:
        return jnp.linalg.solve(a, b)
    return jax.lax.map(lambda ab: _solve(*ab), (a, b))


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _regmean_tree(base, models, grams, lam, alpha, ridge, nonlinear_scale):
    """The arithmetic of `regmean` for the models of positive weight (lam [K'] sums to 1): the merged tree and
    the systems `A` {leaf name: [..., in, in]} for the host-side singularity check."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(base)
    model_leaves = [jax.tree.leaves(m) for m in models]
    out, systems = [], {}
    for i, (path, b) in enumerate(leaves):
        name = path_name(path)
        if not jnp.issubdtype(b.dtype, jnp.floating):
            out.append(b)
            continue
        thetas = [ml[i].astype(jnp.float32) for ml in model_leaves]
        if name not in grams[0]:
            delta = sum(lam[k] * (t - b.astype(jnp.float32)) for k, t in enumerate(thetas))
            out.append((b.astype(jnp.float32) + nonlinear_scale * delta).astype(b.dtype))
            continue
        mod = [_modified_gram(g[name], alpha) for g in grams]
        system = sum(lam[k] * m for k, m in enumerate(mod))  # [..., in, in]
        rhs = sum(
            lam[k] * (m @ t) for k, (m, t) in enumerate(zip(mod, thetas, strict=True))
        )  # [..., in, out]
        if ridge > 0:
            mean_diag = jnp.mean(jnp.diagonal(system, axis1=-2, axis2=-1), axis=-1)
            system = system + ridge * mean_diag[..., None, None] * jnp.eye(system.shape[-1])
        systems[name] = system
        out.append(_solve(system, rhs).astype(b.dtype))
    return jax.tree_util.tree_unflatten(treedef, out), systems


def model_grams(
    models: Sequence[Any],
    calibration: Sequence[Calibration],
    *,
    weights: Sequence[float] | None = None,
    batch_size: int | None = None,
) -> list:
    """Each model's mean input Grams on its own task's calibration rows: model k's `layer_input_grams` on
    `calibration[k]` (task k's search-split inputs through model k, as in the paper): one forward pass of each
    model over its rows. Models of weight 0 are not run; their entry repeats another model's Grams (a
    placeholder `regmean` never reads for a weight-0 model). Returns K {leaf name: G}."""
    grams = on_own_calibration(
        lambda k, model, calib: layer_input_grams(
            calib.forward_fn, model, calib.inputs, calib.token_weights, batch_size
        ),
        list(models),
        calibration,
        weights,
        "RegMean",
    )
    ref = next(g for g in grams if g is not None)
    return [ref if g is None else g for g in grams]


def regmean_from_data(
    base: Any,
    models: Sequence[Any],
    calibration: Sequence[Calibration],
    *,
    weights: Sequence[float] | None = None,
    alpha: float = 0.9,
    ridge: float = 0.0,
    nonlinear_scale: float = 1.0,
    batch_size: int | None = None,
) -> Any:
    """RegMean with the Grams measured here (`model_grams`: model k on `calibration[k]`), then `regmean`.
    Costs one forward pass of each model of positive weight over its task's calibration rows."""
    models = list(models)
    lam = check_preference(weights, len(models), "RegMean")
    grams = model_grams(models, calibration, weights=lam, batch_size=batch_size)
    return regmean(
        base, models, grams, weights=lam, alpha=alpha, ridge=ridge, nonlinear_scale=nonlinear_scale
    )
