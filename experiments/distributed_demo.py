"""Scores of a toy Llama block pool's paths by the path engine on any mesh, in one or several processes.

The toy pool is K+1 random tiny Llama models (``hm3_jax.models.llama``) stacked with ``make_pool``; paths and
the evaluation batch are drawn from fixed PRNG keys, and the path engine (``hm3_jax.paths.make_engine``,
strategy "shard": paths over "paths", examples over "data", the pool's matrices over "model") scores them
with three teacher-forced objectives, so every mesh and process count must print the same scores (to float
tolerance). Used by tests/test_distributed.py (8 simulated devices, 2 processes over 127.0.0.1) and by
benchmarks/scaling.py.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
    python -m experiments.distributed_demo --mesh=paths:2,data:2,model:2 --out_json=/tmp/scores.json

Multi-process: add --coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=i to each process.
Process 0 writes --out_json (atomically); every process gets the same global scores (the engine's contract).
"""

from __future__ import annotations

import functools
import json
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from hm3_jax import distributed, models
from hm3_jax.io import atomic
from hm3_jax.paths import make_engine
from hm3_jax.paths.engine import place_model

_OUT = flags.DEFINE_string("out_json", None, "JSON file for the scores and timings (written by process 0).")
_NUM_PATHS = flags.DEFINE_integer("num_paths", 6, "Number of random paths to score.")
_REPEATS = flags.DEFINE_integer("repeats", 0, "Timed evaluations of the whole batch after the compiling one.")
_BATCH = flags.DEFINE_integer("batch", 8, "Evaluation examples (divisible by the data axis).")
_SEQ = flags.DEFINE_integer("seq", 12, "Tokens per example.")
_HIDDEN = flags.DEFINE_integer("hidden", 32, "Toy model hidden size.")
_MESHES = flags.DEFINE_list(
    "meshes",
    None,
    "Several mesh specs separated by ';' inside one value (e.g. 'one;paths:8;paths:4,data:2'); 'one' = the "
    "first device alone. Overrides --mesh; the output is then a list of results.",
)
distributed.define_flags()

NUM_SOURCES = 3  # K = 2 experts + the merged model
NUM_LAYERS = 2
T_MAX = 4
SCORES = ("likelihood", "token_accuracy", "exact_match")


class Objective(NamedTuple):
    """The engine's objective contract (DESIGN.md, Objective)."""

    name: str
    metric: str
    device_fn: object
    host_fn: object


def toy_config(hidden: int = 32) -> models.ModelConfig:
    """Tiny Llama config: 4 heads, 2 KV heads (GQA), so a model axis of 2 splits heads evenly."""
    return models.ModelConfig(
        family="llama",
        vocab_size=16,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_layers=NUM_LAYERS,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,  # large enough that different paths give clearly different scores
    )


