"""The HM3 paper's language tasks and budget, shared by its real-scale configs (qwen25_1p5b.py, llama2_7b.py).

Objectives (one per expert, in this order): ``chat`` (general / translation), ``math``, ``code``; the paper's
tasks (NeurIPS 2025, "Datasets": translation by chrF and XNLI by accuracy; GSM8K and MathQA; HumanEval and MBPP)
as spec tasks:

| task | objective | public set (split) | metric | row |
| --- | --- | --- | --- | --- |
| ``wmt16_de_en`` | chat | ``wmt16`` de-en (test, first 1000) | chrf | prompt ``"Translate German to English.\\nGerman: {de}\\nEnglish:"``, target ``" {en}"``, stop ``["\\n"]`` |
| ``xnli_en`` | chat | ``xnli`` en (test, first 1000) | multiple_choice | lm-eval's: prompt ``premise + ","``, choices ``[" right? Yes, " + hypothesis, " right? Also, " + hypothesis, " right? No, " + hypothesis]``, answer = label |
| ``gsm8k`` | math | ``gsm8k`` main (test, 1319) | exact_match | 4-shot answer-only: 4 train questions each followed by ``"\\nAnswer: The answer is N.\\n\\n"``, then the question and ``"\\nAnswer:"``; target ``" The answer is N."`` (N after ``####``), stop ``["\\n"]``, max_new_tokens 16 |
| ``mathqa`` | math | ``math_qa`` (test, 2985) | multiple_choice | prompt ``"Question: {Problem}\\nAnswer:"``, choices the five options as lm-eval splits them (``" 38"``, ...), answer = index of ``correct`` |
| ``humaneval`` | code | ``openai_humaneval`` (test, 164) | chrf | prompt = ``prompt`` (signature + docstring), target = ``canonical_solution``, stop ``["\\ndef ", "\\nclass ", "\\nif __name__", "\\nprint("]``, max_new_tokens 384 |
| ``mbpp`` | code | ``mbpp`` full (test, 500) | chrf | prompt ``"{text}\\n{test_list joined by newlines}\\n"``, target = ``code``, stop as humaneval, max_new_tokens 256 |

Differences from the paper, stated: the spec has no code-execution metric, so HumanEval and MBPP are scored by
chrF of the generated body against the reference solution (a similarity proxy, not pass@1); GSM8K is exact
match of the final answer in a fixed format (4-shot, no chain of thought; the paper's "flexible match" extracts
the last number of a chain of thought, which the spec's metrics do not do). Every task's rows are split 70 / 30
(search / held-out) by the run's seeded shuffle; give a row ``"split"`` to pin it.

Writing the JSONL files (run once where the Hugging Face hub is reachable; `datasets` is not a dependency):

    import json, os, datasets
    os.makedirs("data", exist_ok=True)
    def write(name, rows):
        with open(f"data/{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\\n" for r in rows)
    wmt = datasets.load_dataset("wmt16", "de-en", split="test").select(range(1000))
    write("wmt16_de_en", [{"prompt": f"Translate German to English.\\nGerman: {r['translation']['de']}\\nEnglish:",
                           "target": " " + r["translation"]["en"]} for r in wmt])
    xnli = datasets.load_dataset("xnli", "en", split="test").select(range(1000))
    write("xnli_en", [{"prompt": r["premise"] + ",", "choices": [f" right? {w}, {r['hypothesis']}"
                       for w in ("Yes", "Also", "No")], "answer": r["label"]} for r in xnli])
    gsm = datasets.load_dataset("gsm8k", "main")
    answer = lambda a: a.split("####")[-1].strip().replace(",", "")
    shots = "".join(f"{r['question']}\\nAnswer: The answer is {answer(r['answer'])}.\\n\\n" for r in gsm["train"].select(range(4)))
    write("gsm8k", [{"prompt": shots + r["question"] + "\\nAnswer:", "target": f" The answer is {answer(r['answer'])}."}
                    for r in gsm["test"]])
    mqa = datasets.load_dataset("math_qa", split="test")
    opts = lambda o: [c.split(")", 1)[1].strip().rstrip(",").strip() for c in o.split(" , ")]  # lm-eval's split
    write("mathqa", [{"prompt": f"Question: {r['Problem']}\\nAnswer:", "choices": [" " + c for c in opts(r["options"])],
                      "answer": "abcde".index(r["correct"])} for r in mqa])
    he = datasets.load_dataset("openai_humaneval", split="test")
    write("humaneval", [{"prompt": r["prompt"], "target": r["canonical_solution"]} for r in he])
    mbpp = datasets.load_dataset("mbpp", "full", split="test")
    write("mbpp", [{"prompt": r["text"] + "\\n" + "\\n".join(r["test_list"]) + "\\n", "target": r["code"]} for r in mbpp])

and the spec's ``tasks:`` block (`SPEC_TASKS`; the configs' docstrings give the rest of the spec):

    tasks:
      wmt16_de_en: {data: data/wmt16_de_en.jsonl, metric: chrf, objective: chat, stop: ["\\n"]}
      xnli_en: {data: data/xnli_en.jsonl, metric: multiple_choice, objective: chat}
      gsm8k: {data: data/gsm8k.jsonl, metric: exact_match, objective: math, stop: ["\\n"], max_new_tokens: 16}
      mathqa: {data: data/mathqa.jsonl, metric: multiple_choice, objective: math}
      humaneval: {data: data/humaneval.jsonl, metric: chrf, objective: code, max_new_tokens: 384,
                  stop: ["\\ndef ", "\\nclass ", "\\nif __name__", "\\nprint("]}
      mbpp: {data: data/mbpp.jsonl, metric: chrf, objective: code, max_new_tokens: 256,
             stop: ["\\ndef ", "\\nclass ", "\\nif __name__", "\\nprint("]}

`TASKS` gives each task's longest rows in Llama-2 tokens (estimates from the sets' lengths; Qwen2.5's tokenizer
gives about 10-20 % fewer), which `:shapes` variants of the configs plan without any download.
"""

