"""lm-evaluation-harness tasks as HM3 objectives, and the harness's text rules both directions share.

A task YAML of the harness (e.g. ``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``), or a task
the harness registers by name (``{lm_eval: gsm8k}``; `find_task`: an include path's YAMLs, then the harness's
own), is loaded with the harness's own `TaskManager`; a spec's harness task splits its evaluation documents
70 / 30 as JSONL rows are split, seeded with its data file's name (`HarnessTask.split_key`, `spec.split_rows`,
recorded by the run), and each split becomes an `Objective`
that the run's batched engine paths score like any other (`objectives.generation_kernel` for
``generate_until``, `multiple_choice.continuation_logprob_kernel` for ``multiple_choice``; no request is sent
one at a time):

* prompts are the harness's own (`task.build_all_requests`: its description, few-shot examples and templates),
  tokenised by the harness's rules (`encode`, `encode_pair`);
* generations are the harness's text (`continuation_text`: to the first EOS inclusive, decoded without special
  tokens, cut at ``until`` + the EOS text), then the task's filter pipeline and ``process_results``;
  multiple-choice rows are summed continuation log-probabilities handed to ``process_results``;
* the score is 100 x the mean of the chosen metric over the split's documents (metrics the harness aggregates
  by their mean only; others are refused), so ``example_fn``'s per-document values bootstrap as 0/1
  correctness does.

These equal the harness's scores through `hm3_jax.evaluation.lm_eval_model` on the same documents
(tests/test_lm_eval.py). Needs the `lm-eval` package.
"""

from __future__ import annotations

import difflib
import functools
import glob
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import lm_eval.tasks
import numpy as np
from lm_eval.api.metrics import mean as harness_mean
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.tasks import TaskManager, get_task_dict
from lm_eval.tasks._yaml_loader import load_yaml

from hm3_jax.tasks.generation import generation_kernel
from hm3_jax.tasks.multiple_choice import continuation_logprob_kernel, pack_multiple_choice
from hm3_jax.tasks.objectives import ArrayBundle, Objective
from hm3_jax.tasks.packing import pack_prompts

OUTPUT_TYPES = ("generate_until", "multiple_choice")
DEFAULT_MAX_GEN_TOKS = 256  # the harness's hf backend's
REGISTRY_DIR = os.path.dirname(os.path.abspath(lm_eval.tasks.__file__))  # the harness's own task YAMLs


class HarnessTaskError(ValueError):
    """A harness task YAML that cannot be an objective; the message names the file."""


