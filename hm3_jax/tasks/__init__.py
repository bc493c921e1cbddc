"""The built-in tiny3 benchmark: task generators, tokenizer, metrics, objectives and the zoo.

Tasks (column order of every score matrix): ``translation`` (chrF), ``math`` (exact match), ``code`` (exact
match). See docs/tiny3.md.
"""

from hm3_jax.tasks.data import SPLITS, TASK_NAMES, generate_all, generate_task, task_metric
from hm3_jax.tasks.objectives import Objective
from hm3_jax.tasks.scoring import score_model, score_path
from hm3_jax.tasks.tiny3_zoo import make_objective
from hm3_jax.tasks.zoo import Zoo, build_or_load

__all__ = [
    "SPLITS",
    "TASK_NAMES",
    "Objective",
    "Zoo",
    "build_or_load",
    "generate_all",
    "generate_task",
    "make_objective",
    "score_model",
    "score_path",
    "task_metric",
]
