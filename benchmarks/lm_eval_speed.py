r"""Requests per second of hm3_jax as an lm-evaluation-harness model (`--model hm3_jax`) against the engines
under it and against lm-eval's own `hf` backend, on one checkpoint and one set of requests; prints one JSON.

  python -m benchmarks.lm_eval_speed [--hf_python=/tmp/hfvenv/bin/python] [--repeats=3]
  python -m benchmarks.lm_eval_speed --smoke    # a 2-layer 32-wide model, 6 requests, no hf side (tests)

  # the hf side's interpreter (torch is no dependency of hm3_jax; 2.13.0 is the CPU wheel of the build machines,
  # an unpinned torch is a multi-GB CUDA build):
  python3 -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install torch==2.13.0 'lm-eval[hf]==0.4.13'

Checkpoint (written to a temporary directory, deleted afterwards): a random Llama, hidden 256, 4 layers, 4 heads,
MLP 688, context 512, with a byte-level BPE of 4096 tokens trained on the Python documentation's prose
(`corpus.documentation_paragraphs`), saved by `hm3_jax.save_pretrained` as a Hugging Face directory (float32).

Requests (seeded, from paragraphs of that prose):
* loglikelihood: 100 documents x 4 choices = 400 requests; the context is a paragraph's first 8-48 words, the
  choices its next 1-6 words and the first 1-6 words of three other paragraphs (a multiple-choice task's);
* generate_until: 64 requests, a paragraph's first 8-48 words, greedy, ``max_gen_toks`` 32, until ``["\n\n"]``
  (this model never writes it, so every row decodes all 32 tokens in every backend: equal work).

Each backend is measured warm (one untimed call first: compilation, first-call costs), best of `--repeats`
rounds, at batch size 16, float32; the three hm3_jax ones in this process in interleaved rounds, then hf:
* adapter: ``lm.loglikelihood(instances)`` / ``lm.generate_until(instances)`` of ``get_model("hm3_jax")``:
  text in, text out (the harness's tokenisation and bookkeeping, decoding and stop strings included);
* token_engine: `hm3_jax.evaluation.token_requests` on the adapter's own token ids (tokenised beforehand), i.e.
  the adapter without its harness layer;
* path_engine: the same rows as HM3 objectives (`make_multiple_choice_objective`, one example per request with
  one choice; `make_generation_objective`, texts decoded and compared), scored on the checkpoint's identity
  path by `make_engine(strategy="map").evaluate(..., use_cache=False)`: how a run scores a model;
* hf (with `--hf_python`): lm-eval's `HFLM` (torch, CPU) on the same directory and the same instances, in that
  interpreter (a subprocess running `HF_SIDE`, which never imports hm3_jax or jax).

Keys: ``seconds`` and ``requests_per_s`` per backend and request kind ("all": both kinds, seconds summed);
``adapter_vs_path_engine`` and ``adapter_vs_token_engine`` = adapter seconds / engine seconds (target: the adapter
within 1.5x of the engine); ``hf_vs_adapter`` = hf seconds / adapter seconds (> 1: the adapter is faster);
``adapter_first_call_seconds`` (compilation included: what a fresh ``lm_eval`` run pays once per bucket shape);
``agreement_vs_hf``: the largest |log-likelihood difference|, the share of equal greedy flags and of equal
generated texts (the same work, answered the same); ``load_average_1min`` at the start, before hf, at the end.
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
from typing import NamedTuple

import jax
import numpy as np
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

import hm3_jax
import hm3_jax.evaluation.lm_eval_model  # noqa: F401  (registers --model hm3_jax)
from hm3_jax import models
from hm3_jax.evaluation import token_requests
from hm3_jax.paths.engine import make_engine
from hm3_jax.tasks.corpus import documentation_paragraphs
from hm3_jax.tasks.generation import make_generation_objective
from hm3_jax.tasks.multiple_choice import make_multiple_choice_objective
from hm3_jax.tasks.spec_zoo import eos_ids_of
from hm3_jax.tasks.tokenizer import train_tokenizer

KINDS = ("loglikelihood", "generate_until")
UNTIL = ["\n\n"]


class Dims(NamedTuple):
    """The checkpoint's Llama shapes and tokenizer size."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    context: int


