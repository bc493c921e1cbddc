"""The objectives of a spec's tasks (`hm3_jax.tasks.spec`), built from its rows with the base's own tokenizer.

What a score means (HM3_SPEC "Decisions taken"; the same numbers transformers and lm-eval-harness give):
prompt ids are ``tokenizer(prompt)["input_ids"]`` with the base's own HF tokenizer (its special-token rule:
BOS for Llama, none for Qwen2 and GPT-2);

* ``exact_match``: greedy generation of at most `max_new_tokens` (default: the longest target's token count
  + 8), stopping at any EOS id of the base's generation_config.json (else config.json, else the tokenizer's)
  or at a `stop` string; decoded without special tokens, stripped, compared with the stripped target;
* ``chrf``: the same generation, sacrebleu corpus chrF of the stripped outputs against the stripped targets;
* ``multiple_choice``: per choice the summed log-probability of its continuation tokens (the ids of
  ``prompt + choice`` after the ids of ``prompt``, lm-eval's rule); the argmax is the prediction;
* ``lm_eval`` (``{lm_eval_yaml: ...}`` or ``{lm_eval: NAME}``): an lm-evaluation-harness task with its own
  documents (split as rows are, seeded with their data file's name), prompts, filters and metric
  (`hm3_jax.tasks.harness_task`; needs lm-eval).

A score is what transformers and lm-eval-harness give for the same model and rows.
"""

from __future__ import annotations

import numpy as np

from hm3_jax.tasks import accuracy, exact_match, generation, multiple_choice
from hm3_jax.tasks import spec as spec_lib
from hm3_jax.tasks.packing import round_up
from hm3_jax.tasks.spec import SpecError

EXTRA_NEW_TOKENS = 8  # default max_new_tokens = longest target + this


