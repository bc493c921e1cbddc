"""Finding and loading lm-evaluation-harness tasks: a task YAML, or a task the harness registers by name (an
include path's YAMLs searched first), loaded with the harness's own `TaskManager` as a `harness_task.HarnessTask`
(its evaluation documents' requests, the filter pipeline and metric scored). Needs the `lm-eval` package.
"""

from __future__ import annotations

import difflib
import functools
import glob
import os

import lm_eval.tasks
from lm_eval.api.metrics import mean as harness_mean
from lm_eval.tasks import TaskManager, get_task_dict
from lm_eval.tasks._yaml_loader import load_yaml

from hm3_jax.tasks.harness_task import OUTPUT_TYPES, HarnessTask, HarnessTaskError

REGISTRY_DIR = os.path.dirname(os.path.abspath(lm_eval.tasks.__file__))  # the harness's own task YAMLs


@functools.lru_cache(maxsize=4)
def _task_manager(dirs: tuple[str, ...]) -> TaskManager:
    """The harness's index of the task YAMLs under `dirs` (later directories override earlier ones); indexing
    the harness's own ~15k tasks takes ~8 CPU-s, so a process builds each index once."""
    return TaskManager(include_path=list(dirs), include_defaults=False)


def find_task(name: str, include_path: str | None = None) -> tuple[TaskManager, str]:
    """(manager, absolute YAML path) of the harness task registered as `name`: in `include_path`'s YAMLs
    (a `task: name` key) first, as `lm_eval --include_path` gives them precedence, then in the harness's own
    registry (`REGISTRY_DIR`, with `include_path` after it). Raises HarnessTaskError for an unknown name
    (listing close matches), a group or tag (several tasks), or a task without a YAML."""
    if not isinstance(name, str) or not name:
        raise HarnessTaskError(f"expected a harness task name, got {name!r}")
    if include_path is not None and not os.path.isdir(include_path):
        raise HarnessTaskError(f"include path {include_path} is not a directory")
    searches = ([(include_path,)] if include_path else []) + [
        (REGISTRY_DIR, *([include_path] if include_path else []))
    ]
    for dirs in searches:
        manager = _task_manager(dirs)
        entry = manager.task_index.get(name)
        if entry is not None:
            break
    where = f"the harness's registry{f' and {include_path}' if include_path else ''}"
    if entry is None:
        close = difflib.get_close_matches(name, manager.all_tasks, n=6, cutoff=0.6)
        raise HarnessTaskError(
            f"no harness task {name!r} in {where}" + (f"; close matches: {', '.join(close)}" if close else "")
        )
    if entry.kind.name not in ("TASK", "PY_TASK"):
        listed = (entry.cfg or {}).get(
            "task"
        )  # a group's own list (names or inline configs); a tag's: tagged
        members = [m for m in (listed if isinstance(listed, list) else []) if isinstance(m, str)] or sorted(
            n for n, e in manager.task_index.items() if name in getattr(e, "tags", ())
        )
        members = members[:6]
        raise HarnessTaskError(
            f"{name!r} is a harness {entry.kind.name.lower()} (several tasks), not one task; "
            f"name one of its tasks{f' (e.g. {members})' if members else ''}"
        )
    if entry.yaml_path is None:
        raise HarnessTaskError(f"harness task {name!r} has no YAML file in {where}")
    return manager, os.path.abspath(str(entry.yaml_path))


def local_data_files(yaml_path: str) -> list[str]:
    """Absolute paths of the local files a task YAML's ``dataset_kwargs.data_files`` names (every split; glob
    patterns expanded; relative paths against ``dataset_kwargs.data_dir``, else the working directory, as
    `datasets.load_dataset` resolves them; remote URLs and missing files left out): what its documents are
    read from, besides the YAML (`spec.file_hashes` hashes them)."""
    config = load_yaml(yaml_path, resolve_func=False)
    kwargs = config.get("dataset_kwargs") or {}
    files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    base = os.path.expanduser(str(kwargs.get("data_dir") or "")) if isinstance(kwargs, dict) else ""
    patterns = []
    for value in files.values() if isinstance(files, dict) else [files]:
        patterns += [value] if isinstance(value, str) else list(value or [])
    out = []
    for pattern in map(str, patterns):
        if "://" in pattern:
            continue
        path = os.path.abspath(os.path.join(base, os.path.expanduser(pattern)))
        out += sorted(glob.glob(path)) if glob.has_magic(path) else [path] if os.path.isfile(path) else []
    return list(dict.fromkeys(out))


def load_harness_task(
    yaml_path: str | None,
    filter_name: str | None = None,
    metric: str | None = None,
    name: str | None = None,
    include_path: str | None = None,
) -> HarnessTask:
    """The task of one harness YAML (the other YAMLs of its directory are indexed too: `include`s resolve),
    or the task registered as `name` (`find_task`: `include_path`'s YAMLs, then the harness's registry), with
    every evaluation document's requests built. `filter_name` / `metric`: which of the task's filter
    pipelines and metrics is the objective (default: the first of each)."""
    if name is not None:
        manager, yaml_path = find_task(name, include_path)
        names = [name]
    else:
        yaml_path = os.path.abspath(yaml_path)
        if not os.path.isfile(yaml_path):
            raise HarnessTaskError(f"harness task file {yaml_path} does not exist")
        manager = TaskManager(include_path=os.path.dirname(yaml_path), include_defaults=False)
        names = [
            n
            for n, e in manager.task_index.items()
            if e.yaml_path and os.path.abspath(e.yaml_path) == yaml_path
        ]
        if len(names) != 1:
            raise HarnessTaskError(
                f"{yaml_path}: expected one harness task (a `task:` key), found {names or 'none'}"
            )
    task = get_task_dict(names, manager)[names[0]]
    if task.OUTPUT_TYPE not in OUTPUT_TYPES:
        raise HarnessTaskError(
            f"{yaml_path}: output_type {task.OUTPUT_TYPE!r} is not supported as an objective "
            f"(supported: {', '.join(OUTPUT_TYPES)})"
        )
    task.build_all_requests(rank=0, world_size=1)
    by_doc: dict[int, list] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    requests = [sorted(by_doc[d], key=lambda i: i.idx) for d in sorted(by_doc)]
    filters = [f.name for f in task._filters]
    filter_name = filters[0] if filter_name is None else filter_name
    if filter_name not in filters:
        raise HarnessTaskError(f"{yaml_path}: no filter {filter_name!r} (the task's filters: {filters})")
    aggregations = task.aggregation()
    metric = next(iter(aggregations)) if metric is None else metric
    if metric not in aggregations:
        raise HarnessTaskError(
            f"{yaml_path}: no metric {metric!r} (the task's metrics: {list(aggregations)})"
        )
    if aggregations[metric] is not harness_mean:
        raise HarnessTaskError(
            f"{yaml_path}: metric {metric!r} is not aggregated by its mean; HM3 objectives "
            "need per-document values whose mean is the score"
        )
    return HarnessTask(yaml_path, names[0], task, requests, filter_name, metric)