class Workload(NamedTuple):
    """num_docs x num_choices loglikelihood requests, num_prompts generate_until requests of max_gen_toks."""

    num_docs: int
    num_choices: int
    num_prompts: int
    max_gen_toks: int
    batch_size: int
    max_context_words: int


SMALL = Dims(hidden=256, intermediate=688, layers=4, heads=4, vocab=4096, context=512)
FULL = Workload(
    num_docs=100, num_choices=4, num_prompts=64, max_gen_toks=32, batch_size=16, max_context_words=48
)
SMOKE_DIMS = Dims(hidden=32, intermediate=64, layers=2, heads=2, vocab=300, context=64)
SMOKE = Workload(num_docs=2, num_choices=2, num_prompts=2, max_gen_toks=4, batch_size=4, max_context_words=10)

# Runs in --hf_python's interpreter: argv = job.json (written by `hf_side`), out.json. Same protocol as the hm3
# side: one untimed call per kind, then `repeats` rounds, all seconds and the last answers written back.
HF_SIDE = r"""
import json, sys, time
import lm_eval, torch, transformers
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

with open(sys.argv[1]) as f:
    job = json.load(f)
lm = get_model("hf").create_from_arg_string(
    f"pretrained={job['checkpoint']},dtype=float32", {"batch_size": job["batch_size"], "device": "cpu"})
def instances(kind, args):
    return [Instance(kind, {}, tuple(a), i, ("bench", i, 1)) for i, a in enumerate(args)]
calls = {"loglikelihood": lm.loglikelihood, "generate_until": lm.generate_until}
for kind, call in calls.items():
    call(instances(kind, job[kind][: job["batch_size"]]), disable_tqdm=True)
seconds, answers = {k: [] for k in calls}, {}
for _ in range(job["repeats"]):
    for kind, call in calls.items():
        reqs = instances(kind, job[kind])
        start = time.perf_counter()
        answers[kind] = call(reqs, disable_tqdm=True)
        seconds[kind].append(time.perf_counter() - start)
versions = {"torch": torch.__version__, "transformers": transformers.__version__, "lm_eval": lm_eval.__version__}
with open(sys.argv[2], "w") as f:
    json.dump({"seconds": seconds, "answers": answers, "threads": torch.get_num_threads(), "versions": versions}, f)
"""


