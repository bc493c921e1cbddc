"""Task "math": GSM8K-like multi-step arithmetic word problems with small numbers.

A problem starts with a quantity (1-9), applies 2 operations (60%) or 3 (40%) described in words (add 1-5, take
away 1-5 but never below zero, double at most once while the quantity is at most 10), and asks for the final
quantity. The small ranges keep the task learnable by a ~1M-parameter model in a few hundred steps. The answer is
the final number only (no chain of thought), so exact match of the target is exact match of the final number.

Prompt: ``"Q: <problem> A:"``; target: ``" <number>"``; metric: exact match (teacher-forced, see objectives).

Example: ``Q: Mia has 4 apples. She buys 3 more. Then she gives 2 to Sam. How many apples does Mia
have now? A:`` -> ``" 5"``.
"""

from __future__ import annotations

import numpy as np

NAME = "math"
METRIC = "exact_match"

NAMES = (("Mia", "She"), ("Sam", "He"), ("Ana", "She"), ("Tom", "He"), ("Lea", "She"), ("Ben", "He"))
FRIENDS = ("Max", "Ivy", "Joe", "Zoe", "Kim")
ITEMS = ("apples", "books", "coins", "pens", "cards", "shells", "stamps", "cookies")

_ADD = ("{p} buys {n} more.", "{p} finds {n} more.", "{f} gives {o} {n} more.")
_SUB = ("{p} gives {n} to {f}.", "{p} loses {n}.", "{p} sells {n}.")
_MUL = ("{p} doubles them.", "The number of {i} doubles.")


def sample(rng: np.random.Generator) -> tuple[str, str]:
    """Samples one problem.

    Args:
      rng: numpy generator (host-side data generation).

    Returns:
      (prompt, target) with target ``" <final number>"``.
    """
    name, pronoun = NAMES[rng.integers(len(NAMES))]
    friend = FRIENDS[rng.integers(len(FRIENDS))]
    item = ITEMS[rng.integers(len(ITEMS))]
    value = int(rng.integers(1, 10))
    sentences = [f"{name} has {value} {item}."]
    num_ops = 2 if rng.random() < 0.6 else 3
    used_mul = False
    for step in range(num_ops):
        kinds = ["add", "sub"] + ([] if used_mul or value > 10 else ["mul"])
        kind = kinds[rng.integers(len(kinds))]
        if kind == "sub" and value == 0:
            kind = "add"
        if kind == "add":
            n = int(rng.integers(1, 6))
            template = _ADD[rng.integers(len(_ADD))]
            value += n
        elif kind == "sub":
            n = int(rng.integers(1, min(5, value) + 1))
            template = _SUB[rng.integers(len(_SUB))]
            value -= n
        else:
            n = 2
            template = _MUL[rng.integers(len(_MUL))]
            value *= n
            used_mul = True
        obj = "her" if pronoun == "She" else "him"
        text = template.format(p=pronoun if step == 0 else pronoun.lower(), n=n, f=friend, o=obj, i=item)
        if step > 0:
            text = "Then " + (text[0].lower() + text[1:] if text.startswith("The ") else text)
        sentences.append(text)
    sentences.append(f"How many {item} does {name} have now?")
    return "Q: " + " ".join(sentences) + " A:", f" {value}"
