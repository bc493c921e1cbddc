"""Per-linear-layer input statistics of any pure forward function, without changing the model code.

RegMean (`regmean.py`) needs, for every linear layer `y = x @ W` (`W` `[in, out]`, our kernels' layout), the
Gram matrix of the layer's inputs `G = X^T X` over calibration tokens, computed through the model being merged.
Our models are pure functions (`models.apply(config, params, x)`) with no hooks, so the inputs are read off
the computation itself: `linear_input_stats` traces `forward_fn(params, inputs)` to a jaxpr and evaluates it
again, equation by equation, with one extra rule: wherever a params leaf (possibly cast with `astype`) is the
kernel of a `dot_general` that contracts its first axis, the other operand is that layer's input `X`, and
`X^T diag(w) X` is accumulated for the leaf. Everything else is bound as in `jax.core.eval_jaxpr`, so the
outputs are the forward's own and the whole thing can be jitted (`layer_input_grams` does).

Interface (L = blocks, `in` = the kernel's input size):

    linear_input_stats(forward_fn, params, inputs, token_weights=None) -> {leaf name: InputStats}
        leaf name: "/"-joined pytree path, e.g. "blocks/q/kernel", "head/kernel", "embed/patch/kernel";
        InputStats.gram  [L, in, in] for a leaf stacked under "blocks" (one Gram per block), else [in, in];
                         sum over the layer's input rows x_n (every token of every row) of w_n x_n x_n^T;
        InputStats.count [L] or []: sum of w_n (the number of real tokens the layer saw).
    layer_input_grams(forward_fn, params, inputs, token_weights=None, batch_size=None) -> {leaf name: G}
        the same summed over batches and divided by the count: the MEAN Gram G = X^T W X / sum(w).

Stacked blocks: a leaf under "blocks" is `[L, in, out]`; `models.apply` feeds it to a `lax.scan` over blocks,
and the Gram recorded inside the scan body for step l is block l's. A kernel closed over by a scan (not one of
its scanned-over operands) sums its Grams over the iterations (e.g. the head under a `lax.map` over batches).

Token weights: `w` has a shape that is a prefix of the layer input's row shape (`x.shape[:-1]` after moving
the contracted axis last): `[B, S]` for an LM's per-token weights (1 on real tokens) or `[B]` per row (e.g. a
ViT, whose layers see `[B, N+1, D]`). Anything else is a ValueError naming the leaf.

What counts as a linear layer: a floating params leaf that reaches `dot_general`s directly (through `astype`
or nested `jit`/`custom_jvp`/`custom_vjp`/`checkpoint` calls), every time as a 2-D `[in, out]` operand
contracted on axis 0. Leaves used otherwise (an embedding gathered, or multiplied as `h @ E^T` by a tied LM
head; norms; biases) are not, and have no entry. A kernel that enters a `cond` or `while_loop` (e.g. the path engine's `lax.cond` over padding
steps) is refused with a ValueError: its Grams would be missed; calibrate with `models.apply`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

from hm3_jax.merging.calibration import Calibration, batches
from hm3_jax.merging.groups import path_name

# Primitives through which a kernel keeps its identity (a cast does not change which layer it is).
_PASS_THROUGH = frozenset({"convert_element_type", "copy", "copy_p"})
# Call-like primitives evaluated inline (their body is the forward computation).
_CALLS = frozenset(
    {
        "jit",
        "pjit",
        "closed_call",
        "core_call",
        "remat",
        "remat2",
        "checkpoint",
        "custom_jvp_call",
        "custom_vjp_call",
    }
)


class InputStats(NamedTuple):
    """Summed input statistics of one linear layer: `gram` `[..., in, in]` = sum_n w_n x_n x_n^T, `count`
    `[...]` = sum_n w_n (leading axis L for a stacked leaf)."""

    gram: jax.Array
    count: jax.Array


class _Tag(NamedTuple):
    name: str  # the params leaf
    per_step: bool  # a slice of a stacked leaf scanned over: its Grams stack on the scan's axis


def _add(grams: dict, key, stats: InputStats) -> None:
    if key in grams:
        old = grams[key]
        grams[key] = InputStats(old.gram + stats.gram, old.count + stats.count)
    else:
        grams[key] = stats


def _record(grams: dict, tag: _Tag, x, x_contract: int, weights) -> None:
    """Adds `X^T diag(w) X` of the input `x` (contracted on `x_contract`) of the kernel `tag.name`."""
    x = jnp.moveaxis(x, x_contract, -1).astype(jnp.float32)
    rows = x.shape[:-1]
    if weights is None:
        w = jnp.ones(rows, jnp.float32)
    else:
        wshape = tuple(weights.shape)
        if tuple(rows[: len(wshape)]) != wshape:
            raise ValueError(
                f"linear layer {tag.name!r}: token_weights of shape {wshape} do not match its input rows of "
                f"shape {tuple(rows)} (the weights' shape must be a prefix of it)"
            )
        w = jnp.broadcast_to(weights.reshape(wshape + (1,) * (len(rows) - len(wshape))), rows)
    flat = x.reshape(-1, x.shape[-1])
    wf = w.reshape(-1).astype(jnp.float32)
    gram = jnp.einsum("ni,n,nj->ij", flat, wf, flat, precision=jax.lax.Precision.HIGHEST)
    _add(grams, tag, InputStats(gram, jnp.sum(wf)))


def _dot_general(eqn, invals, tags, grams, weights, excluded: set) -> None:
    (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params["dimension_numbers"]
    for side, tag in enumerate(tags[:2]):
        if tag is None:
            continue
        kernel = invals[side]
        contract, batch = (lhs_c, lhs_b) if side == 0 else (rhs_c, rhs_b)
        other_contract = rhs_c if side == 0 else lhs_c
        if kernel.ndim != 2 or tuple(contract) != (0,) or batch or tags[1 - side] is not None:
            excluded.add(tag.name)  # e.g. a tied LM head `h @ embedding.T`: not an `x @ W` layer
            continue
        _record(grams, tag, invals[1 - side], int(other_contract[0]), weights)


def _sub_jaxpr(eqn):
    for key in ("jaxpr", "call_jaxpr"):
        sub = eqn.params.get(key)
        if isinstance(sub, jcore.ClosedJaxpr):
            return sub.jaxpr, list(sub.consts)
        if isinstance(sub, jcore.Jaxpr):
            return sub, []
    raise ValueError(f"cannot read the body of primitive {eqn.primitive.name!r}")


def _has_jaxpr(params: dict) -> bool:
    return any(isinstance(v, jcore.ClosedJaxpr | jcore.Jaxpr) for v in params.values()) or any(
        isinstance(v, tuple) and any(isinstance(u, jcore.ClosedJaxpr | jcore.Jaxpr) for u in v)
        for v in params.values()
    )


def _scan(eqn, invals, tags, weights, excluded: set):
    """A `scan` whose operands include kernels: re-run as `lax.scan` with the body interpreted, the Grams of
    scanned-over kernel slices (`per_step`) returned as extra stacked outputs, the others summed."""
    p = eqn.params
    num_consts, num_carry = p["num_consts"], p["num_carry"]
    body, body_consts = p["jaxpr"].jaxpr, list(p["jaxpr"].consts)
    consts, init, xs = (
        invals[:num_consts],
        invals[num_consts : num_consts + num_carry],
        invals[num_consts + num_carry :],
    )
    const_tags, carry_tags = tags[:num_consts], tags[num_consts : num_consts + num_carry]
    xs_tags = tags[num_consts + num_carry :]
    if any(t is not None for t in carry_tags):
        bad = next(t for t in carry_tags if t is not None)
        raise ValueError(f"params leaf {bad.name!r} is a scan carry; its layer inputs cannot be attributed")
    body_xs_tags = []
    for t in xs_tags:
        if t is not None and t.per_step:
            raise ValueError(
                f"params leaf {t.name!r} is scanned over twice; only one block axis is supported"
            )
        body_xs_tags.append(None if t is None else _Tag(t.name, True))
    body_tags = list(const_tags) + [None] * num_carry + body_xs_tags

    def step(carry, x):
        outs, _, step_grams = _eval(body, body_consts, [*consts, *carry, *x], body_tags, weights, excluded)
        return tuple(outs[:num_carry]), (tuple(outs[num_carry:]), step_grams)

    carry, (ys, step_grams) = jax.lax.scan(
        step, tuple(init), tuple(xs), length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
    )
    grams: dict = {}
    for tag, stats in step_grams.items():
        if tag.per_step:  # block l's Gram at index l: one stacked entry for the whole leaf
            _add(grams, _Tag(tag.name, False), stats)
        else:  # a kernel constant across the iterations: its inputs from every iteration
            _add(grams, tag, InputStats(jnp.sum(stats.gram, axis=0), jnp.sum(stats.count, axis=0)))
    return [*carry, *ys], grams


def _bind(eqn, invals):
    """`eqn`'s primitive applied to `invals`, as `jax.core.eval_jaxpr` does (older jax versions return
    `(subfuns, params)` from `get_bind_params`)."""
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = []
    if isinstance(bind_params, tuple):
        subfuns, bind_params = bind_params
    with eqn.ctx.manager:
        return eqn.primitive.bind(*subfuns, *invals, **bind_params)


def _eval(jaxpr, consts, args, arg_tags, weights, excluded: set):
    """Evaluates `jaxpr` on `args`; returns (outputs, their tags, {_Tag: InputStats}); adds to `excluded` the
    leaves used in a `dot_general` other than as an `[in, out]` kernel."""
    env: dict = {}
    tag_env: dict = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    def read_tag(v):
        return None if isinstance(v, jcore.Literal) else tag_env.get(v)

    for v, c in zip(jaxpr.constvars, consts, strict=True):
        env[v] = c
    for v, a, t in zip(jaxpr.invars, args, arg_tags, strict=True):
        env[v] = a
        if t is not None:
            tag_env[v] = t
    grams: dict = {}
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        tags = [read_tag(v) for v in eqn.invars]
        name = eqn.primitive.name
        out_tags = [None] * len(eqn.outvars)
        if all(t is None for t in tags):
            outs = _bind(eqn, invals)
        elif name == "dot_general":
            _dot_general(eqn, invals, tags, grams, weights, excluded)
            outs = _bind(eqn, invals)
        elif name in _PASS_THROUGH:
            outs = _bind(eqn, invals)
            out_tags = [tags[0]]
        elif name in _CALLS:
            sub, sub_consts = _sub_jaxpr(eqn)
            outs, out_tags, sub_grams = _eval(sub, sub_consts, invals, tags, weights, excluded)
            for tag, stats in sub_grams.items():
                _add(grams, tag, stats)
        elif name == "scan":
            outs, sub_grams = _scan(eqn, invals, tags, weights, excluded)
            for tag, stats in sub_grams.items():
                _add(grams, tag, stats)
        elif _has_jaxpr(eqn.params):
            leaf = next(t for t in tags if t is not None)
            raise ValueError(
                f"params leaf {leaf.name!r} enters a {name!r}, whose body is not followed for layer inputs "
                "(supported: scan, jit, custom_jvp/vjp, checkpoint); calibrate with the plain forward "
                "(models.apply), not a path with lax.cond"
            )
        else:  # any other use of a leaf (gather, transpose, mul by a norm scale, bias add): not a linear input
            outs = _bind(eqn, invals)
        if not eqn.primitive.multiple_results:
            outs = [outs]
        for v, val, t in zip(eqn.outvars, outs, out_tags, strict=True):
            env[v] = val
            if t is not None:
                tag_env[v] = t
    outvals = [read(v) for v in jaxpr.outvars]
    return outvals, [read_tag(v) for v in jaxpr.outvars], grams


def linear_input_stats(
    forward_fn: Callable[[Any, Any], Any], params: Any, inputs: Any, token_weights: jax.Array | None = None
) -> dict[str, InputStats]:
    """Summed input Grams `sum_n w_n x_n x_n^T` of every linear layer of `forward_fn(params, inputs)`.

    Pure and jit-able (with `forward_fn` static). See the module docstring for what counts as a linear layer.

    Args:
      forward_fn: `(params, inputs) -> outputs`, pure.
      params: pytree of arrays; leaves under "blocks" are stacked `[L, ...]`.
      inputs: one batch `[B, ...]`.
      token_weights: None (weight 1 everywhere) or float `[B]` / `[B, S]` (a prefix of each layer's rows).
    Returns:
      {leaf name: InputStats(gram [L, in, in] or [in, in], count [L] or [])}, float32.
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    names = [path_name(p) for p, _ in leaves]
    closed = jax.make_jaxpr(forward_fn)(params, inputs)
    flat_inputs = jax.tree.leaves(inputs)
    arg_tags = [
        _Tag(n, False) if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating) else None
        for n, (_, leaf) in zip(names, leaves, strict=True)
    ] + [None] * len(flat_inputs)
    weights = None if token_weights is None else jnp.asarray(token_weights, jnp.float32)
    args = [leaf for _, leaf in leaves] + flat_inputs
    excluded: set = set()
    _, _, grams = _eval(closed.jaxpr, list(closed.consts), args, arg_tags, weights, excluded)
    out = {tag.name: stats for tag, stats in grams.items() if tag.name not in excluded}
    return dict(sorted(out.items()))


