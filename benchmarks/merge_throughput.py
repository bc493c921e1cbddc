r"""Streaming-merge throughput on a synthetic Llama-shaped pool; prints one JSON object.

  python -m benchmarks.merge_throughput [--size_gb=1.0] [--num_models=2] \
      [--mergekit_python=/tmp/mk/bin/python]
  python -m benchmarks.merge_throughput --smoke    # kilobyte checkpoints in seconds, for the tests

A base and `--num_models` fine-tuned checkpoints of about `--size_gb` GB each (bfloat16, Llama tensor names and
config, so mergekit accepts them) are written to a temporary directory, merged with `ties` (density 0.5) and
`dare_ties` (drop rate 0.5) by `hm3_jax.merging.streaming.merge_checkpoints`, and deleted afterwards.

GB/s = bytes of all input tensors read (base + every model; 1 GB = 1e9 bytes) / wall-clock seconds of the whole
merge, including reading, arithmetic, writing the output and compiling. `memcpy_gbps` is `np.copyto` of a
512 MiB array (best of 3), counted as bytes copied per second: the physical limit of a streaming merge that
reads each input byte once. `peak_rss_mb` is this process's peak RSS during the merges only (Linux: the
high-water mark is reset through /proc/self/clear_refs after the synthetic pool is written; elsewhere the
process's lifetime peak). With `--mergekit_python`, mergekit's own CLI (`mergekit-yaml`, CPU) merges the same files with `ties`
(same density) and `mergekit_ties_gbps` is reported on the same definition; mergekit runs in its own venv and
is never imported here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import tempfile
import time
from typing import NamedTuple

import jax
import ml_dtypes
import numpy as np

from hm3_jax.merging.safetensors_stream import ShardWriter
from hm3_jax.merging.streaming import merge_checkpoints


class Dims(NamedTuple):
    """Llama shapes of the synthetic checkpoints."""

    hidden: int
    intermediate: int
    vocab: int
    heads: int


LLAMA_1B = Dims(hidden=2048, intermediate=5632, vocab=32000, heads=16)  # TinyLlama-1.1B's shapes
SMOKE = Dims(hidden=64, intermediate=176, vocab=256, heads=4)  # --smoke: kilobytes, for the tests


def _layer_shapes(layer: int, dims: Dims) -> dict[str, tuple[int, ...]]:
    p, d, f = f"model.layers.{layer}.", dims.hidden, dims.intermediate
    return {
        p + "self_attn.q_proj.weight": (d, d),
        p + "self_attn.k_proj.weight": (d, d),
        p + "self_attn.v_proj.weight": (d, d),
        p + "self_attn.o_proj.weight": (d, d),
        p + "mlp.gate_proj.weight": (f, d),
        p + "mlp.up_proj.weight": (f, d),
        p + "mlp.down_proj.weight": (d, f),
        p + "input_layernorm.weight": (d,),
        p + "post_attention_layernorm.weight": (d,),
    }


def _shapes(size_gb: float, dims: Dims) -> tuple[dict[str, tuple[int, ...]], int]:
    shell = {
        "model.embed_tokens.weight": (dims.vocab, dims.hidden),
        "lm_head.weight": (dims.vocab, dims.hidden),
        "model.norm.weight": (dims.hidden,),
    }
    per_layer = sum(int(np.prod(s)) for s in _layer_shapes(0, dims).values()) * 2
    shell_bytes = sum(int(np.prod(s)) for s in shell.values()) * 2
    num_layers = max(1, int(np.ceil((size_gb * 1e9 - shell_bytes) / per_layer)))
    shapes = dict(shell)
    for layer in range(num_layers):
        shapes.update(_layer_shapes(layer, dims))
    return shapes, num_layers


def _write_checkpoint(path: str, shapes, num_layers: int, base: str | None, seed: int, dims: Dims) -> None:
    """One checkpoint, tensor by tensor: base ~ N(0, 0.02); a model = base + N(0, 0.002)."""
    os.makedirs(path)
    names = sorted(shapes)
    writer = ShardWriter(
        os.path.join(path, "model.safetensors"), [(n, ml_dtypes.bfloat16, shapes[n]) for n in names]
    )
    rng = np.random.default_rng(seed)
    base_file = None
    if base is not None:
        from safetensors import safe_open

        base_file = safe_open(os.path.join(base, "model.safetensors"), framework="numpy")
    for name in names:
        if base_file is None:
            value = rng.standard_normal(shapes[name], dtype=np.float32) * 0.02
        else:
            value = base_file.get_tensor(name).astype(np.float32)
            value += rng.standard_normal(shapes[name], dtype=np.float32) * 0.002
        writer.write(name, value.astype(ml_dtypes.bfloat16))
    writer.close()
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dims.hidden,
        "intermediate_size": dims.intermediate,
        "num_hidden_layers": num_layers,
        "num_attention_heads": dims.heads,
        "num_key_value_heads": dims.heads,
        "vocab_size": dims.vocab,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def _memcpy_gbps(mib: int = 512) -> float:
    src = np.ones(mib * 2**20, np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return src.nbytes / best / 1e9


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _input_bytes(dirs) -> int:
    return sum(os.path.getsize(os.path.join(d, "model.safetensors")) for d in dirs)


def _mergekit_ties(python: str, base: str, models, out: str) -> float:
    config = {
        "merge_method": "ties",
        "base_model": base,
        "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in models],
        "dtype": "bfloat16",
    }
    path = out + ".yml"
    with open(path, "w") as f:
        json.dump(config, f)  # JSON is YAML
    cli = os.path.join(os.path.dirname(python), "mergekit-yaml")
    start = time.perf_counter()
    subprocess.run([cli, path, out, "--no-copy-tokenizer", "--quiet", "--no-write-model-card"], check=True)
    return time.perf_counter() - start


def run(size_gb: float = 1.0, num_models: int = 2, mergekit_python: str | None = None, workdir: str | None = None,
        seed: int = 0, dims: Dims = LLAMA_1B, memcpy_mib: int = 512) -> dict:  # fmt: skip
    """Writes the synthetic pool, merges it (module docstring), deletes it; returns the JSON-ready dict."""
    workdir = tempfile.mkdtemp(prefix="merge_bench_", dir=workdir)
    try:
        shapes, num_layers = _shapes(size_gb, dims)
        base = os.path.join(workdir, "base")
        _write_checkpoint(base, shapes, num_layers, None, seed, dims)
        models = []
        for i in range(num_models):
            models.append(os.path.join(workdir, f"model{i}"))
            _write_checkpoint(models[-1], shapes, num_layers, base, seed + 1 + i, dims)
        read_bytes = _input_bytes([base, *models])
        result = {"input_gb": read_bytes / 1e9, "num_models": num_models, "num_layers": num_layers,
                  "dims": dims._asdict()}  # fmt: skip
        key = jax.random.key(seed)
        _reset_peak_rss()
        for method, hparams in (("ties", {"density": 0.5}), ("dare_ties", {"drop_rate": 0.5})):
            out = os.path.join(workdir, f"out_{method}")
            start = time.perf_counter()
            merge_checkpoints(method, base, models, out, key=key, progress=False, **hparams)
            seconds = time.perf_counter() - start
            result[f"{method}_seconds"] = seconds
            result[f"{method}_gbps"] = read_bytes / seconds / 1e9
            shutil.rmtree(out)
        result["peak_rss_mb"] = _peak_rss_mb()
        if mergekit_python:
            out = os.path.join(workdir, "out_mergekit")
            seconds = _mergekit_ties(mergekit_python, base, models, out)
            result["mergekit_ties_seconds"] = seconds
            result["mergekit_ties_gbps"] = read_bytes / seconds / 1e9
            result["ties_speedup_vs_mergekit"] = result["ties_gbps"] / result["mergekit_ties_gbps"]
            shutil.rmtree(out)
        result["memcpy_gbps"] = _memcpy_gbps(memcpy_mib)
        result["ties_fraction_of_memcpy"] = result["ties_gbps"] / result["memcpy_gbps"]
        result["dare_ties_fraction_of_memcpy"] = result["dare_ties_gbps"] / result["memcpy_gbps"]
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv=None) -> dict:
    """Parses `argv` (default sys.argv), runs, prints one JSON object and returns it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size_gb", type=float, default=1.0, help="size of each checkpoint in GB (>=, about)"
    )
    parser.add_argument("--num_models", type=int, default=2, help="fine-tuned models (besides the base)")
    parser.add_argument("--mergekit_python", default=None, help="python of a venv with mergekit installed")
    parser.add_argument("--workdir", default=None, help="where to write the synthetic pool (default: temp)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights and of DARE")
    parser.add_argument("--smoke", action="store_true", help="tests: tiny shapes, one layer, 8 MiB memcpy")
    args = parser.parse_args(argv)
    kwargs = dict(dims=SMOKE, size_gb=0.0, memcpy_mib=8) if args.smoke else dict(size_gb=args.size_gb)
    result = run(num_models=args.num_models, mergekit_python=args.mergekit_python, workdir=args.workdir,
                 seed=args.seed, **kwargs)  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
