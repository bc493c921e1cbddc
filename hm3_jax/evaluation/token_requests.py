"""Batched, bucketed scoring of token requests on a layer-path model: the engine behind the lm-eval adapter.

lm-eval-harness asks a model two kinds of token questions (`hm3_jax.evaluation.lm_eval_model` turns its text
requests into these, with the harness's own tokenisation rules):

* `loglikelihoods`: for (context ids c, continuation ids y), ``ll = sum_j log p(y_j | c, y_<j)`` (float32
  log-softmax, as `multiple_choice.summed_logprob`) and ``greedy = all_j [argmax p(. | c, y_<j) == y_j]``.
  The row fed to the model is the harness's (`HFLM._loglikelihood_tokens`): ``x = (c ++ y)[-(L + 1):][:-1]``
  (left-truncated to the context length L), and y is read off the last |y| positions of x's logits.
* `generate`: greedy continuations of left-padded prompts (`hm3_jax.models.greedy_decode`, the KV-cache
  decoder the run uses), ``max_new_tokens`` tokens per prompt; cutting at EOS and stop strings is the caller's.

Compilation: requests are sorted by length and cut into batches of exactly `batch_size` rows (the last one
padded with dummy rows); every batch is padded to bucket shapes (`bucket`: powers of two from 8, capped at
the context length), so the jitted programs are one per (row width, target width) or (prompt width, new
tokens) bucket, reused across calls, requests and tasks: a handful per model, not one per request. The path,
junction and params are traced, so another model of the same config and shapes reuses them too.

On a device mesh (`place_on_mesh`, one process): the shell and pool are placed once as the path engine places
them (`paths.sharded.place_model`: tensor parallel over "model", replicated over "data"), path and junction
replicated, and each batch's rows split over "data" (`batch_size` a multiple of its size); XLA's partitioner
inserts the collectives. With "model" > 1 the path's padding steps run without data-dependent branches
(`uniform`, as the engine). The answers equal one device's (tests/test_lm_eval_mesh.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from hm3_jax import distributed, models
from hm3_jax.paths.sharded import place_model
from hm3_jax.tasks.exact_match import argmax_equals
from hm3_jax.tasks.multiple_choice import summed_logprob
from hm3_jax.tasks.packing import pack_prompts

MIN_BUCKET = 8


class PathModel(NamedTuple):
    """A language model as hm3_jax runs it: `apply_path(config, shell, pool, path, ids, junction)`.

    A plain checkpoint is its own blocks in order (`pool = params["blocks"]`, `path = arange(L)`); an HM3
    path model is the run's pool and path. path: int32 [T_max] (-1 = padding); junction: None or
    {"scale", "shift": [T_max, D]}.
    """

    config: models.ModelConfig
    shell: dict
    pool: dict
    path: np.ndarray
    junction: dict | None = None
    mesh: jax.sharding.Mesh | None = None


def place_on_mesh(model: PathModel, mesh) -> PathModel:
    """`model` placed on `mesh` (module docstring; single process): shell and pool by `place_model`, path and
    junction replicated; its batches are then split over the mesh's "data" axis."""
    if jax.process_count() > 1:
        raise ValueError(
            f"a mesh over {jax.process_count()} processes: the lm-eval adapter runs in one process "
            "(its mesh spans that process's devices)"
        )
    shell, pool = place_model(model.shell, model.pool, mesh)
    path = distributed.place(np.asarray(model.path, np.int32), NamedSharding(mesh, PartitionSpec()))
    junction = None if model.junction is None else distributed.replicate(model.junction, mesh)
    return PathModel(model.config, shell, pool, path, junction, mesh)


def _data_size(model: PathModel) -> int:
    return 1 if model.mesh is None else int(dict(model.mesh.shape).get("data", 1))


def _uniform(model: PathModel) -> bool:
    """No data-dependent branches when "model" shards the blocks (as the engine's `paths.sharded.uniform_steps`)."""
    return model.mesh is not None and int(dict(model.mesh.shape).get("model", 1)) > 1


def _rows(model: PathModel, *arrays):
    """The batch arrays, their rows (axis 0) split over the mesh's "data" axis (unchanged without a mesh)."""
    if model.mesh is None:
        return arrays
    sharding = NamedSharding(model.mesh, PartitionSpec("data"))
    return tuple(jax.device_put(a, sharding) for a in arrays)


def bucket(n: int, cap: int) -> int:
    """The smallest power of two >= max(n, MIN_BUCKET), at most `cap` (n <= cap)."""
    return min(cap, max(MIN_BUCKET, 1 << max(0, int(n) - 1).bit_length()))


@functools.partial(jax.jit, static_argnames=("config", "uniform"))
def _score_batch(config, shell, pool, path, junction, ids, positions, labels, valid, uniform=False):
    """ids int32 [B, W] (right-padded); positions, labels int32 [B, P]; valid bool [B, P] ->
    (summed log-probabilities float32 [B], greedy bool [B])."""
    logits = models.apply_path(
        config, shell, pool, path, ids, junction=junction, positions=positions, uniform=uniform
    )
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # the harness takes argmax of these
    greedy = jnp.all(argmax_equals(logp, labels) | ~valid, axis=-1)
    return summed_logprob(logits, labels, valid), greedy


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "uniform"))
def _generate_batch(config, shell, pool, path, junction, ids, mask, max_new_tokens, uniform=False):
    """ids, mask int32 [B, W] (left-padded) -> greedy tokens int32 [B, max_new_tokens]."""
    return models.greedy_decode(
        config, shell, pool, path, ids, mask, max_new_tokens, junction=junction, uniform=uniform
    )


