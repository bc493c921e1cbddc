"""The static settings of the architecture-level search: :class:`ArchConfig` (hashable, closed over by the
trainer's factories; never traced)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    """Static settings of the architecture-level search (hashable). See docs/arch.md for the chosen defaults.

    Problem: ``num_sources`` (K + 1), ``num_layers`` (L), ``num_tasks`` (K), ``t_min``, ``t_max``, ``beta1``.
    Rollout: ``num_envs`` episodes per iteration, ``k_nearest`` (M'), ``explore_eps``,
    ``preference_sampling`` ("given": uniform over the N preference vectors; "dirichlet": Dirichlet(1)).
    PPO: ``num_iterations``, ``update_epochs``, ``num_minibatches``, ``learning_rate``, ``max_grad_norm``,
    ``clip_eps``, ``vf_coef``, ``ent_coef``, ``gamma``, ``gae_lambda``.
    Network: ``hidden_size``, ``embed_size``, ``init_log_std``.
    Warm start: ``warm_start_source`` (-1: none), ``warm_start_steps`` and ``warm_start_learning_rate`` (0: the
    PPO ``learning_rate``) (see :func:`warm_start`).
    """

    num_sources: int
    num_layers: int
    num_tasks: int
    t_min: int = 1
    t_max: int = 8
    beta1: float = 0.1
    num_envs: int = 64
    k_nearest: int = 4
    explore_eps: float = 0.05
    preference_sampling: str = "given"
    num_iterations: int = 100
    update_epochs: int = 4
    num_minibatches: int = 4
    learning_rate: float = 1e-3
    max_grad_norm: float = 0.5
    clip_eps: float = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    gamma: float = 0.99
    gae_lambda: float = 0.95
    hidden_size: int = 64
    embed_size: int = 16
    init_log_std: float = -0.5
    warm_start_source: int = -1
    warm_start_steps: int = 0
    warm_start_learning_rate: float = 0.0

    def __post_init__(self):
        checks = {
            "num_sources >= 1": self.num_sources >= 1,
            "num_layers >= 1": self.num_layers >= 1,
            "num_tasks >= 1": self.num_tasks >= 1,
            "1 <= t_min <= t_max": 1 <= self.t_min <= self.t_max,
            "num_envs >= 1": self.num_envs >= 1,
            "k_nearest >= 1": self.k_nearest >= 1,
            "0 <= explore_eps <= 1": 0.0 <= self.explore_eps <= 1.0,
            "preference_sampling in ('given', 'dirichlet')": self.preference_sampling
            in ("given", "dirichlet"),
            "num_iterations >= 0": self.num_iterations >= 0,
            "update_epochs >= 1": self.update_epochs >= 1,
            "num_minibatches >= 1 dividing num_envs * t_max": self.num_minibatches >= 1
            and (self.num_envs * self.t_max) % self.num_minibatches == 0,
            "learning_rate > 0": self.learning_rate > 0,
            "0 < gamma <= 1": 0.0 < self.gamma <= 1.0,
            "0 <= gae_lambda <= 1": 0.0 <= self.gae_lambda <= 1.0,
            "-1 <= warm_start_source < num_sources": -1 <= self.warm_start_source < self.num_sources,
            "warm_start_steps >= 0": self.warm_start_steps >= 0,
            "warm_start_learning_rate >= 0": self.warm_start_learning_rate >= 0,
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid ArchConfig ({', '.join(failed)}): {self}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | Any) -> ArchConfig:
        """From a dict or ``ml_collections.ConfigDict``; unknown keys raise ``ValueError`` naming them."""
        items = dict(mapping.items()) if hasattr(mapping, "items") else dict(mapping)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(items) - names)
        if unknown:
            raise ValueError(f"unknown ArchConfig keys {unknown}; known: {sorted(names)}")
        return cls(**items)

    @property
    def pool_size(self) -> int:
        return self.num_sources * self.num_layers

    @property
    def num_actions(self) -> int:
        return self.pool_size + 1
