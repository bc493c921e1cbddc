"""lm-evaluation-harness tasks as HM3 objectives, and the harness's text rules both directions share.

A task YAML of the harness (e.g. ``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``), or a task
the harness registers by name (``{lm_eval: gsm8k}``; `find_task`: an include path's YAMLs, then the harness's
own), is loaded with the harness's own `TaskManager` (`hm3_jax.tasks.harness_loader`); a spec's harness task splits its evaluation documents
70 / 30 as JSONL rows are split, seeded with its data file's name (`HarnessTask.split_key`, `spec_data.split_rows`,
recorded by the run), and each split becomes an `Objective`
that the run's batched engine paths score like any other (`generation.generation_kernel` for
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

import glob
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from hm3_jax.tasks.generation import generation_kernel
from hm3_jax.tasks.multiple_choice import continuation_logprob_kernel, pack_multiple_choice
from hm3_jax.tasks.objectives import ArrayBundle, Objective
from hm3_jax.tasks.packing import pack_prompts

OUTPUT_TYPES = ("generate_until", "multiple_choice")
DEFAULT_MAX_GEN_TOKS = 256  # the harness's hf backend's


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
        """The name its documents' 70 / 30 split is seeded with (`spec_data.split_rows`): the file name of the one
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

    def objective(
        self,
        name: str,
        doc_ids: Sequence[int],
        tokenizer,
        eos_ids,
        batch_size: int,
        context_len: int,
        pad_id: int = 0,
    ) -> Objective:
        """`make_harness_objective` of this task."""
        return make_harness_objective(
            name, self, doc_ids, tokenizer, eos_ids, batch_size, context_len, pad_id
        )


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


def make_harness_objective(
    name: str,
    htask: HarnessTask,
    doc_ids: Sequence[int],
    tokenizer,
    eos_ids,
    batch_size: int,
    context_len: int,
    pad_id: int = 0,
) -> Objective:
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
        return _generation_objective(
            name, htask, doc_ids, requests, tokenizer, eos_ids, batch_size, context_len, pad_id, where
        )
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
        raise HarnessTaskError(
            f"{where}: a context + choice has {longest} tokens, more than the model's context of "
            f"{context_len} positions"
        )
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
        return _document_values(
            htask,
            doc_ids,
            [[(float(x), False) for x in rows[a:b]] for a, b in zip(offsets[:-1], offsets[1:], strict=True)],
        )

    def device_fn(forward):
        return continuation_logprob_kernel(forward, jax.tree.map(jnp.asarray, arrays))

    return Objective(
        name,
        "multiple_choice",
        device_fn,
        lambda raw: 100.0 * float(example_fn(raw).mean()),
        len(doc_ids),
        batch_size,
        continuation_logprob_kernel,
        ArrayBundle(arrays),
        example_fn,
    )


def _generation_objective(
    name, htask, doc_ids, requests, tokenizer, eos_ids, batch_size, context_len, pad_id, where
) -> Objective:
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
    arrays = {
        "prompt_ids": packed["prompt_ids"].reshape(shape),
        "prompt_mask": packed["prompt_mask"].reshape(shape),
        "new_tokens": np.zeros((max_new,), np.int32),
    }
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

    return Objective(
        name,
        "generated_exact_match",
        device_fn,
        lambda t: 100.0 * float(example_fn(t).mean()),
        num,
        batch_size,
        generation_kernel,
        ArrayBundle(arrays),
        example_fn,
    )
