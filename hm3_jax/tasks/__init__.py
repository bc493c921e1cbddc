"""The built-in tiny3 benchmark: task generators, tokenizer, metrics, objectives and the zoo.

Tasks (column order of every score matrix): ``translation`` (chrF), ``math`` (exact match), ``code`` (exact
match). See docs/tiny3.md.
"""

from hm3_jax.tasks.data import SPLITS, TASK_NAMES, generate_all, generate_task, task_metric

__all__ = ["SPLITS", "TASK_NAMES", "generate_all", "generate_task", "task_metric"]
