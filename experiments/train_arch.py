"""Trains the preference-conditioned path policy (HM3's architecture level) on a planted problem.

    python -m experiments.train_arch --config=experiments/configs/arch_planted.py --workdir=runs/arch_planted

Writes to ``--workdir``: ``metrics.jsonl`` (one JSON object per iteration), TensorBoard event files under ``tb/``,
orbax checkpoints under ``checkpoints/`` (a rerun resumes from the latest) and ``result.json`` (greedy path,
its value and the brute-force optimum for every evaluation preference). The library call is
``hm3_jax.arch.experiment.train_planted``.

Accepts the scale-out flags of hm3_jax.distributed; with several processes every process trains the same
(replicated) policy and takes part in orbax's checkpoint saves (process 0 writes the checkpoints).
"""

from absl import flags, logging
from ml_collections import config_flags

from experiments import cli_errors
from hm3_jax import distributed, logs
from hm3_jax.arch import experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (metrics, checkpoints, result.json)")
flags.mark_flags_as_required(["config", "workdir"])
flags.register_validator("workdir", lambda v: v is None or bool(v.strip()), "--workdir must name a directory")
distributed.define_flags()  # --mesh is accepted; the planted problem's RL is replicated on every process


def main(argv):
    del argv
    logs.quiet_libraries(("hm3_jax", "experiments"))  # orbax/JAX INFO lines only with --verbosity=1
    distributed.runtime_from_flags()  # before any other JAX call
    result = experiment.train_planted(_CONFIG.value, _WORKDIR.value)
    logging.info("found optimum for %d of %d preferences", result["num_optimal"], len(result["evaluations"]))


if __name__ == "__main__":
    cli_errors.run(main, _CONFIG)