def prefix_token_id(tokenizer) -> int:
    """The token an empty context is replaced by: BOS, else EOS (the harness's hf backend)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode(
    tokenizer, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None
):
    """The harness's `tok_encode`: the tokenizer's own special-token rule unless `add_special_tokens` says
    (none added when `string` already starts with the prefix token's text), left-truncated to
    `left_truncate_len` tokens."""
    special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    prefix = tokenizer.decode(prefix_token_id(tokenizer))
    if add_special_tokens is None and prefix and string.startswith(prefix):
        special = {"add_special_tokens": False}
    ids = tokenizer.encode(string, **special)
    return ids[-left_truncate_len:] if left_truncate_len else ids


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of a ``loglikelihood`` request, as `TemplateLM.loglikelihood`: an empty
    context is the prefix token; else trailing context spaces move to the continuation and the continuation
    ids are ids(context + continuation) after ids(context)."""
    if context == "":
        cont = encode(tokenizer, continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        return ([prefix], cont) if prefix != cont[0] else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = encode(tokenizer, context + continuation), encode(tokenizer, context)
    return ctx, whole[len(ctx) :]


def continuation_text(tokenizer, tokens: Sequence[int], eos_ids: Sequence[int], until: Sequence[str]) -> str:
    """The harness's text of generated `tokens`: up to and including the first EOS id (transformers'
    ``generate`` emits it, then padding), decoded without special tokens, cut before the first occurrence of
    each stop string in turn (`postprocess_generated_text`), not stripped."""
    tokens, eos = [int(t) for t in tokens], set(int(e) for e in eos_ids)
    end = next((j + 1 for j, t in enumerate(tokens) if t in eos), len(tokens))
    return postprocess_generated_text(
        tokenizer.decode(tokens[:end], skip_special_tokens=True), list(until), None
    )


def generation_settings(gen_kwargs: dict, tokenizer, where: str) -> tuple[list[str], int]:
    """(stop strings incl. the EOS token's text, max_gen_toks) of a request's generation kwargs; sampling is
    refused (hm3_jax decodes greedily)."""
    kwargs = normalize_gen_kwargs(gen_kwargs, DEFAULT_MAX_GEN_TOKS)
    if kwargs.get("do_sample"):
        raise HarnessTaskError(f"{where} asks for sampling ({gen_kwargs}); hm3_jax decodes greedily")
    eos_text = tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False)
    return handle_stop_sequences(kwargs.pop("until", None), eos=eos_text), int(kwargs.pop("max_gen_toks"))


class HarnessTask(NamedTuple):
    """A loaded harness task: yaml (absolute path), name, task (lm_eval's Task), requests (per evaluation
    document, its Instances in the harness's order), filter (the filter pipeline scored), metric."""

    yaml: str
    name: str
    task: Any
    requests: list
    filter: str
    metric: str

    @property
    def output_type(self) -> str:
        return self.task.OUTPUT_TYPE

    @property
    def split_key(self) -> str:
        """The name its documents' 70 / 30 split is seeded with (`spec.split_rows`): the file name of the one
        local data file its evaluation split reads, as a JSONL task over that file is seeded, so the two split
        the same rows alike (document i is row i when the task keeps every row in order: no filtering
        ``process_docs``); else (remote data, several files) the task's name."""
        config = self.task.config
        split = config.test_split if self.task.has_test_docs() else config.validation_split
        kwargs = config.dataset_kwargs or {}
        files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
        files = files.get(split) if isinstance(files, dict) else files
        files = [files] if isinstance(files, str) else list(files or [])
        if len(files) == 1 and "://" not in str(files[0]) and not glob.has_magic(str(files[0])):
            return os.path.basename(str(files[0]))
        return self.name

    def objective(self, name: str, doc_ids: Sequence[int], tokenizer, eos_ids, batch_size: int, context_len: int,
                  pad_id: int = 0) -> Objective:  # fmt: skip
        """`make_harness_objective` of this task."""
        return make_harness_objective(
            name, self, doc_ids, tokenizer, eos_ids, batch_size, context_len, pad_id
        )


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
        raise HarnessTaskError(f"no harness task {name!r} in {where}" +
                               (f"; close matches: {', '.join(close)}" if close else ""))  # fmt: skip
    if entry.kind.name not in ("TASK", "PY_TASK"):
        listed = (entry.cfg or {}).get(
            "task"
        )  # a group's own list (names or inline configs); a tag's: tagged
        members = [m for m in (listed if isinstance(listed, list) else []) if isinstance(m, str)] or sorted(
            n for n, e in manager.task_index.items() if name in getattr(e, "tags", ())
        )
        members = members[:6]
        raise HarnessTaskError(f"{name!r} is a harness {entry.kind.name.lower()} (several tasks), not one task; "
                               f"name one of its tasks{f' (e.g. {members})' if members else ''}")  # fmt: skip
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


def load_harness_task(yaml_path: str | None, filter_name: str | None = None, metric: str | None = None,
                      name: str | None = None, include_path: str | None = None) -> HarnessTask:  # fmt: skip
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
        raise HarnessTaskError(f"{yaml_path}: output_type {task.OUTPUT_TYPE!r} is not supported as an objective "
                               f"(supported: {', '.join(OUTPUT_TYPES)})")  # fmt: skip
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
        raise HarnessTaskError(f"{yaml_path}: metric {metric!r} is not aggregated by its mean; HM3 objectives "
                               "need per-document values whose mean is the score")  # fmt: skip
    return HarnessTask(yaml_path, names[0], task, requests, filter_name, metric)


def _document_values(htask: HarnessTask, doc_ids: Sequence[int], responses: Sequence[list]) -> np.ndarray:
    """float64 [N]: the metric of each document, from its requests' raw responses (one per request) through the
    task's filter pipeline and `process_results`."""
    ensemble = next(f for f in htask.task._filters if f.name == htask.filter)
    docs = [htask.requests[d][0].doc for d in doc_ids]
    flat = [[r] for resp in responses for r in resp]  # one [response] per request, in document order
    flat_docs = [doc for doc, resp in zip(docs, responses, strict=True) for _ in resp]
    for f in ensemble.filters:
        flat = list(f().apply(flat, flat_docs))
    values, k = [], 0
    for doc, resp in zip(docs, responses, strict=True):
        results = htask.task.process_results(doc, flat[k : k + len(resp)])
        values.append(float(results[htask.metric]))
        k += len(resp)
    return np.asarray(values, np.float64)


def make_harness_objective(name: str, htask: HarnessTask, doc_ids: Sequence[int], tokenizer, eos_ids,
                           batch_size: int, context_len: int, pad_id: int = 0) -> Objective:  # fmt: skip
    """The objective of documents `doc_ids` of a harness task (module docstring): metric
    "generated_exact_match" (a decode objective) for ``generate_until``, "multiple_choice" for
    ``multiple_choice``; host_fn = 100 x the mean of the per-document metric values (example_fn).

    Args:
      name: "<task>/<split>"; htask: `load_harness_task`; doc_ids: documents of the split;
      tokenizer: the model's transformers tokenizer; eos_ids: generation stops at these;
      batch_size: rows per forward / decode call; context_len: the model's context (contexts are
        left-truncated to leave room for the generation, as the harness does); pad_id: padding id.
    """
    doc_ids = [int(d) for d in doc_ids]
    where = f"{htask.yaml} ({name})"
    if not doc_ids:
        raise HarnessTaskError(f"{where}: no documents")
    requests = [htask.requests[d] for d in doc_ids]
    if htask.output_type == "generate_until":
        return _generation_objective(name, htask, doc_ids, requests, tokenizer, eos_ids, batch_size, context_len,
                                     pad_id, where)  # fmt: skip
    prompt_ids, choice_ids = [], []
    for reqs in requests:
        pairs = [encode_pair(tokenizer, *r.args) for r in reqs]
        if len({tuple(c) for c, _ in pairs}) != 1 or any(not y for _, y in pairs):
            raise HarnessTaskError(
                f"{where}: document {reqs[0].doc_id}'s choices need one context and >= 1 token each"
            )
        prompt_ids.append(pairs[0][0])
        choice_ids.append([y for _, y in pairs])
    longest = max(len(p) + len(c) for p, cs in zip(prompt_ids, choice_ids, strict=True) for c in cs)
    if longest > context_len:
        raise HarnessTaskError(f"{where}: a context + choice has {longest} tokens, more than the model's context of "
                               f"{context_len} positions")  # fmt: skip
    arrays, order, offsets = pack_multiple_choice(prompt_ids, choice_ids, pad_id, batch_size, name=name)
    r_pad = sum(ids.shape[0] * ids.shape[1] for ids in arrays["input_ids"])
    inverse = np.argsort(order)  # bucketed position of each document-major row

    def example_fn(raw) -> np.ndarray:
        raw = np.asarray(raw)
        if raw.shape != (r_pad,):
            raise ValueError(
                f"{name}: expected summed log-probabilities of shape ({r_pad},), got {raw.shape}"
            )
        rows = raw[inverse]
        return _document_values(htask, doc_ids, [[(float(x), False) for x in rows[a:b]]
                                                 for a, b in zip(offsets[:-1], offsets[1:], strict=True)])  # fmt: skip

    def device_fn(forward):
        return continuation_logprob_kernel(forward, jax.tree.map(jnp.asarray, arrays))

    return Objective(name, "multiple_choice", device_fn, lambda raw: 100.0 * float(example_fn(raw).mean()),
                     len(doc_ids), batch_size, continuation_logprob_kernel, ArrayBundle(arrays), example_fn)  # fmt: skip


def _generation_objective(name, htask, doc_ids, requests, tokenizer, eos_ids, batch_size, context_len, pad_id,
                          where) -> Objective:  # fmt: skip
    kwargs = {repr(sorted(r.args[1].items())) for reqs in requests for r in reqs}
    if len(kwargs) != 1 or any(len(reqs) != 1 for reqs in requests):
        raise HarnessTaskError(f"{where}: every document needs one request with the same generation kwargs")
    until, max_new = generation_settings(requests[0][0].args[1], tokenizer, where)
    room = context_len - max_new
    if room < 1:
        raise HarnessTaskError(
            f"{where}: max_gen_toks={max_new} leaves no room in the model's {context_len} positions"
        )
    prompts = [encode(tokenizer, reqs[0].args[0], left_truncate_len=room) for reqs in requests]
    longest = max(len(p) for p in prompts)
    packed = pack_prompts(prompts, pad_id, batch_size, min(-(-longest // 8) * 8, room), name=name)
    n_pad, width = packed["prompt_ids"].shape
    shape = (n_pad // batch_size, batch_size, width)
    arrays = {"prompt_ids": packed["prompt_ids"].reshape(shape), "prompt_mask": packed["prompt_mask"].reshape(shape),
              "new_tokens": np.zeros((max_new,), np.int32)}  # fmt: skip
    num = len(doc_ids)

    def example_fn(tokens) -> np.ndarray:
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[0] not in (num, n_pad):
            raise ValueError(
                f"{name}: expected tokens of shape ({num}, T) or ({n_pad}, T), got {tokens.shape}"
            )
        texts = [[continuation_text(tokenizer, row, eos_ids, until)] for row in tokens[:num]]
        return _document_values(htask, doc_ids, texts)

    def device_fn(decode_fn):
        return generation_kernel(decode_fn, jax.tree.map(jnp.asarray, arrays))[:num]

    return Objective(name, "generated_exact_match", device_fn, lambda t: 100.0 * float(example_fn(t).mean()), num,
                     batch_size, generation_kernel, ArrayBundle(arrays), example_fn)  # fmt: skip
