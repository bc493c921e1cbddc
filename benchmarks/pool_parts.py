"""Engine throughput over a stacked pool vs a parted pool of the same blocks (issue 16, docs/scaling.md "Session 12").

    python -m benchmarks.pool_parts [--hidden=256] [--layers=8] [--sources=4] [--paths=32] [--repeats=3]
    python -m benchmarks.pool_parts --smoke        # tiny shapes, one repeat (tests)

A random Llama pool of `--sources` models (`hm3_jax.models.init`), one teacher-forced exact-match objective
(16 prompts of 12 tokens, batch 8); per strategy (plain `map`, plain `vmap`, the prefix tree) the best of
`--repeats` evaluations of `--paths` random paths of `--layers` steps, cache off, compilation excluded, over
`models.make_pool` (a copy) and `models.make_parted_pool` (the sources' own blocks; a `lax.switch` reads a
block). Prints one JSON object: seconds per strategy and kind, and whether the scores are equal (they must be).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from hm3_jax import models
from hm3_jax.paths import make_engine
from hm3_jax.tasks.exact_match import make_exact_match_objective

STRATEGIES = (("map", False), ("vmap", False), ("map", True))  # (strategy, prefix_sharing)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--sources", type=int, default=4)
    parser.add_argument("--paths", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat (tests)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.hidden, args.layers, args.sources, args.paths, args.repeats = 32, 2, 2, 4, 1
    config = models.ModelConfig(
        family="llama", vocab_size=512, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_layers=args.layers, num_heads=4, num_kv_heads=2,
    )  # fmt: skip
    params = [models.init(config, k) for k in jax.random.split(jax.random.key(0), args.sources)]
    blocks = [p["blocks"] for p in params]
    rng = np.random.default_rng(0)
    pairs = [(list(rng.integers(3, 512, 12)), list(rng.integers(3, 512, 4))) for _ in range(16)]
    objectives = [make_exact_match_objective("em", pairs, 0, 8)]
    size = args.sources * args.layers
    batches = [
        np.random.default_rng(r + 1).integers(0, size, (args.paths, args.layers)).astype(np.int32)
        for r in range(args.repeats)
    ]
    out = {"load_average": os.getloadavg()[0], "seconds": {}, "scores_equal": True}
    for strategy, prefix in STRATEGIES:
        name = f"{strategy}_{'tree' if prefix else 'plain'}"
        scores, out["seconds"][name] = {}, {}
        pools = (("stacked", models.make_pool(blocks)), ("parted", models.make_parted_pool(blocks)))
        for kind, pool in pools:
            engine = make_engine(
                config, models.shell_of(params[0]), pool, objectives, strategy=strategy, chunk_size=8,
                prefix_sharing=prefix, pool_id=kind, num_threads=1,
            )  # fmt: skip
            engine.evaluate(batches[0][:8], use_cache=False)  # compile
            times, scores[kind] = [], []
            for paths in batches:
                start = time.perf_counter()
                scores[kind].append(engine.evaluate(paths, use_cache=False).scores)
                times.append(time.perf_counter() - start)
            out["seconds"][name][kind] = round(min(times), 3)
        same = all(np.array_equal(a, b) for a, b in zip(scores["stacked"], scores["parted"], strict=True))
        out["scores_equal"] = out["scores_equal"] and same
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
