r"""Peak host memory of an HM3 run against its sources' size, as the number of preferences grows (issue 16).

  python -m benchmarks.memory [--shape=qwen25_0p5b] [--prefs=2,8] [--resident=1] [--out=FILE]
  python -m benchmarks.memory --smoke          # tiny shapes, two short runs, for the tests
  python -m benchmarks.memory --shape=medium --prefs=2 --resident=1 --pool_copy_max_bytes=0   # parted pools

A spec of random-weight models is written to a temporary directory: a Qwen2-family base of the chosen shapes
(`qwen25_0p5b`: Qwen2.5-0.5B's 24 blocks, hidden 896, MLP 4864, 14 heads / 2 KV heads, q/k/v biases, tied
embeddings, vocabulary 151936; made with
`hm3_jax.models.init`, no download) and three "experts" (base plus a small random task vector each), saved in
bfloat16 as Hugging Face checkpoints, with a small trained tokenizer and three short tasks (exact match, chrF,
multiple choice). For each number of preferences N in `--prefs` and each value R in `--resident`
(`memory.resident_preferences`: 0 = every preference's merged model held, 1 = one at a time), HM3 runs in a child
process (`run_hm3` on `checkpoints.py:SPEC,smoke` cut to the stages whose memory depends on N: the parameter level
with the paper's merge, one PPO iteration, the held-out scores; no baselines, bootstrap, exports or ablations) and
its peak resident set size is read from the kernel when it exits (`os.wait4`: ru_maxrss of that child alone).

Printed (one JSON object; also written to `--out`): per run N, R, peak RSS, peak RSS / the sources' checkpoint
bytes (base + experts, as read from disk), wall seconds; and per R the growth of the peak from the smallest to
the largest N. Targets (issue 16): peak <= 1.5x the sources' bytes, and flat in N with R = 1.

The child's peak includes jax, XLA and the compiled programs (~1 GB on CPU whatever the model), so small shapes
measure that floor, not the models: the ratio is meaningful at the real shapes only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

SHAPES = {
    # name: (num_layers, hidden, intermediate, heads, kv_heads, vocab)
    "qwen25_0p5b": (24, 896, 4864, 14, 2, 151936),
    "medium": (12, 512, 1408, 8, 2, 32000),  # ~54M parameters: runs here in minutes, models visible in RSS
    "small": (8, 256, 704, 4, 2, 32000),
    "smoke": (2, 32, 64, 2, 1, 512),
}
EXPERTS = ("math", "words", "choice")

_CHILD = r"""
import json, sys, time
import jax
from experiments.configs import checkpoints
from hm3_jax.pipeline import run as run_lib
from hm3_jax.search import problem

spec, workdir, num_prefs, resident = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if sys.argv[5] != "default":  # pools parted above this many bytes of the experts' blocks
    problem.SCORE_POOL_COPY_MAX_BYTES = int(sys.argv[5])
