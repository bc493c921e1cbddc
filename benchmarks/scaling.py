"""Path evaluations per second on 1, 2, 4 and 8 simulated CPU devices (mesh paths:N), one JSON object.

Each device count runs in its own subprocess (XLA_FLAGS=--xla_force_host_platform_device_count=N must precede
the jax import) over experiments/distributed_demo.py (the path engine, strategy "shard"): a pool of 3 tiny
Llama models x 2 blocks, random paths of up to 4 blocks, teacher-forced scoring of an 8 x 12 token batch. This machine has 2 cores, so the simulated devices
share them: the ratios measure the sharding overhead (per-device dispatch, collectives), not a speedup.

  .venv/bin/python benchmarks/scaling.py [--num_paths=16] [--repeats=5] [--devices=1,2,4,8]
  .venv/bin/python benchmarks/scaling.py --devices=1 --num_paths=2 --repeats=1   # one subprocess (tests)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(num_devices: int, num_paths: int, repeats: int, timeout: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [
            sys.executable,
            "-m",
            "experiments.distributed_demo",
            f"--mesh=paths:{num_devices}",
            f"--num_paths={num_paths}",
            f"--repeats={repeats}",
            f"--out_json={out}",
        ]
        subprocess.run(cmd, env=env, cwd=REPO, check=True, timeout=timeout, capture_output=True)
        with open(out) as f:
            return json.load(f)


def main(argv=None) -> dict:
    """Parses `argv` (default sys.argv), runs, prints one JSON object and returns it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_paths", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--devices", default="1,2,4,8")
    parser.add_argument("--timeout", type=int, default=600)
    args = parser.parse_args(argv)
    rows = {}
    for n in (int(d) for d in args.devices.split(",")):
        r = measure(n, args.num_paths, args.repeats, args.timeout)
        rows[n] = {
            "paths_per_second": round(r["paths_per_second"], 2),
            "seconds_per_batch": round(r["seconds_per_batch"], 4),
            "first_call_seconds": round(r["first_call_seconds"], 2),
        }
    base = rows[min(rows)]["paths_per_second"]
    out = {
        "benchmark": "scaling",
        "engine": "paths.make_engine strategy shard (experiments.distributed_demo, toy llama)",
        "cpu_cores": os.cpu_count(),
        "num_paths": args.num_paths,
        "repeats": args.repeats,
        "by_devices": rows,
        # < 1 means the simulated devices cost more than they give (they share the same cores).
        "throughput_ratio_vs_1_device": {n: round(r["paths_per_second"] / base, 3) for n, r in rows.items()},
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
