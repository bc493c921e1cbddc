"""How close a plain jitted forward gets to the matmul peak as the model widens; prints one JSON object.

    .venv/bin/python benchmarks/forward_efficiency.py
    .venv/bin/python benchmarks/forward_efficiency.py --smoke   # one tiny width, one round (tests)

A 4-block Llama forward (`models.apply`, full logits) on a [100, 48] batch (tiny3's search batch) at widths
D = 128 (tiny3: F = 336, 4 heads), 256 and 512 (F = 2.69 D, 4 / 4 / 8 heads), against a float32 1024^3
`jnp.dot`, interleaved in one process over 5 rounds. Reported: FLOPs per process CPU second (all threads) of
each, best round, and each forward's fraction of the matmul's. FLOPs: `hm3_jax.models.flops.forward_flops`
(every matmul, attention over the full key length, the head on every position).

Why: `benchmarks/path_eval.py`'s fraction_of_peak is bounded by what XLA:CPU gets out of tiny3's small
shapes (docs/path_eval.md, "Fourth pass"); this shows how that bound moves with the model's width.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp

from hm3_jax import models
from hm3_jax.models import flops as mflops
from hm3_jax.models.config import ModelConfig

WIDTHS = ((128, 336, 4), (256, 688, 4), (512, 1376, 8))  # (D, F, heads)
SMOKE_WIDTHS = ((32, 64, 2),)


def run(rounds: int = 5, batch: int = 100, seq_len: int = 48, widths=WIDTHS, matmul_size: int = 1024) -> dict:
    """Compiles every forward and the matmul, then interleaves `rounds` timed rounds; returns the JSON dict."""
    load = os.getloadavg()[0]
    a = jnp.ones((matmul_size, matmul_size), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    cases = {}
    for d, f, h in widths:
        cfg = ModelConfig(
            family="llama", vocab_size=1024, hidden_size=d, intermediate_size=f, num_layers=4, num_heads=h,
            max_position_embeddings=256,
        )  # fmt: skip
        params = models.init(cfg, jax.random.PRNGKey(0))
        ids = jax.random.randint(jax.random.PRNGKey(1), (batch, seq_len), 0, cfg.vocab_size)
        fwd = jax.jit(lambda p, x, cfg=cfg: models.apply(cfg, p, x))
        fwd(params, ids).block_until_ready()  # compile off the clock
        cases[f"D={d}"] = (fwd, params, ids, batch * mflops.forward_flops(cfg, seq_len))
    rates = {name: 0.0 for name in ("matmul", *cases)}
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(10):
            mm(a).block_until_ready()
        rates["matmul"] = max(rates["matmul"], 10 * 2 * matmul_size**3 / (time.process_time() - start))
        for name, (fwd, params, ids, flops) in cases.items():
            start = time.process_time()
            for _ in range(5):
                fwd(params, ids).block_until_ready()
            rates[name] = max(rates[name], 5 * flops / (time.process_time() - start))
    return {
        "benchmark": "forward_efficiency",
        "batch": [batch, seq_len],
        "matmul_size": matmul_size,
        "gflops_per_cpu_s": {k: round(v / 1e9, 1) for k, v in rates.items()},
        "fraction_of_matmul_per_cpu_s": {k: round(rates[k] / rates["matmul"], 3) for k in cases},
        "load_average_1min": {"start": load, "end": os.getloadavg()[0]},
        "jax": jax.__version__,
    }


def main(argv=None) -> dict:
    """Parses `argv` (default sys.argv), runs, prints one JSON object and returns it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tests: D=32 only, [4, 8] batch, 128^3 matmul")
    args = parser.parse_args(argv)
    if args.smoke:
        out = run(1, batch=4, seq_len=8, widths=SMOKE_WIDTHS, matmul_size=128)
    else:
        out = run(args.rounds)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
