"""The run spec: one YAML file that names a base checkpoint, one expert per objective and the evaluation tasks.

Every HM3 run on a user's own checkpoints reads one spec (HM3_SPEC "Decisions taken": inputs)::

    base: base                      # HF directory: config.json, *.safetensors, tokenizer files
    experts:                        # one expert per objective, keyed by the objective's name
      math: experts/math
      code: experts/code
    tasks:
      gsm8k_like: {data: data/gsm.jsonl, metric: exact_match, objective: math, max_new_tokens: 32}
      mbpp_like:  {data: data/code.jsonl, metric: exact_match, objective: code, stop: ["\\n\\n"]}
      choice:     {data: data/choice.jsonl, metric: multiple_choice, objective: code}
    # optional:
    tokenizer_source: base          # map every expert's vocabulary onto the base tokenizer's ids (mergekit's)
    dtype: float32                  # or bfloat16: every checkpoint is loaded in it
    eval_batch_size: 16             # rows per forward pass of the evaluation

Metrics (scored as transformers / lm-eval-harness would, `hm3_jax.tasks.spec_zoo`): `exact_match` and `chrf`
on greedy generations, `multiple_choice` by summed continuation log-probability, and
`exact_match_teacher_forced`, the built-in tiny3's fast metric (one forward pass: is the greedy output exactly
the target's own tokens then EOS, token by token; not the same number as `exact_match` in general).

Image classification (ViT bases, HM3's vision setting): ``{data: images.npz, metric: accuracy, head: head.npz}``.
The data file holds uint8 images ``pixel_values [N, C, H, W]`` and int ``labels [N]`` (optionally per split:
``search/pixel_values``, ``search/labels``, ``heldout/...``), preprocessed by the base's own
`preprocessor_config.json` (transformers' image processor); the head file holds the task's fixed linear head
``kernel [D, C_task]``, ``bias [C_task]`` read out on every merged encoder's CLS feature (task arithmetic's
fixed heads). `.npz` files are read without pickle.

lm-evaluation-harness tasks: ``{lm_eval_yaml: tasks/my_task.yaml, objective: math}``, or a task the harness
registers by name, ``{lm_eval: gsm8k, objective: math}`` (optional ``lm_eval_include_path: DIR``: task YAMLs
searched for the name before the harness's own, as ``lm_eval --include_path``); optional ``lm_eval_filter``,
``lm_eval_metric``: which of the task's filter pipelines and metrics is scored, default the first of each. The
task's evaluation documents are split 70 / 30 like JSONL rows, seeded with the name of the data file they are
read from (a JSONL task over the same file splits its rows alike; remote data: the task's name), and scored with
the harness's own prompts, filters and metric (`hm3_jax.tasks.harness_task`; needs the `lm-eval` package). A
run content-hashes the task's YAML and the local data files it names.

Relative paths are relative to the spec file. An objective's score is the mean of its tasks' scores (the paper's
seven benchmarks over three objectives); the preference has one weight per objective (= per expert), in the order
of `experts`. A task's objective defaults to the task's own name.

Data files are JSONL, one example per line: ``{"prompt", "target"}`` for `exact_match` / `chrf`,
``{"prompt", "choices": [...], "answer": index}`` for `multiple_choice`. An optional ``"split"`` ("search" or
"heldout") is honoured; rows without it are split 70 / 30 by a shuffle seeded with (`seed`, data file name)
(`split_rows`); the run records the resulting row numbers.

This module parses and checks the file (pure host code, no model is loaded) and `hm3_jax.tasks.spec_data` reads
and splits its data files: every mistake is a `SpecError` naming the file, key or row. `hm3_jax.tasks.spec_zoo`
loads the checkpoints and `hm3_jax.tasks.spec_objectives` builds the objectives.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import yaml

METRICS = ("exact_match", "chrf", "multiple_choice", "exact_match_teacher_forced", "accuracy", "lm_eval")
GENERATION_METRICS = ("exact_match", "chrf")
TOP_KEYS = ("base", "experts", "tasks", "tokenizer_source", "dtype", "eval_batch_size")
TASK_KEYS = (
    "data",
    "metric",
    "objective",
    "max_new_tokens",
    "stop",
    "head",
    "lm_eval_yaml",
    "lm_eval",
    "lm_eval_include_path",
    "lm_eval_filter",
    "lm_eval_metric",
)
HARNESS_KEYS = (
    "lm_eval_yaml",
    "lm_eval",
    "lm_eval_include_path",
    "objective",
    "lm_eval_filter",
    "lm_eval_metric",
)
DTYPES = ("float32", "bfloat16")
SPLITS = ("search", "heldout")


class SpecError(ValueError):
    """A spec file, a path it names or a data row is not usable; the message names which."""


class TaskSpec(NamedTuple):
    """One evaluation task of a spec.

    Attributes: name; data: absolute JSONL path; metric: one of METRICS; objective: the objective (expert) it
    counts towards; max_new_tokens: generation budget or None (default: longest target + 8 tokens); stop: stop
    strings of generation; head: absolute path of an accuracy task's head file, else None. A harness task
    (``{lm_eval_yaml: my_task.yaml, objective: math}`` or ``{lm_eval: gsm8k, objective: math}``, metric
    "lm_eval", `hm3_jax.tasks.harness_task`): data is the absolute YAML path (of a named task: the YAML the
    harness registers it from); lm_eval_task: the registered name (None: the YAML's one task);
    lm_eval_include_path: absolute directory of task YAMLs searched before the harness's own, or None;
    lm_eval_filter / lm_eval_metric name the task's filter and metric scored (None: the YAML's first of each).
    """

    name: str
    data: str
    metric: str
    objective: str
    max_new_tokens: int | None
    stop: tuple[str, ...]
    head: str | None = None
    lm_eval_filter: str | None = None
    lm_eval_metric: str | None = None
    lm_eval_task: str | None = None
    lm_eval_include_path: str | None = None


class Spec(NamedTuple):
    """A parsed, checked spec (paths absolute).

    Attributes: path: the spec file; base: base checkpoint directory; experts: {objective: directory} in the
    file's order (the objective order of every score vector); tasks: {name: TaskSpec} in the file's order;
    tokenizer_source: None or "base"; dtype: "float32" | "bfloat16"; eval_batch_size: rows per forward pass.
    """

    path: str
    base: str
    experts: dict
    tasks: dict
    tokenizer_source: str | None
    dtype: str
    eval_batch_size: int

    @property
    def objectives(self) -> tuple[str, ...]:
        return tuple(self.experts)

    def tasks_of(self, objective: str) -> list[str]:
        return [t for t, s in self.tasks.items() if s.objective == objective]


def _fail(where: str, message: str):
    raise SpecError(f"{where}: {message}")


def _directory(spec_dir: str, value, where: str) -> str:
    if not isinstance(value, str) or not value:
        _fail(where, f"expected a directory path (a string), got {value!r}")
    path = os.path.normpath(os.path.join(spec_dir, os.path.expanduser(value)))
    if not os.path.isdir(path):
        _fail(where, f"directory {path} does not exist")
    return path


def load_spec(path: str) -> Spec:
    """Parses and checks a spec file (keys, types, paths that must exist). Raises SpecError naming the key."""

    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise SpecError(f"spec file {path} does not exist")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(raw, Mapping):
        raise SpecError(f"{path}: a spec must be a YAML mapping with keys base, experts, tasks")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        _fail(path, f"unknown key(s) {unknown}; known keys: {list(TOP_KEYS)}")
    for key in ("base", "experts", "tasks"):
        if key not in raw:
            _fail(path, f"missing key {key!r}")
    spec_dir = os.path.dirname(path)
    base = _directory(spec_dir, raw["base"], f"{path}: base")
    if not isinstance(raw["experts"], Mapping) or not raw["experts"]:
        _fail(path, "experts must be a mapping {objective: checkpoint directory} with at least one entry")
    experts = {str(k): _directory(spec_dir, v, f"{path}: experts.{k}") for k, v in raw["experts"].items()}
    if not isinstance(raw["tasks"], Mapping) or not raw["tasks"]:
        _fail(path, "tasks must be a mapping {task name: {data, metric, ...}} with at least one entry")
    tasks = {
        str(n): _task(spec_dir, str(n), t, f"{path}: tasks.{n}", experts) for n, t in raw["tasks"].items()
    }
    without = [o for o in experts if not any(t.objective == o for t in tasks.values())]
    if without:
        _fail(
            path,
            f"expert(s) {without} have no task: give each objective at least one task (tasks.X.objective)",
        )
    source = raw.get("tokenizer_source")
    if source not in (None, "base"):
        _fail(path, f"tokenizer_source must be 'base' (or absent), got {source!r}")
    dtype = raw.get("dtype", "float32")
    if dtype not in DTYPES:
        _fail(path, f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    batch = raw.get("eval_batch_size", 16)
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        _fail(path, f"eval_batch_size must be a positive integer, got {batch!r}")
    return Spec(path, base, experts, tasks, source, dtype, batch)


def _task(spec_dir: str, name: str, raw, where: str, experts: Mapping) -> TaskSpec:
    if not isinstance(raw, Mapping):
        _fail(where, f"expected a mapping with keys {list(TASK_KEYS)}, got {raw!r}")
    unknown = sorted(set(raw) - set(TASK_KEYS))
    if unknown:
        _fail(where, f"unknown key(s) {unknown}; known keys: {list(TASK_KEYS)}")
    if {"lm_eval_yaml", "lm_eval", "lm_eval_include_path"} & set(raw) or raw.get("metric") == "lm_eval":
        return _harness_task(spec_dir, name, raw, where, experts)
    for key in ("data", "metric"):
        if key not in raw:
            _fail(where, f"missing key {key!r}")
    if "lm_eval_filter" in raw or "lm_eval_metric" in raw:
        _fail(where, "lm_eval_filter and lm_eval_metric go with lm_eval_yaml or lm_eval (a harness task)")
    metric = raw["metric"]
    if metric not in METRICS:
        _fail(where, f"unknown metric {metric!r}; known metrics: {list(METRICS)}")
    data = os.path.normpath(os.path.join(spec_dir, os.path.expanduser(str(raw["data"]))))
    if not os.path.isfile(data):
        _fail(f"{where}.data", f"file {data} does not exist")
    objective = _objective(name, raw, where, experts)
    max_new = raw.get("max_new_tokens")
    if max_new is not None and (not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1):
        _fail(f"{where}.max_new_tokens", f"must be a positive integer, got {max_new!r}")
    stop = raw.get("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        _fail(f"{where}.stop", f"must be a list of non-empty strings, got {raw.get('stop')!r}")
    if metric not in GENERATION_METRICS and (max_new is not None or stop):
        _fail(
            where,
            f"max_new_tokens and stop apply to generation metrics {list(GENERATION_METRICS)}, not to {metric}",
        )
    head = raw.get("head")
    if (metric == "accuracy") != (head is not None):
        _fail(
            where, "an accuracy task needs a `head` file (kernel [D, C], bias [C]); other metrics take none"
        )
    if head is not None:
        head = os.path.normpath(os.path.join(spec_dir, os.path.expanduser(str(head))))
        if not os.path.isfile(head):
            _fail(f"{where}.head", f"file {head} does not exist")
    if metric == "accuracy" and not data.endswith(".npz"):
        _fail(f"{where}.data", "an accuracy task reads images from a .npz file (pixel_values, labels)")
    return TaskSpec(name, data, metric, objective, max_new, tuple(stop), head)


def _objective(name: str, raw: Mapping, where: str, experts: Mapping) -> str:
    objective = str(raw.get("objective", name))
    if objective not in experts:
        _fail(
            f"{where}.objective",
            f"objective {objective!r} has no expert; experts are {list(experts)} (add `{objective}: DIR` under "
            "experts, or set the task's objective to one of them)",
        )
    return objective


def _harness_task(spec_dir: str, name: str, raw: Mapping, where: str, experts: Mapping) -> TaskSpec:
    """A task read from an lm-evaluation-harness task YAML, or named by the harness's registry: its documents,
    prompts, generation settings, filters and metric are the YAML's (a YAML file is only checked here, a name
    is looked up (`harness_loader.find_task`); `harness_loader` loads the task)."""
    other = sorted(set(raw) - set(HARNESS_KEYS))
    if other:
        _fail(
            where,
            f"a harness task (lm_eval_yaml / lm_eval) takes its data, prompts, generation settings and "
            f"metric from its YAML; remove {other} (its keys: {list(HARNESS_KEYS)})",
        )
    if ("lm_eval_yaml" in raw) == ("lm_eval" in raw):
        _fail(
            where,
            "a harness task needs exactly one of lm_eval_yaml (a task YAML file) and lm_eval (a task name "
            "the harness registers, e.g. gsm8k)",
        )
    if "lm_eval_include_path" in raw and "lm_eval" not in raw:
        _fail(
            f"{where}.lm_eval_include_path",
            "goes with lm_eval (a task name): a directory of task YAMLs searched for that name",
        )
    names = {k: raw.get(k) for k in ("lm_eval_filter", "lm_eval_metric", "lm_eval")}
    for k, v in names.items():
        if v is not None and (not isinstance(v, str) or not v):
            _fail(f"{where}.{k}", f"must be a non-empty string, got {v!r}")
    objective = _objective(name, raw, where, experts)
    include_path = None
    if "lm_eval" in raw:
        if raw.get("lm_eval_include_path") is not None:
            include_path = os.path.normpath(
                os.path.join(spec_dir, os.path.expanduser(str(raw["lm_eval_include_path"])))
            )
            if not os.path.isdir(include_path):
                _fail(f"{where}.lm_eval_include_path", f"directory {include_path} does not exist")
        try:
            _, yaml_file = _harness_module(where).find_task(names["lm_eval"], include_path)
        except ValueError as e:
            _fail(f"{where}.lm_eval", str(e))
    else:
        yaml_file = os.path.normpath(os.path.join(spec_dir, os.path.expanduser(str(raw["lm_eval_yaml"]))))
        if not os.path.isfile(yaml_file):
            _fail(f"{where}.lm_eval_yaml", f"file {yaml_file} does not exist")
    return TaskSpec(
        name,
        yaml_file,
        "lm_eval",
        objective,
        None,
        (),
        None,
        names["lm_eval_filter"],
        names["lm_eval_metric"],
        names["lm_eval"],
        include_path,
    )


def _harness_module(where: str):
    """`hm3_jax.tasks.harness_loader`, imported when a spec has harness tasks (lm-eval is an optional package)."""
    try:
        from hm3_jax.tasks import harness_loader
    except ImportError as e:
        _fail(where, f"an lm-evaluation-harness task: install lm-eval (pip install -e '.[lm_eval]'); {e}")
    return harness_loader


def file_hashes(spec: Spec, known: Mapping | None = None) -> dict[str, dict]:
    """{absolute path: {"sha256", "size", "mtime_ns"}} of the spec file, every data and head file (a harness
    task's YAML and the local data files it names, `harness_loader.local_data_files`) and every file of the
    checkpoints (weights, configs, tokenizer files): what a run's cached stages depend on.

    `known`: an earlier result (a run's record); a file whose size and modification time are unchanged keeps its
    recorded hash instead of being read again (as git's index does: a resumed 7B run or a suggestion does not
    re-read tens of GB); any other file is hashed.
    """
    paths = [spec.path] + [p for t in spec.tasks.values() for p in (t.data, t.head) if p]
    for t in spec.tasks.values():
        if t.metric == "lm_eval":
            paths += _harness_module(f"task {t.name!r}").local_data_files(t.data)
    for d in dict.fromkeys([spec.base, *spec.experts.values()]):
        paths += sorted(os.path.join(d, n) for n in os.listdir(d) if os.path.isfile(os.path.join(d, n)))
    known = known or {}
    out = {}
    for p in dict.fromkeys(paths):
        st = os.stat(p)
        entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        old = known.get(p)
        same = isinstance(old, Mapping) and all(old.get(k) == v for k, v in entry.items())
        out[p] = {"sha256": old["sha256"] if same else _sha256(p), **entry}
    return out


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def changed_files(recorded: Mapping[str, dict], current: Mapping[str, dict]) -> list[str]:
    """Files whose content hash differs between a run's record and now (added or removed ones too)."""

    def sha(files, p):
        return (files.get(p) or {}).get("sha256")

    return sorted(p for p in set(recorded) | set(current) if sha(recorded, p) != sha(current, p))


def as_dict(spec: Spec) -> dict[str, Any]:
    """JSON-able form of a spec (recorded in the run)."""
    return {
        **spec._asdict(),
        "tasks": {n: t._asdict() | {"stop": list(t.stop)} for n, t in spec.tasks.items()},
    }
