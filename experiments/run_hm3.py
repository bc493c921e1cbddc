r"""End-to-end HM3: the Pareto front of merged models on a benchmark, every baseline, report and exports.

    python -m experiments.run_hm3 --config=experiments/configs/tiny3.py --workdir=runs/tiny3
    python -m experiments.run_hm3 --config=experiments/configs/tiny3.py:smoke --workdir=/tmp/hm3_smoke

Kill it at any point and re-run the same command: it resumes from its stages and checkpoints (a SIGTERM also
removes the temporary files; a SIGKILL's are removed as the rerun writes those files again). A mistake in the
config, spec or flags is one line `error: ...` naming it, exit code 2, before anything is written; so is a run
that would not fit its devices' memory (the memory plan's check, `python -m experiments.plan`, on accelerators or
with --config.memory.device_memory_gb=GB). The terminal
shows the run's own progress (libraries' INFO lines with --verbosity=1) and, at the end, a summary: the hypervolume
table, the balanced preference's scores and the files written (report.md / .html / .json, plots, exports).

On a device mesh (paths over "paths", evaluation examples over "data"; same report as one device):

    python -m experiments.run_hm3 --config=experiments/configs/tiny3.py --workdir=runs/tiny3 --mesh=paths:4,data:2

On several hosts (run on every host, same shared --workdir; process 0 writes):

    python -m experiments.run_hm3 --config=... --workdir=/shared/run --coordinator_address=HOST0:1234 \
        --num_processes=2 --process_id=I

On a CPU host with cores to spare, `--stage_workers=2` computes the ablation and the baselines in a second
process beside the main one (same report; twice the memory; not with a mesh or several processes):
`hm3_jax/pipeline/stage_workers.py`.

Scale-out flags: see hm3_jax/distributed (--mesh, --multihost, --coordinator_address, --num_processes,
--process_id, --distributed_timeout) and docs/scaling.md.
"""

import sys

import jax
from absl import flags
from ml_collections import config_flags

from experiments import cli_errors
from hm3_jax import distributed, logs
from hm3_jax.io.safetensors_io import CheckpointError
from hm3_jax.pipeline import run as run_lib
from hm3_jax.pipeline import run_config, stage_workers, summary
from hm3_jax.pipeline import workdir as workdir_lib
from hm3_jax.pipeline.memory_plan import PlanError
from hm3_jax.pipeline.workdir import WorkdirError
from hm3_jax.tasks import zoo as zoo_lib
from hm3_jax.tasks.spec import SpecError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Benchmark config file (e.g. experiments/configs/tiny3.py)."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it holds the same run).")
_ZOO_DIR = flags.DEFINE_string("zoo_dir", None, "Zoo directory (default WORKDIR/zoo); built if missing.")
_STAGE_WORKERS = flags.DEFINE_integer(
    "stage_workers",
    1,
    "Processes computing the run's stages (CPU hosts, one device): N > 1 starts N - 1 stage workers beside this "
    "process for the ablation and the baselines (same report, N times the memory).",
    lower_bound=1,
)
_WORKER_NICE = flags.DEFINE_integer(
    "stage_worker_nice",
    stage_workers.WORKER_NICE,
    "How much lower the stage workers' CPU priority is than this process's (0: the same).",
    lower_bound=0,
)
_STAGE_WORKER = flags.DEFINE_integer(
    "stage_worker", 0, "Internal: this process is stage worker i of a --stage_workers run.", lower_bound=0
)
flags.mark_flags_as_required(["config", "workdir"])
flags.register_validator("workdir", lambda v: v is None or bool(v.strip()), "--workdir must name a directory")
distributed.define_flags()


def main(argv):
    del argv
    logs.quiet_libraries(("hm3_jax", "experiments"))  # orbax/JAX INFO lines only with --verbosity=1
    mesh = distributed.runtime_from_flags()  # before any other JAX call
    # a resume and `suggest` load the run's compiled programs
    workdir_lib.use_compilation_cache(_WORKDIR.value)
    errors = (run_config.ConfigError, SpecError, WorkdirError, zoo_lib.ZooError, CheckpointError, PlanError)
    if _STAGE_WORKER.value:  # started by the main process below: stages only
        with cli_errors.user_errors(*errors):
            run_lib.run_stage_worker(
                _CONFIG.value, _WORKDIR.value, _ZOO_DIR.value, _STAGE_WORKER.value, _WORKER_NICE.value
            )
        return
    workers = []
    if _STAGE_WORKERS.value > 1:
        if mesh is not None or jax.process_count() > 1:
            cli_errors.fail("--stage_workers > 1 is for one-process runs on one device (not with a mesh)")
        workers = stage_workers.spawn(
            "experiments.run_hm3", sys.argv[1:], _STAGE_WORKERS.value, _WORKDIR.value
        )
    ok = False
    try:
        with cli_errors.user_errors(*errors):
            report = run_lib.run_hm3(_CONFIG.value, _WORKDIR.value, _ZOO_DIR.value, mesh)
        ok = True
    finally:
        stage_workers.finish(workers, _WORKDIR.value, ok)
    if distributed.is_main_process():
        print(summary.format_summary(report, _WORKDIR.value))


if __name__ == "__main__":
    cli_errors.run(main, _CONFIG)
