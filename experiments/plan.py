r"""Will an HM3 run fit? Per program and per device bytes of the run's compiled programs, before launch.

    python -m experiments.plan --config=experiments/configs/llama2_7b.py:SPEC.yaml --mesh=paths:2,model:4 \
        --device_memory_gb=32
    python -m experiments.plan --config=experiments/configs/qwen25_1p5b.py:shapes --mesh=paths:8 --device_memory_gb=80

Reads the spec's config.json files, tokenizer and data (never the weights), compiles the run's programs with
abstract inputs and prints their bytes per device (hm3_jax/pipeline/memory_plan.py), the sources' host bytes and
the largest evaluation batch that fits; exits 1 naming the program and the device when the run would not fit
(a mistake in the config, spec or flags: one line, exit code 2, experiments/cli_errors.py).
By default (`--simulate`) the mesh is made of simulated CPU devices, so a laptop plans a TPU slice; on the
accelerator itself pass --simulate=false (then --device_memory_gb defaults to the device's own limit).
"""

import os
import sys

from absl import flags
from ml_collections import config_flags

from experiments import cli_errors
from hm3_jax import distributed, logs
from hm3_jax.pipeline import memory_plan, program_memory
from hm3_jax.tasks.spec import SpecError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config (as for experiments.run_hm3).")
_MESH = flags.DEFINE_string("mesh", None, "Mesh of the run, e.g. paths:2,model:4 (default: one device).")
_MEMORY = flags.DEFINE_float("device_memory_gb", None, "Memory per device in GiB (v4: 32, A100/H100: 80).")
_FRACTION = flags.DEFINE_float("memory_fraction", 0.9, "Fraction of the device memory a plan may use.")
_SIMULATE = flags.DEFINE_bool("simulate", True, "Compile on simulated CPU devices (one per mesh device).")
_LARGEST = flags.DEFINE_bool("largest_batch", True, "Also find the largest eval batch that fits.")
_PROGRAMS = flags.DEFINE_list(
    "programs", list(memory_plan.PROGRAMS), "Kinds of programs to plan (a run needs all)."
)
_SPLITS = flags.DEFINE_list("splits", list(program_memory.SPLITS), "Splits whose path engines to plan.")
_SPEC = flags.DEFINE_string(
    "spec", None, "Plan this spec instead of config.spec (e.g. a built zoo's spec.yaml)."
)
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    logs.quiet_libraries(("hm3_jax", "experiments"))  # JAX's backend probes only with --verbosity=1
    if _SIMULATE.value:  # before the first JAX call: the backend reads these once
        size = _mesh_size(_MESH.value)
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={size} "
        )
        os.environ["XLA_FLAGS"] += memory_plan.CPU_PLAN_XLA_FLAGS
    mesh = distributed.make_mesh(_MESH.value) if _MESH.value else None
    memory = None if _MEMORY.value is None else int(_MEMORY.value * memory_plan.GIB)
    with cli_errors.user_errors(SpecError, ValueError):
        plan = memory_plan.plan_run(_CONFIG.value, mesh, memory, _FRACTION.value, spec_path=_SPEC.value,
                                    search_batch=_LARGEST.value, programs=tuple(_PROGRAMS.value),
                                    splits=tuple(_SPLITS.value))  # fmt: skip
    print(memory_plan.format_plan(plan))
    if not plan.fits:
        sys.exit(f"error: {plan.error_message()}")


def _mesh_size(spec: str | None) -> int:
    """Devices a --mesh spec names (every axis given; no -1 with simulated devices)."""
    if not spec:
        return 1
    size = 1
    for part in spec.split(","):
        _, _, n = part.partition(":")
        if not n.strip().isdigit():
            cli_errors.fail(f"--mesh={spec}: with simulated devices every axis needs a size (no -1)")
        size *= int(n)
    return size


if __name__ == "__main__":
    cli_errors.run(main, _CONFIG)