config = checkpoints.get_config(spec + ",smoke")
config.preferences.num = num_prefs
config.memory.resident_preferences = resident
config.param_level.cmaes.enabled = False  # the paper's merge per preference
config.param_level.scale_grid = ()
config.baselines.param_methods = ()
config.baselines.path_methods = ()
config.ablations = ()
config.report.bootstrap_samples = 0
config.export = False
config.arch.rl.num_iterations = 1
config.arch.rl.num_envs = 2
config.arch.rl.num_minibatches = 1
config.arch.rl.warm_start_steps = 2
config.arch.neighbourhood_evaluations = 0
config.arch.confirm_top = 0
t0 = time.perf_counter()
report = run_lib.run_hm3(config, workdir)
print(json.dumps({"hm3_points": report["methods"]["hm3"]["points"], "seconds": time.perf_counter() - t0}))
"""


def write_spec(directory: str, shape: str, seed: int = 0) -> tuple[str, int]:
    """A base, three experts (bf16 HF checkpoints), a tokenizer, three tasks and `spec.yaml` in `directory`.
    Returns (spec path, the sources' checkpoint bytes on disk)."""
    import jax
    import jax.numpy as jnp

    import hm3_jax
    from hm3_jax import models
    from hm3_jax.tasks.tokenizer import train_tokenizer

    layers, hidden, inter, heads, kv, vocab = SHAPES[shape]
    os.makedirs(os.path.join(directory, "data"), exist_ok=True)
    rows = [{"prompt": f"Q: {a}+{b}= A:", "target": f" {a + b}"} for a in range(4) for b in range(4)]
    words = [
        {"prompt": f"say {w}:", "target": f" {w}"} for w in ("one", "two", "three", "four", "five", "six")
    ]
    tok = train_tokenizer([r["prompt"] + r["target"] for r in rows + words] * 4, vocab_size=min(300, vocab))
    config = models.ModelConfig(family="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                num_layers=layers, num_heads=heads, num_kv_heads=kv, max_position_embeddings=128,
                                attention_bias=True, rope_theta=1e6, tie_word_embeddings=True)  # Qwen2-style  # fmt: skip
    base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), models.init(config, jax.random.PRNGKey(seed)))
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    total = 0
    for k, name in enumerate(("base",) + EXPERTS):
        params = base
        if name != "base":  # base + a small random task vector, leaf by leaf (no float32 copy of the model)
            keys = jax.random.split(jax.random.PRNGKey(seed + 1 + k), len(jax.tree.leaves(base)))
            params = jax.tree.unflatten(jax.tree.structure(base), [
                (x + 0.01 * jax.random.normal(kk, x.shape, jnp.bfloat16)).astype(jnp.bfloat16)
                for x, kk in zip(jax.tree.leaves(base), keys, strict=True)
            ])  # fmt: skip
        out = os.path.join(directory, name)
        hm3_jax.save_pretrained(hm3_jax.Model(config, params, ids), out)
        tok.save_pretrained(out)
        total += sum(
            os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors")
        )
        del params
    with open(os.path.join(directory, "data", "sums.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[:8])
    with open(os.path.join(directory, "data", "words.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in words)
    with open(os.path.join(directory, "data", "choice.jsonl"), "w") as f:
        f.writelines(json.dumps({"prompt": f"Bigger of {a} and {b}:", "choices": [f" {a}", f" {b}"],
                                 "answer": int(b > a)}) + "\n" for a, b in ((1, 3), (4, 2), (0, 5), (3, 1),
                                                                          (2, 4), (5, 0)))  # fmt: skip
    spec = os.path.join(directory, "spec.yaml")
    with open(spec, "w") as f:
        f.write(
            "base: base\n"
            f"experts: {{{', '.join(f'{e}: {e}' for e in EXPERTS)}}}\n"
            "dtype: bfloat16\n"
            "eval_batch_size: 8\n"
            "tasks:\n"
            "  sums: {data: data/sums.jsonl, metric: exact_match, objective: math, max_new_tokens: 2}\n"
            "  words: {data: data/words.jsonl, metric: chrf, objective: words, max_new_tokens: 2}\n"
            "  choice: {data: data/choice.jsonl, metric: multiple_choice, objective: choice}\n"
        )
    return spec, total


def run_child(spec: str, workdir: str, num_prefs: int, resident: int, pool_copy_max_bytes=None) -> dict:
    """One HM3 run in a child process; its peak RSS from `os.wait4` (that child only). `pool_copy_max_bytes`:
    `problem.SCORE_POOL_COPY_MAX_BYTES` in the child (None: the library's; 0 forces parted pools)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TQDM_DISABLE="1")
    env["PYTHONPATH"] = (
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.pathsep + env.get("PYTHONPATH", "")
    )
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        limit = "default" if pool_copy_max_bytes is None else str(int(pool_copy_max_bytes))
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, spec, workdir, str(num_prefs), str(resident), limit],
                                stdout=out, stderr=err, env=env)  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"HM3 run (N={num_prefs}, resident={resident}) failed:\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    return {
        "preferences": num_prefs,
        "resident_preferences": resident,
        "pool_copy_max_bytes": limit,
        "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3),  # Linux: KiB
        "wall_seconds": round(time.perf_counter() - start, 1),
        "run_seconds": round(result["seconds"], 1),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="qwen25_0p5b", choices=sorted(SHAPES))
    parser.add_argument("--prefs", default="2,8", help="comma-separated numbers of preferences")
    parser.add_argument("--resident", default="1", help="comma-separated memory.resident_preferences values")
    parser.add_argument("--workdir", default=None, help="where the spec and runs go (default: a temp dir)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument(
        "--pool_copy_max_bytes",
        type=int,
        default=None,
        help="pools are parted (the sources' own blocks, no copy) above this many bytes of the experts' blocks "
        "(search.problem.SCORE_POOL_COPY_MAX_BYTES; default: the library's 256 MiB; 0 = always parted)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, N = 1, 2, resident 1 (tests)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shape, args.prefs, args.resident = "smoke", "1,2", "1"
    prefs = [int(x) for x in args.prefs.split(",")]
    residents = [int(x) for x in args.resident.split(",")]
    root = args.workdir or tempfile.mkdtemp(prefix="hm3_memory_")
    try:
        spec, sources = write_spec(os.path.join(root, "spec"), args.shape)
        runs = []
        for r in residents:
            for n in prefs:
                run = run_child(spec, os.path.join(root, f"run_n{n}_r{r}"), n, r, args.pool_copy_max_bytes)
                run["peak_over_sources"] = round(run["peak_rss_gib"] * 2**30 / sources, 2)
                runs.append(run)
                print(json.dumps(run), file=sys.stderr)
        growth = {}
        for r in residents:
            peaks = {x["preferences"]: x["peak_rss_gib"] for x in runs if x["resident_preferences"] == r}
            growth[str(r)] = round(peaks[max(peaks)] - peaks[min(peaks)], 3)
        out = {"shape": args.shape, "sources_bytes": sources, "sources_gib": round(sources / 2**30, 3), "runs": runs,
               "peak_growth_gib_by_resident": growth}  # fmt: skip
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
