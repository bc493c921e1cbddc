"""Zoos built offline and cached in a directory: build, reuse, load, and make a run spec of them, for every kind.

A zoo is a base model and one expert per task saved as Hugging Face directories; its kind (`config.zoo.kind`)
says which builder makes it: tiny3 (the default; `hm3_jax.tasks.tiny3_zoo`, a Llama base and three text
experts) or tiny8 (`hm3_jax.tasks.tiny8.zoo`, a ViT encoder and eight image experts). Layout of a tiny3 zoo
directory (everything is written into a temporary sibling and renamed into place)::

    DIR/manifest.json                 config, fingerprint, seed, sizes, score matrices, norms, build time
    DIR/tokenizer/                    byte-level BPE (AutoTokenizer loads it)
    DIR/data/<task>.jsonl             every example with its "split" (train / search / heldout)
    DIR/base/                         config.json + model.safetensors + tokenizer files
    DIR/experts/<task>/               same, one per task in TASK_NAMES order

`build_or_load(config, workdir)` reuses a directory whose manifest carries the same config fingerprint; a
different fingerprint is rebuilt into a clean directory (``on_mismatch="rebuild"``, the default) or raises
(``on_mismatch="error"``); contents are never mixed.

Score matrices are ``[1 + K, K]`` (rows: base then experts in TASK_NAMES order; columns: tasks), one per
split. What every zoo kind shares (`Zoo`, the manifest's format and fingerprint, score matrices, task-vector
sizes) is `hm3_jax.tasks.zoo_format`'s; each kind builds, writes its eval files and loads in its own module,
to which this one dispatches.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping

import yaml
from filelock import FileLock

from hm3_jax.io import atomic
from hm3_jax.tasks import scoring, tiny3_zoo
from hm3_jax.tasks.tiny8 import zoo as tiny8_zoo
from hm3_jax.tasks.zoo_format import (
    MANIFEST,
    Zoo,
    config_dict,
    config_fingerprint,
    read_manifest,
)

log = logging.getLogger(__name__)


ZOO_KINDS = ("tiny3", "tiny8")


class ZooError(ValueError):
    """A zoo directory or `config.zoo` that cannot be used; the message names the directory or key (one line)."""


def zoo_kind(zoo_config) -> str:
    """`zoo_config.kind` ("tiny3" when absent, so tiny3 fingerprints are unchanged); tiny8: hm3_jax/tasks/tiny8."""
    kind = config_dict(zoo_config).get("kind", "tiny3")
    if kind not in ZOO_KINDS:
        raise ZooError(f"config.zoo.kind={kind!r} is not a zoo kind; known kinds: {', '.join(ZOO_KINDS)}")
    return kind


def check_buildable(zoo_config, workdir: str) -> None:
    """Raises ZooError unless a zoo of `zoo_config` can be built into `workdir`, before anything is written.

    Checked: the zoo kind; `workdir` is not a file, nor a non-empty directory that holds no zoo; its parent (or
    the nearest ancestor that exists, where the missing ones would be made) is a directory we can write, since
    the build goes to a temporary sibling of `workdir`.
    """
    zoo_kind(zoo_config)
    workdir = os.path.abspath(workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ZooError(f"zoo directory {workdir} is a file")
    if os.path.isdir(workdir) and os.listdir(workdir) and read_manifest(workdir) is None:
        raise ZooError(
            f"zoo directory {workdir} is not empty and holds no {MANIFEST}: refusing to overwrite it"
        )
    ancestor = os.path.dirname(workdir)
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ZooError(f"zoo directory {workdir} cannot be created: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ZooError(
            f"zoo directory {workdir} cannot be created: {ancestor} is not writable (permission denied)"
        )


def build_into(zoo_config, out_dir: str, progress: bool) -> dict:
    """Builds every artefact of a zoo of `zoo_config`'s kind into `out_dir` (an empty temporary directory);
    returns the manifest."""
    kind_module = tiny8_zoo if zoo_kind(zoo_config) == "tiny8" else tiny3_zoo
    return kind_module.build_into(zoo_config, out_dir, progress)


SPEC = "spec.yaml"


def write_spec(workdir: str) -> str:
    """Makes a built zoo a run spec (`hm3_jax.tasks.spec`): every run reads a spec, the built-in benchmarks are
    producers of one. Returns the path of `workdir/spec.yaml` (written once; later calls return it). tiny8:
    `tiny8.zoo.write_eval_files` (image tasks scored by accuracy with the experts' fixed heads). tiny3:

    Writes `eval/<task>.jsonl` (the search and held-out rows, each with its "split"), makes the tokenizer files
    beside every checkpoint encode as the models were trained (`tokenizer(prompt)` = BOS + the prompt's tokens:
    the zoo's tokenizer adds no special token by itself), then the spec: translation scored by `chrf` with
    `max_new_tokens` = the longest target + EOS (the zoo's own decode length), math and code by
    `exact_match_teacher_forced` (the zoo's own metric), `eval_batch_size` of the zoo config. So a run on the
    spec scores exactly what the zoo's own objectives score (tests/test_spec_zoo_tiny3.py).
    """
    path = os.path.join(workdir, SPEC)
    manifest = read_manifest(workdir)
    if manifest is None:
        raise ValueError(f"{workdir}: no {MANIFEST}, not a built zoo")
    with FileLock(path + ".lock"):  # spec.yaml appears last: a reader that sees it sees every file it names
        if not os.path.isfile(path):
            if manifest.get("kind", "tiny3") == "tiny8":
                spec = tiny8_zoo.write_eval_files(workdir, manifest)
            else:
                spec = tiny3_zoo.write_eval_files(workdir, manifest)
            atomic.write_text(
                path, "# Written by hm3_jax.tasks.zoo.write_spec from the zoo's manifest.\n" + _yaml(spec)
            )
    return path


def _yaml(obj) -> str:
    return yaml.safe_dump(obj, sort_keys=False)


def _write_manifest(out_dir: str, manifest: dict) -> None:
    atomic.write_text(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=2) + "\n")


def build(zoo_config, workdir: str, progress: bool = True) -> None:
    """Builds the zoo into `workdir`, replacing it only once the new build is complete.

    The build goes to a temporary sibling directory; then an existing `workdir` (which must itself be a zoo,
    i.e. hold a manifest, or be empty) is moved aside and deleted, and the new one renamed into place.

    Raises:
      ZooError naming the directory or key when `check_buildable` refuses, or the temporary directory cannot be
      made; nothing is written then.
    """
    workdir = os.path.abspath(workdir)
    parent = os.path.dirname(workdir)
    check_buildable(zoo_config, workdir)
    try:  # what the checks cannot see (a filesystem that refuses new entries, as /proc): still one line
        os.makedirs(parent, exist_ok=True)
        tmp = atomic.make_temp_dir(workdir)  # also removes a killed build's temporaries
    except OSError as e:
        raise ZooError(f"zoo directory {workdir} cannot be created: {e.strerror}") from None
    try:
        manifest = build_into(zoo_config, tmp, progress)
        _write_manifest(tmp, manifest)
        atomic.commit_directory(tmp, workdir)  # an existing zoo is replaced; modes as the umask gives
    except BaseException:
        atomic.discard(tmp)
        raise
    log.info("built zoo %s in %.1f s", workdir, manifest["build_time_s"])


def load(workdir: str, eval_batch_size: int | None = None) -> Zoo:
    """Loads a built zoo (models, tokenizer, data, objectives) from `workdir`."""
    manifest = read_manifest(workdir)
    if manifest is None:
        raise FileNotFoundError(f"no {MANIFEST} in {workdir}: not a zoo directory (build it first)")
    kind_module = tiny8_zoo if manifest.get("kind", "tiny3") == "tiny8" else tiny3_zoo
    return kind_module.load(workdir, manifest, eval_batch_size)


class ZooMismatchError(ZooError):
    """A zoo directory holds a zoo of another config (`built_config`: the config it was built from)."""

    def __init__(self, message: str, built_config: dict | None):
        super().__init__(message)
        self.built_config = built_config or {}


def build_or_load(zoo_config, workdir: str, on_mismatch: str = "rebuild", progress: bool = True) -> Zoo:
    """Returns the zoo for `zoo_config` in `workdir`, building it when needed.

    Args:
      zoo_config: the `config.zoo` ConfigDict (see experiments/configs/tiny3.py).
      workdir: zoo directory.
      on_mismatch: what to do when `workdir` holds a zoo of another config: "rebuild" (replace it with a clean
        build) or "error" (raise `ZooMismatchError`, a ValueError).
      progress: show progress bars while building.
    """
    ensure_built(zoo_config, workdir, on_mismatch, progress)
    return load(workdir)


def ensure_built(zoo_config, workdir: str, on_mismatch: str = "rebuild", progress: bool = True) -> None:
    """Builds the zoo of `zoo_config` into `workdir` unless it already holds it (`build_or_load` without the
    load; same arguments)."""
    if on_mismatch not in ("rebuild", "error"):
        raise ValueError(f"on_mismatch must be 'rebuild' or 'error', got {on_mismatch!r}")
    fingerprint = config_fingerprint(zoo_config)
    atomic.remove_stale(workdir)  # what a killed build left beside it, also when the zoo itself is complete
    manifest = read_manifest(workdir)
    if manifest is not None and manifest.get("fingerprint") == fingerprint:
        log.info("zoo cache hit: %s (fingerprint %s)", workdir, fingerprint)
        return
    if manifest is not None:
        message = (
            f"{workdir} holds a zoo built from another config (fingerprint {manifest.get('fingerprint')}, "
            f"wanted {fingerprint})"
        )
        if on_mismatch == "error":
            raise ZooMismatchError(
                message
                + "; use another directory, delete it, or rebuild it (build_zoo --on_mismatch=rebuild)",
                manifest.get("config"),
            )
        log.warning("%s; rebuilding it", message)
    build(zoo_config, workdir, progress=progress)


def load_matching(zoo_config, workdir: str) -> Zoo:
    """The zoo already built in `workdir` from `zoo_config` (ValueError when there is none or it is another
    config's); never builds. For scripts that read a finished run's zoo."""
    if read_manifest(workdir) is None:
        raise ValueError(f"{workdir} holds no zoo (no manifest); build it with experiments.build_zoo")
    return build_or_load(zoo_config, workdir, on_mismatch="error", progress=False)


def format_summary(manifest: Mapping) -> str:
    """Markdown tables of the manifest's score matrices and task-vector sizes."""
    tasks, rows = manifest["tasks"], manifest["rows"]
    lines = []
    for split, matrix in manifest["score_matrix"].items():
        metric_names = [f"{t} ({manifest['metrics'][t]})" for t in tasks]
        lines += [f"\n{split} split", "", "| model | " + " | ".join(metric_names) + " |"]
        lines.append("|---" * (len(tasks) + 1) + "|")
        for name, row in zip(rows, matrix, strict=True):
            lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in row) + " |")
    ratios = manifest["task_vector_norm_ratio"]
    lines += ["", "||tau_k|| / ||theta_base||: " + ", ".join(f"{t} {r:.4f}" for t, r in ratios.items())]
    lines.append(
        f"build time: {manifest['build_time_s']:.1f} s wall, {manifest.get('build_cpu_s', float('nan')):.1f} s CPU "
        f"({manifest['timings_s']})"
    )
    return "\n".join(lines)


def time_scoring(zoo: Zoo, split: str = "search", repeats: int = 5) -> dict:
    """Seconds to score one model (the first expert) on every task of `split`, after compilation.

    Returns {"total_s": best of `repeats`, "<task>_s": best per task}.
    """
    model = next(iter(zoo.experts.values()))
    split_objectives = zoo.objectives[split]

    def run(objective):
        start = time.perf_counter()
        scoring.score_model(model.config, model.params, objective)
        return time.perf_counter() - start

    for objective in split_objectives.values():
        run(objective)  # compile
    per_task = {t: min(run(o) for _ in range(repeats)) for t, o in split_objectives.items()}
    totals = [sum(run(o) for o in split_objectives.values()) for _ in range(repeats)]
    return {"total_s": round(min(totals), 4), **{f"{t}_s": round(v, 4) for t, v in per_task.items()}}
