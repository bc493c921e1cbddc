"""Per-path scores of a toy Llama block pool on any mesh, in one or several processes.

The toy pool is K+1 random tiny Llama models (``hm3_jax.models.llama``) stacked with ``make_pool``; paths
and the
evaluation batch are drawn from fixed PRNG keys, so every mesh and process count must print the same sums (to
float tolerance). Used by tests/test_distributed.py (8 simulated devices, 2 processes over 127.0.0.1) and by
benchmarks/scaling.py.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
    python -m hm3_jax.distributed.demo --mesh=paths:2,data:2,model:2 --out_json=/tmp/scores.json

Multi-process: add --coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=i to each process.
Process 0 writes --out (atomically); every process gets the same global sums (``to_host``).
"""

from __future__ import annotations

import functools
import json
import time

import numpy as np
from absl import app, flags

from hm3_jax import distributed
from hm3_jax.io import atomic

_OUT = flags.DEFINE_string("out_json", None, "JSON file for the sums and timings (written by process 0).")
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


def toy_config(hidden: int = 32):
    """Tiny Llama config: 4 heads, 2 KV heads (GQA), so a model axis of 2 splits heads evenly."""
    from hm3_jax.models import ModelConfig

    return ModelConfig(
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
    """(config, shell, pool, paths [num_paths, T_MAX], batch dict) from fixed keys (host numpy values)."""
    import jax

    from hm3_jax import models

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


def make_score_sums_fn(config):
    """``lm_score_sums_fn`` over ``hm3_jax.models.apply_path`` for ``config``."""
    from hm3_jax import models

    def apply_path_fn(shell, pool, path, input_ids, attention_mask):
        return models.apply_path(config, shell, pool, path, input_ids, attention_mask=attention_mask)

    return distributed.lm_score_sums_fn(apply_path_fn)


def _atomic_write_json(path: str, obj) -> None:
    atomic.write_text(path, json.dumps(obj, indent=1))


def _bytes_per_device(tree) -> int:
    """Bytes of ``tree`` held by its first addressable device."""
    import jax

    leaves = jax.tree.leaves(tree)
    device = leaves[0].addressable_shards[0].device
    return sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == device)


def run(mesh_spec: str | None, num_paths: int, batch: int, seq: int, hidden: int, repeats: int) -> dict:
    """Scores the toy problem on ``make_mesh(mesh_spec)`` ("one": first device only); sums (lists) and
    timings."""
    import jax

    if mesh_spec == "one":
        mesh = distributed.make_mesh(None, devices=jax.devices()[:1])
    else:
        mesh = distributed.make_mesh(mesh_spec)
    config, shell, pool, paths, data = toy_problem(0, num_paths, batch, seq, hidden)
    fn = distributed.make_sharded_path_scores(make_score_sums_fn(config), mesh)
    args = (
        distributed.replicate(shell, mesh),
        distributed.place_pool(pool, mesh),
        *distributed.shard_paths(paths, mesh)[:1],
        distributed.shard_batch(data, mesh),
    )
    start = time.perf_counter()
    sums = jax.block_until_ready(fn(*args))
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    seconds = time.perf_counter() - start
    host = jax.tree.map(lambda x: x[:num_paths].tolist(), distributed.to_host(sums))
    result = {
        "mesh": dict(mesh.shape),
        "num_devices": jax.device_count(),
        "num_processes": jax.process_count(),
        "num_paths": num_paths,
        "sums": host,
        "first_call_seconds": compile_seconds,
        "pool_bytes_per_device": _bytes_per_device(args[1]),
        "pool_bytes": int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(pool))),
    }
    if repeats:
        result["paths_per_second"] = num_paths * repeats / seconds
        result["seconds_per_batch"] = seconds / repeats
    return result


def main(argv):
    del argv
    flags_ = flags.FLAGS
    distributed.initialize_from_flags()
    distributed.quiet_non_main_processes()
    sizes = (_NUM_PATHS.value, _BATCH.value, _SEQ.value, _HIDDEN.value, _REPEATS.value)
    if _MESHES.value:
        specs = ",".join(_MESHES.value).split(";")
        result = [run(spec, *sizes) for spec in specs]
    else:
        result = run(flags_.mesh, *sizes)
    write = distributed.main_process_only(functools.partial(_atomic_write_json, _OUT.value))
    if _OUT.value:
        write(result)
    else:
        distributed.main_process_only(print)(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
