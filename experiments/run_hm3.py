r"""End-to-end HM3: the Pareto front of merged models on a benchmark, every baseline, report and exports.

    python -m experiments.run_hm3 --config=experiments/configs/tiny3.py --workdir=runs/tiny3
    python -m experiments.run_hm3 --config=experiments/configs/tiny3.py:smoke --workdir=/tmp/hm3_smoke

Kill it at any point and re-run the same command: it resumes from its stages and checkpoints.
"""

from absl import app, flags
from ml_collections import config_flags

from hm3_jax.hm3 import run as run_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Benchmark config file (e.g. experiments/configs/tiny3.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it holds the same run).")
_ZOO_DIR = flags.DEFINE_string("zoo_dir", None, "Zoo directory (default WORKDIR/zoo); built if missing.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    report = run_hm3(_CONFIG.value, _WORKDIR.value, _ZOO_DIR.value)
    claims = report.get("claims", {})
    print({k: claims[k] for k in sorted(claims)})


def run_hm3(config, workdir, zoo_dir=None):
    return run_lib.run_hm3(config, workdir, zoo_dir)


if __name__ == "__main__":
    app.run(main)