@functools.partial(jax.jit, static_argnums=0)
def input_stats_jit(forward_fn, params, inputs, token_weights):
    """`linear_input_stats` jitted (`forward_fn` static): the program `layer_input_grams` runs per chunk and the
    memory plan compiles."""
    return linear_input_stats(forward_fn, params, inputs, token_weights)


def layer_input_grams(
    forward_fn: Callable[[Any, Any], Any],
    params: Any,
    calibration_inputs: Any,
    token_weights: Any = None,
    batch_size: int | None = None,
) -> dict[str, jax.Array]:
    """Mean input Gram matrix of every linear layer over calibration data: `G = sum_n w_n x_n x_n^T / sum_n w_n`.

    Runs `linear_input_stats` jitted (one compilation per `forward_fn` and batch shape) on chunks of
    `batch_size` rows and sums them. The caller passes SEARCH-split inputs (`calibration.py`).

    Args:
      forward_fn: `(params, inputs [B, ...]) -> outputs`, pure (hashable: it is a static jit argument).
      params: the model whose layer inputs are measured (RegMean: each expert on its own task's inputs).
      calibration_inputs: `[N, ...]`, N >= 1.
      token_weights: None or float `[N]` / `[N, S]` (1 = real token).
      batch_size: rows per forward (None: all N at once).
    Returns:
      {leaf name: G float32 [L, in, in] (stacked) or [in, in]}.
    Raises:
      ValueError: no calibration rows, all-zero weights, a layer (or block) that saw no token (naming it),
        or weights of the wrong shape.
    """
    calib = Calibration(forward_fn, calibration_inputs, token_weights)
    if calib.num_rows == 0:
        raise ValueError(
            f"no calibration data: inputs of shape {tuple(np.shape(calibration_inputs))} have no rows"
        )
    total: dict[str, InputStats] = {}
    for x, w in batches(calib, batch_size):
        for name, stats in input_stats_jit(forward_fn, params, x, w).items():
            _add(total, name, stats)
    if not total:
        raise ValueError(
            "forward_fn uses no params leaf as a linear layer kernel (no dot_general x @ W found)"
        )
    out = {}
    for name, stats in total.items():
        count = np.asarray(stats.count, np.float64)
        empty = np.flatnonzero(count.reshape(-1) <= 0)
        if empty.size:
            where = f" (block {int(empty[0])})" if count.ndim else ""
            raise ValueError(
                f"no calibration data reached linear layer {name!r}{where}: its token weights sum to 0"
            )
        out[name] = stats.gram / jnp.asarray(count, jnp.float32)[..., None, None]
    return out
