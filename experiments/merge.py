r"""Merge Hugging Face checkpoints: a mergekit-compatible YAML config, or plain flags.

  python -m experiments.merge --config=merge.yml --out=DIR [--seed=0]
  python -m experiments.merge --method=ties --base=BASE --models=A,B --weights=0.5,0.5 --density=0.5 --out=DIR

The merge streams tensor by tensor (bounded memory) into a temporary directory that becomes `--out` only when it
is complete. Any unsupported key, method or bad value is one line `error: ...` naming it, exit code 2, and no
output directory (experiments/cli_errors.py); a SIGTERM removes the temporary directory (exit code 143), and a
SIGKILL's is removed by the next merge into the same `--out`. See docs/merging.md for the supported YAML subset.

Accepts the scale-out flags of hm3_jax.distributed; with several processes process 0 merges (a streaming
host-side job) while the others wait at a barrier.
"""

from __future__ import annotations

import math
import os

import jax
from absl import flags, logging

from experiments import cli_errors
from hm3_jax import distributed, logs
from hm3_jax.merging import mergekit_config, passthrough, streaming

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "mergekit YAML file.")
flags.DEFINE_string("out", None, "Output directory (must not exist unless --overwrite).")
flags.DEFINE_integer("seed", 0, "PRNG seed for DARE's drop masks.")
flags.DEFINE_string("method", None, "Merge method (when no --config).")
flags.DEFINE_string("base", None, "Base checkpoint directory.")
flags.DEFINE_list("models", None, "Comma-separated fine-tuned checkpoint directories.")
flags.DEFINE_list("weights", None, "Comma-separated weights, one per model.")
flags.DEFINE_float("density", None, "Fraction kept by magnitude trimming (ties, dare_ties, consensus, pcb).")
flags.DEFINE_float("drop_rate", None, "DARE drop probability p.")
flags.DEFINE_float("t", None, "SLERP interpolation factor.")
flags.DEFINE_float("scale", None, "Scale of the merged task vector.")
flags.DEFINE_enum(
    "normalize", None, ["true", "false"], "Divide by the sum of weights (method default if unset)."
)
flags.DEFINE_string("dtype", None, "Output dtype: bfloat16, float16 or float32 (default: the base's).")
flags.DEFINE_string("tokenizer_source", None, "Directory to copy tokenizer files from (default: the base).")
flags.DEFINE_integer("max_shard_mb", 5 * 1024, "Output shard size limit in MiB.", lower_bound=1)
flags.DEFINE_bool("overwrite", False, "Replace an existing --out directory.")
flags.DEFINE_bool("progress", True, "Show a progress bar over tensors.")
distributed.define_flags()


def plan_from_flags() -> mergekit_config.MergePlan:
    if FLAGS.config:
        conflicting = [
            name
            for name in ("method", "base", "models", "weights", "density", "drop_rate", "t")
            if FLAGS[name].present
        ]
        if conflicting:
            raise ValueError(f"--config cannot be combined with --{', --'.join(conflicting)}")
        if not os.path.isfile(FLAGS.config):
            what = "is a directory" if os.path.isdir(FLAGS.config) else "does not exist"
            raise FileNotFoundError(f"--config={FLAGS.config}: the file {what}")
        plan = mergekit_config.parse_config(FLAGS.config)
        if FLAGS.dtype:
            plan = mergekit_config.MergePlan(**{**plan.__dict__, "dtype": FLAGS.dtype})
        return plan
    if not FLAGS.method or not FLAGS.models:
        raise ValueError("give --config, or --method and --models (and --base)")
    hparams = {}
    for name in ("density", "drop_rate", "t", "scale"):
        if FLAGS[name].value is not None:
            hparams[name] = FLAGS[name].value
    if FLAGS.normalize is not None:
        hparams["normalize"] = FLAGS.normalize == "true"
    weights = None
    if FLAGS.weights is not None:
        try:
            weights = tuple(float(w) for w in FLAGS.weights)
        except ValueError as err:
            raise ValueError(f"--weights must be numbers: {FLAGS.weights}") from err
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"--weights must be finite numbers: {FLAGS.weights}")
    return mergekit_config.MergePlan(
        FLAGS.method,
        FLAGS.base,
        tuple(FLAGS.models),
        weights,
        hparams,
        FLAGS.dtype,
        None,
        FLAGS.tokenizer_source,
    )


def run(plan: mergekit_config.MergePlan, out: str, seed: int) -> dict:
    """Runs a parsed plan; returns the merge summary."""
    common = dict(
        dtype=plan.dtype,
        tokenizer_source=plan.tokenizer_source,
        max_shard_bytes=FLAGS.max_shard_mb * 2**20,
        overwrite=FLAGS.overwrite,
        progress=FLAGS.progress,
    )
    if plan.method == "passthrough":
        return passthrough.passthrough_checkpoints(plan.slices, out, base=plan.base, **common)
    return streaming.merge_checkpoints(
        plan.method,
        plan.base,
        plan.models,
        out,
        key=jax.random.key(seed),
        weights=None if plan.weights is None else list(plan.weights),
        **common,
        **plan.hparams,
    )


def main(argv):
    if len(argv) > 1:
        cli_errors.fail(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.out:
        cli_errors.fail("--out is required")
    logs.quiet_libraries(("hm3_jax", "experiments"))  # JAX INFO lines only with --verbosity=1
    distributed.runtime_from_flags()  # before any other JAX call
    if not distributed.is_main_process():  # a host-side streaming job: process 0 merges, the others wait
        distributed.barrier("merge")
        return
    with cli_errors.user_errors(ValueError, FileNotFoundError, FileExistsError):
        plan = plan_from_flags()
        summary = run(plan, FLAGS.out, FLAGS.seed)
    logging.info("merged %d tensors into %s", summary["num_tensors"], summary["out"])
    print(f"wrote {summary['out']} ({summary['num_tensors']} tensors)")
    distributed.barrier("merge")


if __name__ == "__main__":
    cli_errors.run(main)
