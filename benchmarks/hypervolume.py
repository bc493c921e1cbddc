"""Exact hypervolume: moocore (what `hm3_jax.moo.hypervolume` calls) vs our own exact implementation; one JSON.

    .venv/bin/python benchmarks/hypervolume.py
    .venv/bin/python benchmarks/hypervolume.py --smoke    # a second, for the tests

Workload (tiny8-sized): `--fronts` random fronts of each size in `--sizes` (15, 30, 60 points) in
`--num_objectives` = 8 objectives, normalised scores as a run reports them: points on the concave unit sphere
shell (all mutually non-dominated, the worst case of both algorithms) scaled into [0.3, 1.1], plus a quarter as
many dominated points, against the reference point 0.25 on every axis. Each front is measured with
`hm3_jax.moo.hypervolume` (moocore, C) and `hypervolume_reference` (our WFG, numpy), interleaved on the same
points in one process, best of `--repeats` per front; the two values must agree to 1e-9 relative (checked).

Keys, per size: moocore_seconds and reference_seconds (per front, mean over fronts of the best repeat),
speedup (reference / moocore, the figure to read: a ratio measured within one run) and max_relative_difference.
`bootstrap`: the held-out bootstrap's use (`moo.bootstrap.hypervolume_samples`: one hypervolume per resample and
method), seconds per resample of one 15-point front, for both implementations (the same loop over resamples).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from hm3_jax.moo.hypervolume import hypervolume, hypervolume_reference

REFERENCE = 0.25


def random_front(rng: np.random.Generator, num_points: int, num_objectives: int) -> np.ndarray:
    """[num_points + num_points // 4, num_objectives] points: a concave front in [0.3, 1.1] and dominated ones."""
    shell = np.abs(rng.normal(size=(num_points, num_objectives)))
    shell /= np.linalg.norm(shell, axis=1, keepdims=True)
    front = 0.3 + 0.8 * shell
    dominated = 0.3 + 0.8 * rng.random((num_points // 4, 1)) * shell[: num_points // 4]
    return np.concatenate([front, dominated])


def _best_seconds(fn, points, reference, repeats: int) -> tuple[float, float]:
    best, value = float("inf"), 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn(points, reference)
        best = min(best, time.perf_counter() - start)
    return best, value


def run(num_objectives: int = 8, sizes=(15, 30, 60), fronts: int = 5, repeats: int = 3, seed: int = 0,
        bootstrap_resamples: int = 200) -> dict:  # fmt: skip
    """Measures both implementations on the same fronts (module docstring); returns the JSON-ready dict."""
    rng = np.random.default_rng(seed)
    reference = np.full(num_objectives, REFERENCE)
    out = {"num_objectives": num_objectives, "fronts_per_size": fronts, "repeats": repeats, "sizes": {}}
    for size in sizes:
        fast, slow, rel = [], [], []
        for _ in range(fronts):
            points = random_front(rng, size, num_objectives)
            t_ref, v_ref = _best_seconds(hypervolume_reference, points, reference, repeats)
            t_moo, v_moo = _best_seconds(hypervolume, points, reference, repeats)
            slow.append(t_ref)
            fast.append(t_moo)
            rel.append(abs(v_moo - v_ref) / v_ref)
        if max(rel) > 1e-9:
            raise AssertionError(
                f"moocore and the reference differ by {max(rel):.3g} relative at {size} points"
            )
        out["sizes"][str(size)] = {
            "moocore_seconds": float(np.mean(fast)),
            "reference_seconds": float(np.mean(slow)),
            "speedup": float(np.mean(slow) / np.mean(fast)),
            "max_relative_difference": float(max(rel)),
        }
    resamples = [random_front(rng, 15, num_objectives)[:15] for _ in range(bootstrap_resamples)]
    boot = {}
    for name, fn in (("moocore", hypervolume), ("reference", hypervolume_reference)):
        start = time.perf_counter()
        for points in resamples:
            fn(points, reference)
        boot[f"{name}_seconds_per_resample"] = (time.perf_counter() - start) / bootstrap_resamples
    boot["speedup"] = boot["reference_seconds_per_resample"] / boot["moocore_seconds_per_resample"]
    out["bootstrap"] = {"resamples": bootstrap_resamples, "points": 15, **boot}
    out["load_average"] = os.getloadavg()[0]
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_objectives", type=int, default=8)
    parser.add_argument("--sizes", default="15,30,60", help="front sizes (comma-separated)")
    parser.add_argument("--fronts", type=int, default=5, help="random fronts per size")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per front and implementation")
    parser.add_argument("--bootstrap_resamples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one front, one repeat (tests)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.fronts, args.repeats, args.bootstrap_resamples = "6,10", 1, 1, 5
    sizes = tuple(int(s) for s in args.sizes.split(","))
    result = run(args.num_objectives, sizes, args.fronts, args.repeats, args.seed, args.bootstrap_resamples)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