def toy_problem(seed: int = 0, num_paths: int = 6, batch: int = 8, seq: int = 12, hidden: int = 32):
    """(config, shell, pool, paths [num_paths, T_MAX], batch dict) from fixed keys (host numpy values).

    The batch is {"input_ids", "attention_mask", "loss_mask"} [batch, seq]: right-padded examples (so a causal
    model's logits at the real positions do not depend on the padding) whose tokens from seq // 3 on are
    targets."""
    config = toy_config(hidden)
    key_models, key_paths, key_ids, key_len = jax.random.split(jax.random.key(seed), 4)
    params = [models.init(config, k) for k in jax.random.split(key_models, NUM_SOURCES)]
    shell = jax.tree.map(np.asarray, models.shell_of(params[-1]))
    pool = jax.tree.map(np.asarray, models.make_pool([p["blocks"] for p in params]))
    num_blocks = NUM_SOURCES * NUM_LAYERS
    paths = np.asarray(jax.random.randint(key_paths, (num_paths, T_MAX), -1, num_blocks), np.int32)
    ids = np.asarray(jax.random.randint(key_ids, (batch, seq), 0, config.vocab_size), np.int32)
    lengths = np.asarray(jax.random.randint(key_len, (batch,), seq // 2, seq + 1))
    attention_mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
    loss_mask = attention_mask * (np.arange(seq)[None, :] >= seq // 3)
    data = {"input_ids": ids, "attention_mask": attention_mask, "loss_mask": loss_mask.astype(np.int32)}
    return config, shell, pool, paths, data


def scores_from_logits(logits, data: dict) -> dict[str, float]:
    """The demo's scores in [0, 100] from one path's next-token logits [B, S-1, V] on the batch `data`.

    likelihood = 100 exp(mean target log p), token_accuracy = 100 (argmax hits) / (targets), exact_match =
    100 (examples whose every target is the argmax) / (examples with a target); over the targets
    ``loss_mask[:, 1:]`` (position s is predicted from positions < s). Computed on the host in float64."""
    logits = np.asarray(logits, np.float64)
    targets = np.asarray(data["input_ids"])[:, 1:]
    mask = np.asarray(data["loss_mask"])[:, 1:].astype(bool)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    target_logp = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    hit = logits.argmax(-1) == targets
    scored = mask.any(-1)
    all_hit = np.all(hit | ~mask, axis=-1) & scored
    return {
        "likelihood": 100.0 * float(np.exp(target_logp[mask].sum() / mask.sum())),
        "token_accuracy": 100.0 * float(hit[mask].sum() / mask.sum()),
        "exact_match": 100.0 * float(all_hit.sum() / scored.sum()),
    }


def make_objectives(data: dict) -> list[Objective]:
    """One teacher-forced objective per name in ``SCORES`` over the batch ``data``: the device returns the
    path's logits [B, S-1, V] (the vocabulary split over "model" on a tensor-parallel mesh), the host scores
    them (`scores_from_logits`)."""
    ids = np.asarray(data["input_ids"], np.int32)

    def device_fn(forward):
        return forward(jnp.asarray(ids))[:, :-1].astype(jnp.float32)

    def host_fn(name, logits):
        return scores_from_logits(logits, data)[name]

    return [Objective(n, n, device_fn, functools.partial(host_fn, n)) for n in SCORES]


def bytes_per_device(tree) -> int:
    """Bytes of ``tree`` held by its first addressable device."""
    leaves = jax.tree.leaves(tree)
    device = leaves[0].addressable_shards[0].device
    return sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == device)


def run(mesh_spec: str | None, num_paths: int, batch: int, seq: int, hidden: int, repeats: int) -> dict:
    """Scores the toy problem on ``make_mesh(mesh_spec)`` ("one": first device only); scores (lists) and
    timings."""
    if mesh_spec == "one":
        mesh = distributed.make_mesh(None, devices=jax.devices()[:1])
    else:
        mesh = distributed.make_mesh(mesh_spec)
    config, shell, pool, paths, data = toy_problem(0, num_paths, batch, seq, hidden)
    shell, pool = place_model(shell, pool, mesh)  # the engine reuses these placed arrays
    engine = make_engine(config, shell, pool, make_objectives(data), "shard", mesh=mesh, pool_id="toy")
    start = time.perf_counter()
    scores = engine.evaluate(paths).scores  # [num_paths, len(SCORES)], the same on every process
    first_call_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        engine.evaluate(paths, use_cache=False)
    seconds = time.perf_counter() - start
    result = {
        "mesh": dict(mesh.shape),
        "num_devices": jax.device_count(),
        "num_processes": jax.process_count(),
        "num_paths": num_paths,
        "scores": {name: scores[:, k].tolist() for k, name in enumerate(SCORES)},
        "first_call_seconds": first_call_seconds,
        "pool_bytes_per_device": bytes_per_device(pool),
        "pool_bytes": int(sum(x.nbytes for x in jax.tree.leaves(pool))),
    }
    if repeats:
        result["paths_per_second"] = num_paths * repeats / seconds
        result["seconds_per_batch"] = seconds / repeats
    return result


def write_json(path: str, obj) -> None:
    atomic.write_text(path, json.dumps(obj, indent=1))


def main(argv):
    del argv
    distributed.initialize_from_flags()
    distributed.quiet_non_main_processes()
    sizes = (_NUM_PATHS.value, _BATCH.value, _SEQ.value, _HIDDEN.value, _REPEATS.value)
    if _MESHES.value:
        specs = ",".join(_MESHES.value).split(";")
        result = [run(spec, *sizes) for spec in specs]
    else:
        result = run(flags.FLAGS.mesh, *sizes)
    if _OUT.value:
        distributed.main_process_only(functools.partial(write_json, _OUT.value))(result)
    else:
        distributed.main_process_only(print)(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
