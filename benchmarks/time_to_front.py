r"""Time to a front (issue 18): a fresh `make demo` (zoo, run, report) and suggestions; prints one JSON object.

  python -m benchmarks.time_to_front                          # tiny3.py:demo, from nothing: ~15 min on 2 cores
  python -m benchmarks.time_to_front --zoo_dir=runs/tiny3/zoo  # the run only, on a built zoo
  python -m benchmarks.time_to_front --config=tiny3 --workdir=runs/tiny3   # the README results config
  python -m benchmarks.time_to_front --smoke                  # the smoke config, for the tests
  python -m benchmarks.time_to_front --config=tiny3 --stage_workers=2   # with a stage worker beside the run

What `make demo` does after the pip install, timed stage by stage in one process: building the zoo (skipped when
`--zoo_dir` holds it), then `run_hm3` into `--workdir` (default: a new temporary directory, so nothing is read
back from an earlier run), whose stage times are read from its own stage records (`stages/*.json` mtimes, in
run order). Then `suggest(run, preference, search=True)` for `--preferences`: once in a fresh Python process
(`fresh_suggest_seconds`: imports, loading the run, programs from the run's compilation cache), then twice in
this process (`warm_suggest_seconds`: the second and third call, after a first that loads the run). Wall-clock
seconds; the machine's load average at the end is reported beside them (timings here are noisy: compare runs
made at the same load). With `--stage_workers=N` the run has N - 1 stage workers (`run_hm3 --stage_workers`,
hm3_jax/pipeline/stage_workers.py) and the stages overlap, so `stage_seconds` (differences of the stage files'
times in run order) no longer time single stages; `run_seconds` is the measure.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stage_seconds(workdir: str, start: float) -> dict:
    """{stage: seconds} from the stage records' modification times (each written when its stage ended)."""
    stages = os.path.join(workdir, "stages")
    ends = sorted(
        (os.path.getmtime(os.path.join(stages, f)), f[: -len(".json")])
        for f in os.listdir(stages)
        if f.endswith(".json")  # not the stages' lock files
    )
    out, prev = {}, start
    for t, name in ends:
        out[name] = round(max(0.0, t - prev), 1)
        prev = max(prev, t)
    return out


def _fresh_suggest(workdir: str, preference: list) -> float:
    code = (
        "import sys, time, json; t = time.perf_counter(); from hm3_jax.pipeline import suggest; "
        f"suggest.suggest({workdir!r}, {preference!r}, search=True); print(json.dumps(time.perf_counter() - t))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return round(float(out.stdout.strip().splitlines()[-1]), 2)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny3:demo", help="experiments/configs/NAME.py[:VARIANT]")
    parser.add_argument("--workdir", default=None, help="run directory (default: a new temporary one)")
    parser.add_argument("--zoo_dir", default=None, help="a zoo to reuse (default: built into WORKDIR/zoo)")
    parser.add_argument("--preferences", default="0.6,0.3,0.1;0.2,0.2,0.6", help="';'-separated suggestions")
    parser.add_argument("--smoke", action="store_true", help="the smoke config (tests)")
    parser.add_argument("--no_fresh_process", action="store_true", help="skip the fresh-process suggestion")
    parser.add_argument(
        "--stage_workers", type=int, default=1, help="processes for the run's stages (run_hm3's flag)"
    )
    args = parser.parse_args(argv)

    from hm3_jax import logs
    from hm3_jax.pipeline import run as run_lib
    from hm3_jax.pipeline import stage_workers, suggest
    from hm3_jax.pipeline import workdir as workdir_lib
    from hm3_jax.tasks import zoo as zoo_lib

    logs.quiet_libraries(("hm3_jax", "experiments"))
    config_name = "tiny3:smoke" if args.smoke else args.config
    name, _, variant = config_name.partition(":")
    config = importlib.import_module(f"experiments.configs.{name}").get_config(variant or None)
    workdir = args.workdir or tempfile.mkdtemp(prefix="hm3_time_to_front_")
    workdir_lib.use_compilation_cache(workdir)
    zoo_dir = args.zoo_dir or os.path.join(workdir, "zoo")
    result = {"config": config_name, "workdir": workdir}
    start = time.perf_counter()
    if not os.path.isfile(os.path.join(zoo_dir, "manifest.json")):
        zoo_lib.ensure_built(config.zoo, zoo_dir)
        result["zoo_seconds"] = round(time.perf_counter() - start, 1)
    run_start, wall_start = time.perf_counter(), time.time()
    config_flag = f"--config=experiments/configs/{name}.py" + (f":{variant}" if variant else "")
    workers = stage_workers.spawn(
        "experiments.run_hm3",
        [config_flag, f"--workdir={workdir}", f"--zoo_dir={zoo_dir}"],
        args.stage_workers,
        workdir,
    )
    ok = False
    try:
        run_lib.run_hm3(config, workdir, zoo_dir)
        ok = True
    finally:
        stage_workers.finish(workers, workdir, ok)
    result["stage_workers"] = args.stage_workers
    result["run_seconds"] = round(time.perf_counter() - run_start, 1)
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    result["stage_seconds"] = _stage_seconds(workdir, wall_start)
    prefs = [[float(x) for x in p.split(",")] for p in args.preferences.split(";")]
    if not args.no_fresh_process:
        result["fresh_suggest_seconds"] = _fresh_suggest(workdir, prefs[0])
    suggest.suggest(workdir, prefs[0], search=True)  # loads the run in this process
    warm = []
    for p in prefs:
        t = time.perf_counter()
        suggest.suggest(workdir, p, search=True)
        warm.append(round(time.perf_counter() - t, 2))
    result["warm_suggest_seconds"] = warm
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
