"""The run spec (hm3_jax/tasks/spec.py): parsing, the seeded split, and one clear error per mistake."""

import hashlib
import json
import os

import numpy as np
import pytest

from hm3_jax.tasks import spec as spec_lib
from hm3_jax.tasks import spec_data
from hm3_jax.tasks.spec import SpecError


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _jsonl(path, rows):
    _write(path, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


@pytest.fixture
def spec_dir(tmp_path):
    for d in ("base", "experts/math", "experts/code"):
        os.makedirs(tmp_path / d)
    _jsonl(tmp_path / "data/gsm.jsonl", [{"prompt": f"q{i}", "target": f"a{i}"} for i in range(20)])
    _jsonl(tmp_path / "data/choice.jsonl",
           [{"prompt": f"p{i}", "choices": ["x", "y"], "answer": i % 2} for i in range(10)])  # fmt: skip
    return tmp_path


GOOD = """
base: base
experts:
  math: experts/math
  code: experts/code
tasks:
  gsm: {data: data/gsm.jsonl, metric: exact_match, objective: math, max_new_tokens: 32}
  gsm_chrf: {data: data/gsm.jsonl, metric: chrf, objective: math, stop: ["\\n\\n"]}
  code: {data: data/choice.jsonl, metric: multiple_choice}
"""


def _spec(spec_dir, text=GOOD):
    _write(spec_dir / "spec.yaml", text)
    return spec_lib.load_spec(str(spec_dir / "spec.yaml"))


def test_parses_paths_objectives_and_defaults(spec_dir):
    s = _spec(spec_dir)
    assert s.objectives == ("math", "code")
    assert s.base == str(spec_dir / "base") and s.experts["code"] == str(spec_dir / "experts/code")
    assert [t.objective for t in s.tasks.values()] == ["math", "math", "code"]  # default: the task's name
    assert s.tasks["gsm"].max_new_tokens == 32 and s.tasks["gsm_chrf"].stop == ("\n\n",)
    assert s.tasks_of("math") == ["gsm", "gsm_chrf"]
    assert (s.tokenizer_source, s.dtype, s.eval_batch_size) == (None, "float32", 16)
    json.dumps(spec_lib.as_dict(s))  # recordable in the run


def test_seeded_split_is_70_30_reproducible_and_honours_given_splits(spec_dir):
    s = _spec(spec_dir)
    task = s.tasks["gsm"]
    rows = spec_data.read_rows(task)
    a, b = spec_data.split_rows(task, rows, 0), spec_data.split_rows(task, rows, 0)
    assert a == b and (len(a["search"]), len(a["heldout"])) == (14, 6)
    assert sorted(a["search"] + a["heldout"]) == list(range(20))
    assert spec_data.split_rows(task, rows, 1) != a
    # two tasks reading one file split it alike
    assert spec_data.split_rows(s.tasks["gsm_chrf"], rows, 0) == a
    rows[0]["split"], rows[1]["split"] = "heldout", "search"
    c = spec_data.split_rows(task, rows, 0)
    assert 0 in c["heldout"] and 1 in c["search"] and len(c["search"]) + len(c["heldout"]) == 20
    assert rows[3]["row"] == 4  # 1-based line numbers for error messages


def test_file_hashes_change_with_content(spec_dir):
    s = _spec(spec_dir)
    _write(spec_dir / "base/config.json", "{}")
    before = spec_lib.file_hashes(s)
    assert str(spec_dir / "base/config.json") in before and s.path in before
    assert before[s.path]["sha256"] == hashlib.sha256(open(s.path, "rb").read()).hexdigest()
    _write(spec_dir / "base/config.json", '{"x": 1}')
    assert spec_lib.changed_files(before, spec_lib.file_hashes(s)) == [str(spec_dir / "base/config.json")]
    # a recorded hash is reused while a file's size and mtime are unchanged; a changed stat re-reads the file
    fake = {p: dict(e, sha256="recorded") for p, e in spec_lib.file_hashes(s).items()}
    assert {e["sha256"] for e in spec_lib.file_hashes(s, fake).values()} == {"recorded"}
    os.utime(s.path, ns=(1, 1))
    again = spec_lib.file_hashes(s, fake)
    assert again[s.path]["sha256"] == before[s.path]["sha256"] and spec_lib.changed_files(fake, again) == [
        s.path
    ]


@pytest.mark.parametrize(
    "text, match",
    [
        ("[1, 2]", "must be a YAML mapping"),
        ("base: [unclosed", "not valid YAML"),
        ("base: base\nexperts: {math: experts/math}\n", "missing key 'tasks'"),
        (GOOD + "seed: 3\n", r"unknown key\(s\) \['seed'\]"),
        (GOOD.replace("base: base", "base: nowhere"), r"base: directory .*nowhere does not exist"),
        (GOOD.replace("code: experts/code", "code: experts/none"), r"experts.code: directory"),
        (GOOD.replace("metric: chrf", "metric: bleu"), r"tasks.gsm_chrf: unknown metric 'bleu'"),
        (GOOD.replace("objective: math, max", "objective: physics, max"), r"tasks.gsm.objective: .*'physics' has no expert"),
        (GOOD.replace("data/choice.jsonl", "data/missing.jsonl"), r"tasks.code.data: file .*missing.jsonl"),
        (GOOD.replace("max_new_tokens: 32", "max_new_tokens: 0"), r"tasks.gsm.max_new_tokens: must be a positive"),
        (GOOD.replace("metric: exact_match,", "metric: exact_match, temperature: 1,"), r"tasks.gsm: unknown key"),
        (GOOD.replace("code: {data: data/choice.jsonl, metric: multiple_choice}", "other: {data: data/choice.jsonl, "
                      "metric: multiple_choice, objective: math}"), r"expert\(s\) \['code'\] have no task"),
        (GOOD + "tokenizer_source: union\n", "tokenizer_source must be 'base'"),
        (GOOD + "dtype: float16\n", "dtype must be one of"),
        (GOOD + "eval_batch_size: 0\n", "eval_batch_size must be a positive integer"),
        (GOOD.replace("metric: multiple_choice}", "metric: multiple_choice, stop: [x]}"), r"tasks.code: max_new_tokens and stop apply to generation metrics"),
    ],
)  # fmt: skip
def test_bad_spec_names_the_key(spec_dir, text, match):
    with pytest.raises(SpecError, match=match):
        _spec(spec_dir, text)


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        spec_lib.load_spec(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize(
    "file, row, match",
    [
        ("gsm", "{not json", r"gsm.jsonl:3: not valid JSON"),
        ("gsm", {"prompt": "q"}, r"gsm.jsonl:3: missing field 'target'"),
        ("gsm", {"prompt": "q", "target": 3}, r"gsm.jsonl:3: field 'target' must be a string"),
        ("gsm", {"prompt": "q", "target": "a", "split": "train"}, r"gsm.jsonl:3: field 'split' must be one of"),
        ("choice", {"prompt": "p", "choices": [], "answer": 0}, r"choice.jsonl:3: field 'choices' must be a non-empty"),
        ("choice", {"prompt": "p", "choices": ["a", "b"], "answer": 2}, r"choice.jsonl:3: answer index 2 is out of range"),
        ("choice", {"prompt": "p", "choices": ["a", "b"]}, r"choice.jsonl:3: field 'answer' must be an integer"),
        ("choice", {"prompt": "", "choices": ["a"], "answer": 0}, r"choice.jsonl:3: empty prompt"),
    ],
)  # fmt: skip
def test_bad_row_names_file_and_line(spec_dir, file, row, match):
    good = {"prompt": "q", "target": "a"} if file == "gsm" else {"prompt": "p", "choices": ["a"], "answer": 0}
    _jsonl(spec_dir / f"data/{file}.jsonl", [good, good, row, good])
    s = _spec(spec_dir)
    task = next(t for t in s.tasks.values() if t.data.endswith(f"{file}.jsonl"))
    with pytest.raises(SpecError, match=match):
        spec_data.read_rows(task)


def test_empty_split_is_an_error(spec_dir):
    _jsonl(spec_dir / "data/gsm.jsonl", [{"prompt": "q", "target": "a", "split": "search"}] * 3)
    s = _spec(spec_dir)
    rows = spec_data.read_rows(s.tasks["gsm"])
    with pytest.raises(SpecError, match=r"the 'heldout' split of task 'gsm' is empty \(3 rows\)"):
        spec_data.split_rows(s.tasks["gsm"], rows, 0)
    one = [{"prompt": "q", "target": "a"}]
    assert np.isclose(spec_data.SEARCH_FRACTION, 0.7)
    with pytest.raises(SpecError, match="is empty"):  # one row cannot fill two splits
        spec_data.split_rows(s.tasks["gsm"], [r | {"row": 1} for r in one], 0)
