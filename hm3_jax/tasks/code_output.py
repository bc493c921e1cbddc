"""Task "code": predict what a short generated Python snippet prints.

Snippets come from a few families (integer arithmetic on variables, accumulating loops, list operations,
string repetition); the label is obtained by running the snippet with `exec` in-process. Only code generated
here is ever executed, with a minimal builtins table (no imports, no I/O besides a captured ``print``).

Prompt: ``"code:\\n<snippet>\\noutput:"``; target: ``" <printed line>"``; metric: exact
match (teacher-forced).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

NAME = "code"
METRIC = "exact_match"

_SAFE_BUILTINS = {
    "print": print,
    "range": range,
    "len": len,
    "sum": sum,
    "sorted": sorted,
    "max": max,
    "min": min,
}
_VARS = ("a", "b", "c", "x", "y", "n", "k")


def run_snippet(code: str) -> str:
    """Executes generated code and returns its stdout without the trailing newline.

    Args:
      code: Python source produced by this module's generators.

    Returns:
      What the snippet printed (exactly one line).

    Raises:
      ValueError: the snippet did not print exactly one line.
    """
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(compile(code, "<snippet>", "exec"), {"__builtins__": dict(_SAFE_BUILTINS)}, {})
    out = buffer.getvalue()
    if not out.endswith("\n") or out.count("\n") != 1:
        raise ValueError(f"snippet must print exactly one line, got {out!r} from:\n{code}")
    return out[:-1]


def _arith(rng: np.random.Generator) -> str:
    v1, v2 = (str(s) for s in rng.choice(_VARS, size=2, replace=False))
    a = int(rng.integers(1, 10))
    op1 = str(rng.choice(["+", "-", "*"], p=[0.4, 0.4, 0.2]))
    b = int(rng.integers(2, 4)) if op1 == "*" else int(rng.integers(1, 6))
    lines = [f"{v1} = {a}", f"{v2} = {v1} {op1} {b}"]
    choice = rng.integers(3)
    if choice == 0:
        lines.append(f"print({v2})")
    elif choice == 1:
        lines.append(f"print({v2} {rng.choice(['+', '-'])} {int(rng.integers(1, 6))})")
    else:
        lines.append(f"print({v1} + {v2})")
    return "\n".join(lines)


def _loop(rng: np.random.Generator) -> str:
    acc = str(rng.choice(["s", "t", "total"]))
    start = int(rng.integers(0, 4))
    n = int(rng.integers(2, 5))
    body = (f"{acc} = {acc} + i", f"{acc} = {acc} + {int(rng.integers(1, 4))}")[rng.integers(2)]
    return "\n".join([f"{acc} = {start}", f"for i in range({n}):", f"    {body}", f"print({acc})"])


def _list(rng: np.random.Generator) -> str:
    name = str(rng.choice(["xs", "nums", "items"]))
    values = [int(v) for v in rng.integers(0, 10, size=int(rng.integers(2, 4)))]
    lines = [f"{name} = {values}"]
    mutation = rng.integers(3)
    if mutation == 0:
        lines.append(f"{name}.append({int(rng.integers(0, 10))})")
    elif mutation == 1:
        lines.append(f"{name}.reverse()")
    query = (f"{name}", f"len({name})", f"{name}[0]", f"{name}[-1]", f"sum({name})", f"max({name})")[
        rng.integers(6)
    ]
    lines.append(f"print({query})")
    return "\n".join(lines)


def _string(rng: np.random.Generator) -> str:
    word = str(rng.choice(["ab", "xy", "ok", "hi", "no"]))
    times = int(rng.integers(2, 4))
    if rng.random() < 0.5:
        return "\n".join([f'w = "{word}"', f"print(w * {times})"])
    other = str(rng.choice(["z", "q", "!"]))
    return "\n".join([f'w = "{word}"', f'w = w + "{other}"', f"print(w * {times})"])


_FAMILIES = (_arith, _loop, _list, _string)
_FAMILY_WEIGHTS = (0.3, 0.2, 0.4, 0.1)


def sample(rng: np.random.Generator) -> tuple[str, str]:
    """Samples one snippet and its output.

    Args:
      rng: numpy generator (host-side data generation).

    Returns:
      (prompt, target): ``"code:\\n<snippet>\\noutput:"`` and ``" <printed line>"``.
    """
    family = _FAMILIES[rng.choice(len(_FAMILIES), p=_FAMILY_WEIGHTS)]
    code = family(rng)
    return f"code:\n{code}\noutput:", f" {run_snippet(code)}"