def write_checkpoint(directory: str, dims: Dims, paragraphs: list[str], seed: int) -> str:
    """A random Llama of `dims` with a BPE tokenizer trained on `paragraphs`, as a HF directory; returns it."""
    tokenizer = train_tokenizer(paragraphs, dims.vocab)
    config = models.ModelConfig(family="llama", vocab_size=len(tokenizer), hidden_size=dims.hidden,
                                intermediate_size=dims.intermediate, num_layers=dims.layers, num_heads=dims.heads,
                                max_position_embeddings=dims.context, norm_eps=1e-5)  # fmt: skip
    params = models.init(config, jax.random.key(seed))
    special = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    hm3_jax.save_pretrained(hm3_jax.Model(config, params, special), directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_requests(paragraphs: list[str], work: Workload, seed: int) -> dict[str, list]:
    """{"loglikelihood": [(context, continuation)], "generate_until": [(context, generation kwargs)]} (module
    docstring); contexts are a paragraph's first words, continuations start with a space."""
    rng = np.random.default_rng(seed)
    words = [p.split() for p in paragraphs if len(p.split()) >= 16]
    picked = rng.permutation(len(words))

    def context(w):
        return " ".join(w[: int(rng.integers(8, min(work.max_context_words, len(w) - 6) + 1))])

    loglikelihood = []
    for d in picked[: work.num_docs]:
        ctx = context(words[d])
        others = rng.choice(len(words), work.num_choices - 1, replace=False)
        for source, start in [(d, len(ctx.split()))] + [(o, 0) for o in others]:
            cont = words[source][start : start + int(rng.integers(1, 7))]
            loglikelihood.append((ctx, " " + " ".join(cont)))
    kwargs = {"until": UNTIL, "max_gen_toks": work.max_gen_toks, "do_sample": False}
    prompts = picked[work.num_docs : work.num_docs + work.num_prompts]
    return {
        "loglikelihood": loglikelihood,
        "generate_until": [(context(words[p]), dict(kwargs)) for p in prompts],
    }


def instances(kind: str, args: list) -> list[Instance]:
    return [Instance(kind, {}, tuple(a), i, ("bench", i, 1)) for i, a in enumerate(args)]


def hm3_backends(checkpoint: str, requests: dict, work: Workload) -> tuple:
    """(the adapter, its (context ids, continuation ids) per loglikelihood request, {backend: {kind: zero-argument
    call}} for adapter, token_engine and path_engine)."""
    lm = get_model("hm3_jax").create_from_arg_string(
        f"pretrained={checkpoint}", {"batch_size": work.batch_size}
    )
    model, tokenizer, size = lm.model, lm.tokenizer, work.batch_size
    # the adapter's own token ids: lm-eval's (context, continuation) split, its left truncation of prompts
    pairs = [lm._encode_pair(c, y) for c, y in requests["loglikelihood"]]
    room = lm.max_length - work.max_gen_toks
    prompts = [lm.tok_encode(c, left_truncate_len=room) for c, _ in requests["generate_until"]]
    mc = make_multiple_choice_objective("loglikelihood/bench", [c for c, _ in pairs], [[y] for _, y in pairs],
                                        [0] * len(pairs), lm.pad_id, size)  # fmt: skip
    gen = make_generation_objective("generate_until/bench", prompts, [""] * len(prompts), tokenizer, size,
                                    "exact_match", work.max_gen_toks, eos_ids_of(checkpoint, tokenizer),
                                    stop=UNTIL)  # fmt: skip
    path = np.asarray(model.path)[None]
    engines = {kind: make_engine(model.config, model.shell, model.pool, [objective], strategy="map")
               for kind, objective in zip(KINDS, (mc, gen), strict=True)}  # fmt: skip
    return (
        lm,
        pairs,
        {
            "adapter": {
                "loglikelihood": lambda: lm.loglikelihood(
                    instances("loglikelihood", requests["loglikelihood"])
                ),
                "generate_until": lambda: lm.generate_until(
                    instances("generate_until", requests["generate_until"])
                ),
            },
            "token_engine": {
                "loglikelihood": lambda: token_requests.loglikelihoods(
                    model, pairs, size, lm.max_length, lm.pad_id
                ),
                "generate_until": lambda: token_requests.generate(
                    model, prompts, work.max_gen_toks, size, lm.max_length, lm.pad_id
                ),
            },
            "path_engine": {
                kind: (lambda e=e: e.evaluate(path, use_cache=False)) for kind, e in engines.items()
            },
        },
    )


def hf_side(python: str, checkpoint: str, requests: dict, work: Workload, repeats: int, workdir: str) -> dict:
    """Runs `HF_SIDE` in `python`'s interpreter on the same checkpoint and requests; returns what it wrote."""
    job, out = os.path.join(workdir, "hf_job.json"), os.path.join(workdir, "hf_out.json")
    with open(job, "w") as f:
        json.dump(
            {"checkpoint": checkpoint, "batch_size": work.batch_size, "repeats": repeats, **requests}, f
        )
    subprocess.run([python, "-c", HF_SIDE, job, out], check=True, stdout=sys.stderr)
    with open(out) as f:
        return json.load(f)


def _rates(seconds: dict, counts: dict) -> tuple[dict, dict]:
    seconds = {**seconds, "all": sum(seconds[k] for k in KINDS)}
    return seconds, {k: counts[k] / s for k, s in seconds.items()}


def _agreement(adapter: dict, hf: dict) -> dict:
    ll = np.asarray([a for a, _ in adapter["loglikelihood"]])
    hf_ll = np.asarray([a for a, _ in hf["loglikelihood"]])
    flags = [
        bool(a[1]) == bool(b[1]) for a, b in zip(adapter["loglikelihood"], hf["loglikelihood"], strict=True)
    ]
    texts = [a == b for a, b in zip(adapter["generate_until"], hf["generate_until"], strict=True)]
    return {"max_abs_loglikelihood_diff": float(np.abs(ll - hf_ll).max()), "greedy_flags_equal": float(np.mean(flags)),
            "generations_equal": float(np.mean(texts))}  # fmt: skip


def run(dims: Dims = SMALL, work: Workload = FULL, repeats: int = 3, hf_python: str | None = None,
        seed: int = 0, num_paragraphs: int | None = None) -> dict:  # fmt: skip
    """Builds the checkpoint and requests, measures every backend (module docstring); returns the JSON dict."""
    load = {"start": os.getloadavg()[0]}
    workdir = tempfile.mkdtemp(prefix="lm_eval_speed_")
    try:
        paragraphs = documentation_paragraphs()[:num_paragraphs]
        checkpoint = write_checkpoint(os.path.join(workdir, "model"), dims, paragraphs, seed)
        requests = make_requests(paragraphs, work, seed)
        counts = {k: len(requests[k]) for k in KINDS}
        counts["all"] = sum(counts.values())
        lm, pairs, backends = hm3_backends(checkpoint, requests, work)
        first_call = {}
        for kind in KINDS:
            start = time.perf_counter()
            backends["adapter"][kind]()
            first_call[kind] = time.perf_counter() - start
            for name in ("token_engine", "path_engine"):
                backends[name][kind]()
        times = {name: {kind: [] for kind in KINDS} for name in backends}
        answers = {}
        for _ in range(repeats):  # interleaved rounds: a change of load hits every backend alike
            for kind in KINDS:
                for name, calls in backends.items():
                    start = time.perf_counter()
                    answer = calls[kind]()
                    times[name][kind].append(time.perf_counter() - start)
                    if name == "adapter":
                        answers[kind] = answer
        seconds, rates = {}, {}
        for name, per_kind in times.items():
            seconds[name], rates[name] = _rates({k: min(v) for k, v in per_kind.items()}, counts)
        num_params = sum(x.size for x in jax.tree.leaves((lm.model.shell, lm.model.pool)))
        result = {
            "checkpoint": {**dims._asdict(), "num_params": int(num_params)},
            "requests": {**counts, "max_gen_toks": work.max_gen_toks, "batch_size": work.batch_size,
                         "loglikelihood_mean_tokens": float(np.mean([len(c) + len(y) for c, y in pairs]))},  # fmt: skip
            "repeats": repeats,
            "seconds": seconds,
            "requests_per_s": rates,
            "adapter_first_call_seconds": first_call,
            "adapter_vs_path_engine": {k: seconds["adapter"][k] / seconds["path_engine"][k] for k in seconds["adapter"]},
            "adapter_vs_token_engine": {k: seconds["adapter"][k] / seconds["token_engine"][k] for k in seconds["adapter"]},
        }  # fmt: skip
        load["before_hf"] = os.getloadavg()[0]
        if hf_python:
            hf = hf_side(hf_python, checkpoint, requests, work, repeats, workdir)
            seconds["hf"], rates["hf"] = _rates({k: min(v) for k, v in hf["seconds"].items()}, counts)
            result["hf_vs_adapter"] = {k: seconds["hf"][k] / seconds["adapter"][k] for k in seconds["hf"]}
            result["hf_threads"], result["hf_versions"] = hf["threads"], hf["versions"]
            result["agreement_vs_hf"] = _agreement(answers, hf["answers"])
        load["end"] = os.getloadavg()[0]
        result["load_average_1min"] = load
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv=None) -> dict:
    """Parses `argv` (default sys.argv), runs, prints one JSON object and returns it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf_python", default=None, help="python of a venv with torch and lm-eval[hf]")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per backend (best is reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of the requests")
    parser.add_argument("--smoke", action="store_true", help="tests: a tiny model, a few requests, one round")
    args = parser.parse_args(argv)
    if args.smoke:
        kwargs = dict(dims=SMOKE_DIMS, work=SMOKE, repeats=1, num_paragraphs=200)
    else:
        kwargs = dict(repeats=args.repeats)
    result = run(hf_python=args.hf_python, seed=args.seed, **kwargs)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