import os
import tempfile

import ml_collections

from experiments.configs import checkpoints
from hm3_jax.tasks.shape_spec import TaskShape, write_shape_spec

NUM_PREFERENCES = 15  # "N around 15 for three tasks" (HM3_SPEC)
EPISODES_PER_PREFERENCE = 1000  # the paper's RL budget per preference
NUM_ENVS = 64  # parallel episodes per PPO iteration (their paths are evaluated together)
SEARCH_EXAMPLES = (
    100  # examples per task a search scores (the whole search split confirms the best, confirm_top)
)

TASKS = {
    "wmt16_de_en": TaskShape("chrf", "chat", 1000, prompt_tokens=160, target_tokens=96),
    "xnli_en": TaskShape("multiple_choice", "chat", 1000, prompt_tokens=64, target_tokens=40, choices=3),
    "gsm8k": TaskShape("exact_match", "math", 1319, prompt_tokens=640, target_tokens=10, max_new_tokens=16),
    "mathqa": TaskShape("multiple_choice", "math", 2985, prompt_tokens=160, target_tokens=12, choices=5),
    "humaneval": TaskShape("chrf", "code", 164, prompt_tokens=512, target_tokens=384, max_new_tokens=384),
    "mbpp": TaskShape("chrf", "code", 500, prompt_tokens=384, target_tokens=256, max_new_tokens=256),
}


def add_paper_budget(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The paper's budget on a spec config (`checkpoints.get_config`'s, not its smoke variant): 15 preferences
    and EPISODES_PER_PREFERENCE episodes per preference for the one preference-conditioned policy
    (num_iterations = ceil(15 * 1000 / NUM_ENVS) PPO iterations of NUM_ENVS episodes), one preference's merged
    model held at a time; t_max = 2 L stays `checkpoints.py`'s. Searches score SEARCH_EXAMPLES examples per task."""
    config.preferences.num = NUM_PREFERENCES
    config.arch.rl.num_envs = NUM_ENVS
    config.arch.rl.num_iterations = -(-NUM_PREFERENCES * EPISODES_PER_PREFERENCE // NUM_ENVS)
    config.engine.search_examples = SEARCH_EXAMPLES
    # One preference's merged model (shell + pool of the K + 1 sources' blocks) held at a time, the others rebuilt
    # from their recipes when the search returns to them: memory flat in the 15 preferences
    # (hm3_jax/pipeline/preference_models.py); not part of the run's fingerprint.
    config.memory.resident_preferences = 1
    return config


def get_paper_config(
    arg: str | None, setting: str, hf_configs: dict, **shape_kwargs
) -> ml_collections.ConfigDict:
    """A paper setting's config: `checkpoints.get_config(arg)` plus `add_paper_budget` (not for ",smoke"). `arg`
    "shapes" first writes the setting's shape-only spec (`write_shape_spec` of `hf_configs` and TASKS, with
    `shape_kwargs`) to $TMPDIR/hm3_jax_shapes/`setting` and uses it."""
    if not (arg or "").split(",")[0].strip():
        raise ValueError(
            f"{setting}.py needs the spec file: --config=experiments/configs/{setting}.py:SPEC.yaml[,smoke] "
            "(or :shapes, to plan the setting without its checkpoints)"
        )
    if arg == "shapes":
        directory = os.path.join(tempfile.gettempdir(), "hm3_jax_shapes", setting)
        arg = write_shape_spec(directory, hf_configs, TASKS, **shape_kwargs)
    config = checkpoints.get_config(arg)
    if not (arg or "").endswith(",smoke"):
        config = add_paper_budget(config)
    return config
