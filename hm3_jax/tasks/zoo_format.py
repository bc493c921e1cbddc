"""What every zoo kind (tiny3: `hm3_jax.tasks.zoo`, tiny8: `hm3_jax.tasks.tiny8.zoo`) shares.

The loaded `Zoo`, the manifest's format (file name, format version, config fingerprint, reading it back) and the
statistics every manifest records: score matrices ``[1 + K, K]`` (rows: base then experts; columns: tasks) and
the task vectors' sizes. Both zoo builders import this module; `hm3_jax.tasks.zoo` dispatches to the kinds.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax.tasks import objectives, scoring

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class Zoo(NamedTuple):
    """A loaded zoo.

    Attributes:
      base: `hm3_jax.Model` of the base model.
      experts: {task: Model} in TASK_NAMES order (expert k is fine-tuned on task k).
      tokenizer: the zoo's `PreTrainedTokenizerFast`.
      data: {task: {split: [example dict, ...]}} for splits train/search/heldout.
      objectives: {split: {task: Objective}} for "search" and "heldout".
      manifest: the parsed manifest.json.
      workdir: the zoo directory.
    """

    base: Any
    experts: dict
    tokenizer: Any
    data: dict
    objectives: dict
    manifest: dict
    workdir: str

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.experts)


def config_dict(config) -> dict:
    """A zoo config (`ml_collections.ConfigDict` or mapping) as a plain dict."""
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dict(config)


def config_fingerprint(zoo_config) -> str:
    """SHA-256 (16 hex chars) of the canonical JSON of the zoo config plus the format version."""
    payload = json.dumps({"format": FORMAT_VERSION, "config": config_dict(zoo_config)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def score_matrix(models_list, split_objectives: Mapping[str, objectives.Objective]) -> np.ndarray:
    """Scores [len(models_list), num_tasks] of `Model`s on one split's objectives (task order kept)."""
    return np.array(
        [[scoring.score_model(m.config, m.params, o) for o in split_objectives.values()] for m in models_list]
    )


def tree_norm(tree) -> float:
    """Global L2 norm of a pytree."""
    return float(jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))))


def task_vector_ratios(base_params, expert_params_list) -> list[float]:
    """||tau_k|| / ||theta_base|| with tau_k = theta_k - theta_base (size of each expert's task vector)."""
    base_norm = tree_norm(base_params)
    return [tree_norm(jax.tree.map(jnp.subtract, p, base_params)) / base_norm for p in expert_params_list]


def read_manifest(workdir: str) -> dict | None:
    """The parsed manifest of a zoo directory, or None when there is none."""
    path = os.path.join(workdir, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)