def pad_id_of(tokenizer) -> int:
    """The id padding rows use (never attended to or scored): pad, else eos, else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def load_harness_task(task):
    """The `harness_task.HarnessTask` of a spec's lm_eval task (imported here: lm-eval is an optional package;
    a harness YAML that cannot be used is a SpecError naming it)."""
    try:
        from hm3_jax.tasks import harness_loader
    except ImportError as e:
        raise SpecError(
            f"task {task.name!r} ({task.data}) is an lm-evaluation-harness task: install lm-eval "
            f"(pip install -e '.[lm_eval]'); {e}"
        ) from e
    try:
        return harness_loader.load_harness_task(
            task.data, task.lm_eval_filter, task.lm_eval_metric, task.lm_eval_task, task.lm_eval_include_path
        )
    except (ValueError, OSError, KeyError) as e:
        raise SpecError(f"task {task.name!r} ({task.data}): {e}") from e


def make_objectives(
    spec,
    data: dict,
    tokenizer,
    config,
    eos_ids,
    images=None,
    splits=spec_lib.SPLITS,
    shapes_from: dict | None = None,
    harness: dict | None = None,
) -> dict:
    """{split: {task: Objective}} of the spec's tasks on `data` ({task: {split: rows}}).

    Batches hold `spec.eval_batch_size` rows. A generation's `max_new_tokens` (when the task does not set it) is
    taken over every row of `shapes_from` (default `data`: both splits), so every split of a task generates
    alike; padded lengths (prompt, row) over the rows of `data` being built. Raises SpecError for a prompt (plus
    its generation budget) or a choice or target row longer than the model's context, naming task and row.
    `harness`: {lm_eval task: HarnessTask} already loaded (else each is loaded here).
    """
    shapes_from = shapes_from or data
    context = int(config.max_position_embeddings)
    pad = pad_id_of(tokenizer) if tokenizer is not None else 0
    batch = spec.eval_batch_size
    out = {s: {} for s in splits}
    classes = max((im["head"]["kernel"].shape[1] for im in (images or {}).values()), default=0)
    for name, task in spec.tasks.items():
        rows = {s: data[name][s] for s in splits}
        built = [r for s in splits for r in rows[s]]
        where = f"task {name!r} ({task.data})"
        if task.metric == "lm_eval":  # the harness's documents, prompts, filters and metric (harness_task)
            htask = (harness or {}).get(name) or load_harness_task(task)
            for s in splits:
                try:
                    out[s][name] = htask.objective(
                        f"{name}/{s}",
                        [r["row"] - 1 for r in rows[s]],
                        tokenizer,
                        eos_ids,
                        batch,
                        context,
                        pad,
                    )
                except ValueError as e:
                    raise SpecError(f"{where}: {e}") from e
            continue
        if task.metric == "accuracy":  # heads padded to the widest task's classes: one compilation for all
            im = images[name]
            for s in splits:
                idx = np.asarray([r["row"] - 1 for r in rows[s]], np.int64)
                out[s][name] = accuracy.make_accuracy_objective(
                    f"{name}/{s}",
                    im["pixel_values"][idx],
                    im["labels"][idx],
                    im["head"]["kernel"],
                    im["head"]["bias"],
                    batch,
                    classes,
                )
            continue
        if task.metric == "multiple_choice":
            enc = {id(r): _choice_rows(tokenizer, r, where) for r in built}
            longest = max(len(p) + max(map(len, c)) for p, c in enc.values())
            if longest > context:
                raise SpecError(
                    f"{where}: a prompt + choice has {longest} tokens, more than the model's context "
                    f"of {context} positions"
                )
            for s in splits:
                out[s][name] = multiple_choice.make_multiple_choice_objective(
                    f"{name}/{s}",
                    [enc[id(r)][0] for r in rows[s]],
                    [enc[id(r)][1] for r in rows[s]],
                    [r["answer"] for r in rows[s]],
                    pad,
                    batch,
                    min(round_up(longest, 8), context),
                )
            continue
        prompts = {id(r): tokenizer(r["prompt"])["input_ids"] for r in built}
        if task.metric == "exact_match_teacher_forced":  # [prompt ids] ++ [target ids alone] ++ [eos]
            pairs = {id(r): (prompts[id(r)], _encode(tokenizer, r["target"]) + [eos_ids[0]]) for r in built}
            worst = max(built, key=lambda r: sum(map(len, pairs[id(r)])))
            if sum(map(len, pairs[id(worst)])) > context:
                raise SpecError(
                    f"{where}, row {worst['row']}: prompt + target + EOS have "
                    f"{sum(map(len, pairs[id(worst)]))} tokens, more than the model's context of "
                    f"{context} positions"
                )
            for s in splits:
                out[s][name] = exact_match.make_exact_match_objective(
                    f"{name}/{s}", [pairs[id(r)] for r in rows[s]], pad, batch
                )
            continue
        every = [r for s in spec_lib.SPLITS for r in shapes_from[name].get(s, [])]
        new = (
            task.max_new_tokens or max(len(_encode(tokenizer, r["target"])) for r in every) + EXTRA_NEW_TOKENS
        )
        worst = max(built, key=lambda r: len(prompts[id(r)]))
        if len(prompts[id(worst)]) + new > context:
            raise SpecError(
                f"{where}, row {worst['row']}: the prompt has {len(prompts[id(worst)])} tokens; with "
                f"max_new_tokens={new} that is more than the model's context of {context} positions"
            )
        prompt_len = min(round_up(len(prompts[id(worst)]), 8), context - new)
        for s in splits:
            out[s][name] = generation.make_generation_objective(
                f"{name}/{s}",
                [prompts[id(r)] for r in rows[s]],
                [r["target"] for r in rows[s]],
                tokenizer,
                batch,
                task.metric,
                new,
                eos_ids,
                task.stop,
                prompt_len,
            )
    return out


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _choice_rows(tokenizer, row: dict, where: str) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, [continuation ids per choice]): continuation = ids(prompt + choice)[len(ids(prompt)):]."""
    prompt = tokenizer(row["prompt"])["input_ids"]
    conts = []
    for j, choice in enumerate(row["choices"]):
        whole = tokenizer(row["prompt"] + choice)["input_ids"]
        cont = whole[len(prompt) :]
        if not cont:
            raise SpecError(f"{where}, row {row['row']}: choice {j} ({choice!r}) adds no token to the prompt")
        conts.append(cont)
    return prompt, conts