def _batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Indices of the requests, longest first, cut into batches of at most `batch_size`."""
    order = np.argsort(-np.asarray(lengths, np.int64), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _check_batch_size(batch_size: int, model: PathModel) -> None:
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if int(batch_size) % _data_size(model):
        raise ValueError(
            f"batch_size={batch_size} is not a multiple of the mesh's data axis ({_data_size(model)}): "
            "each batch's rows are split over it"
        )


def loglikelihoods(
    model: PathModel,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int,
    max_length: int,
    pad_id: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed continuation log-probabilities and greedy flags (module docstring).

    Args:
      model: the model; requests: (context ids, continuation ids) per request, both non-empty;
      batch_size: rows per forward pass; max_length: the context length L (rows are left-truncated to it);
      pad_id: id of padding positions (never attended to by a real position: causal, right padding).
    Returns: (ll float64 [N], greedy bool [N]) in request order.
    """
    _check_batch_size(batch_size, model)
    rows, conts = [], []
    for i, (context, continuation) in enumerate(requests):
        if len(context) == 0 or len(continuation) == 0:
            raise ValueError(
                f"loglikelihood request {i}: context and continuation need at least one token each"
            )
        if len(continuation) > max_length:
            raise ValueError(
                f"loglikelihood request {i}: continuation of {len(continuation)} tokens is longer "
                f"than the context length {max_length}"
            )
        rows.append((list(context) + list(continuation))[-(max_length + 1) :][:-1])
        conts.append(list(continuation))
    ll = np.zeros(len(rows), np.float64)
    greedy = np.zeros(len(rows), bool)
    path = jnp.asarray(model.path, jnp.int32) if model.mesh is None else model.path
    for idx in _batches([len(r) for r in rows], batch_size):
        width = bucket(max(len(rows[i]) for i in idx), max_length)
        num_targets = bucket(max(len(conts[i]) for i in idx), max_length)
        ids = np.full((batch_size, width), pad_id, np.int32)
        positions = np.zeros((batch_size, num_targets), np.int32)
        labels = np.zeros((batch_size, num_targets), np.int32)
        valid = np.zeros((batch_size, num_targets), bool)
        for b, i in enumerate(idx):
            row, cont = rows[i], conts[i]
            ids[b, : len(row)] = row
            positions[b, : len(cont)] = np.arange(len(row) - len(cont), len(row))
            labels[b, : len(cont)] = cont
            valid[b, : len(cont)] = True
        total, flags = _score_batch(
            model.config,
            model.shell,
            model.pool,
            path,
            model.junction,
            *_rows(model, ids, positions, labels, valid),
            uniform=_uniform(model),
        )
        ll[idx] = np.asarray(total, np.float64)[: len(idx)]
        greedy[idx] = np.asarray(flags)[: len(idx)]
    return ll, greedy


def generate(
    model: PathModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
    max_length: int,
    pad_id: int = 0,
) -> np.ndarray:
    """Greedy tokens of every prompt (module docstring).

    Args:
      prompts: token ids per prompt, each non-empty and at most ``max_length - max_new_tokens`` long (the
        harness left-truncates contexts to that); max_new_tokens: tokens per prompt; batch_size: rows per
        decode call; max_length: the context length (prompt + new tokens never pass it); pad_id: id of left
        padding (masked out).
    Returns: int32 [N, max_new_tokens] in prompt order.
    """
    _check_batch_size(batch_size, model)
    if max_new_tokens < 1 or max_new_tokens >= max_length:
        raise ValueError(
            f"max_new_tokens must lie in [1, {max_length}) (the context length), got {max_new_tokens}"
        )
    room = max_length - max_new_tokens
    for i, p in enumerate(prompts):
        if not 0 < len(p) <= room:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens; need 1 to {room} (context length {max_length} "
                f"minus {max_new_tokens} new tokens)"
            )
    out = np.zeros((len(prompts), max_new_tokens), np.int32)
    path = jnp.asarray(model.path, jnp.int32) if model.mesh is None else model.path
    for idx in _batches([len(p) for p in prompts], batch_size):
        width = bucket(max(len(prompts[i]) for i in idx), room)
        new = max(
            max_new_tokens, bucket(max_new_tokens, max_length - width)
        )  # greedy: more tokens, same prefix
        packed = pack_prompts([prompts[i] for i in idx], pad_id, batch_size, width)
        tokens = _generate_batch(
            model.config,
            model.shell,
            model.pool,
            path,
            model.junction,
            *_rows(model, packed["prompt_ids"], packed["prompt_mask"]),
            new,
            uniform=_uniform(model),
        )
        out[idx] = np.asarray(tokens)[: len(idx), :max_new_tokens]
    return out
