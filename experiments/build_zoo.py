"""Builds (or reuses) the tiny3 zoo: base model, three experts, tokenizer, data splits, manifest.

    python -m experiments.build_zoo --config=experiments/configs/tiny3.py --workdir=runs/tiny3/zoo

Prints the score matrices (rows: base and experts; columns: tasks) of the manifest; with --time_scoring also
the seconds to score one model on the three search splits:

    python -m experiments.build_zoo --config=experiments/configs/tiny3.py --workdir=runs/tiny3/zoo --time_scoring

Accepts the scale-out flags of hm3_jax.distributed; with several processes process 0 builds the zoo (a
host-side job) while the others wait at a barrier.
"""

import json

from absl import flags, logging
from ml_collections import config_flags

from experiments import cli_errors
from hm3_jax import distributed, logs
from hm3_jax.tasks import zoo as zoo_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (experiments/configs/tiny3.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Zoo directory.")
_ON_MISMATCH = flags.DEFINE_enum(
    "on_mismatch", "rebuild", ["rebuild", "error"], "What to do when --workdir holds a zoo of another config."
)
_TIME_SCORING = flags.DEFINE_bool(
    "time_scoring", False, "Also time scoring one model on the three search splits (after compilation)."
)
flags.mark_flags_as_required(["config", "workdir"])
flags.register_validator("workdir", lambda v: v is None or bool(v.strip()), "--workdir must name a directory")
distributed.define_flags()


def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    logs.quiet_libraries(("hm3_jax", "experiments"))  # orbax/JAX INFO lines only with --verbosity=1
    distributed.runtime_from_flags()  # before any other JAX call
    if not distributed.is_main_process():  # host-side build: process 0 writes the zoo, the others wait
        distributed.barrier("build_zoo")
        return
    with cli_errors.user_errors(zoo_lib.ZooError):  # one line naming the directory or key, exit code 2
        zoo = zoo_lib.build_or_load(_CONFIG.value.zoo, _WORKDIR.value, on_mismatch=_ON_MISMATCH.value)
    print(zoo_lib.format_summary(zoo.manifest))
    timing = zoo_lib.time_scoring(zoo) if _TIME_SCORING.value else None
    print(
        json.dumps({"workdir": zoo.workdir, "build_time_s": zoo.manifest["build_time_s"], "scoring": timing})
    )
    distributed.barrier("build_zoo")


if __name__ == "__main__":
    cli_errors.run(main, _CONFIG)
