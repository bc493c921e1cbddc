"""Host numpy linear algebra on one BLAS thread (`hm3_jax.host_blas`) vs OpenBLAS's default; prints one JSON.

    .venv/bin/python benchmarks/host_blas.py                 # idle, then with 2 busy processes beside it
    .venv/bin/python benchmarks/host_blas.py --smoke         # a few seconds, for the tests

Two workloads, each timed with `host_blas.ENABLED` off (OpenBLAS's default: one thread per core) and on (one
thread), interleaved in this process, best of `--repeats`:
- `svd`: `--svds` thin SVDs of a 64 x 256 float32 matrix (a tiny8 MLP kernel's task matrix) in numpy;
- `tsv_merge`: `merging.merge("tsv", ...)` of 8 random models with 4 stacked blocks of width 64 (tiny8's
  shapes: every per-block SVD runs on the host through a callback from XLA's thread pool).
Each is measured on the machine as it is (`idle`) and with `--busy` processes spinning on the CPU beside it
(`busy`: another job sharing the cores, as on this project's build machine or a shared GPU host). The figure to
read is `speedup` = default / single-threaded seconds, a ratio within one run; values are identical either way
(tests/test_host_blas.py).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time

import jax
import numpy as np

from hm3_jax import host_blas, merging


def _spin(stop) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10000))


def _svds(x: np.ndarray, count: int) -> None:
    for _ in range(count):
        np.linalg.svd(x, full_matrices=False)


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _measure(workloads: dict, repeats: int) -> dict:
    out = {}
    for name, fn in workloads.items():
        seconds = {}
        for enabled in (False, True, False, True):  # interleaved: a load change hits both
            host_blas.ENABLED = enabled
            key = "single_thread_seconds" if enabled else "default_seconds"
            seconds[key] = min(seconds.get(key, float("inf")), _best(fn, repeats))
        host_blas.ENABLED = True
        seconds["speedup"] = seconds["default_seconds"] / seconds["single_thread_seconds"]
        out[name] = {k: float(f"{v:.4g}") for k, v in seconds.items()}
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--svds", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy", type=int, default=2, help="spinning processes beside the busy measurement")
    parser.add_argument(
        "--smoke", action="store_true", help="a few seconds: 8 SVDs, 2 models, 1 repeat, 1 busy"
    )
    args = parser.parse_args(argv)
    svds, repeats, busy, num_models, (m, n) = args.svds, args.repeats, args.busy, 8, (64, 256)
    if args.smoke:
        svds, repeats, busy, num_models, (m, n) = 2, 1, 0, 2, (8, 16)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, n)).astype(np.float32)
    shapes = {"kernel": (4, m, n), "bias": (4, n)}
    base = {"blocks": {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}}
    models = [jax.tree.map(lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(np.float32), base)]
    models += [
        jax.tree.map(lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(np.float32), base)
        for _ in range(num_models - 1)
    ]
    weights = np.full(num_models, 1.0 / num_models)

    def tsv():
        jax.block_until_ready(merging.merge("tsv", base, models, weights=weights))

    tsv()  # compiled once, outside the timings
    workloads = {"svd": lambda: host_blas.single_threaded(_svds)(x, svds), "tsv_merge": tsv}
    result = {"idle": _measure(workloads, repeats), "busy_processes": busy}
    if busy:
        stop = multiprocessing.Event()
        spinners = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True) for _ in range(busy)]
        for p in spinners:
            p.start()
        try:
            result["busy"] = _measure(workloads, repeats)
        finally:
            stop.set()
            for p in spinners:
                p.join(timeout=10)
    result["load_average"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
