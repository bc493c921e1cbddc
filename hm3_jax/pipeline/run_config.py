"""What a run config may say, checked before anything is written: the known baselines and ablations, the
preferences (`make_preferences`), the architecture level's options and T_max against the models' depth.
Every mistake is a `ConfigError` whose message names the key."""

from __future__ import annotations

import jax
import numpy as np

from hm3_jax import moo
from hm3_jax.search import neighbourhood

REQUIRED_PARAM = (
    "task_arithmetic",
    "ties",
    "dare_ties",
    "consensus",
    "pcb",
    "tsv",
    "regmean",
    "fisher",
    "adamerging",
    "regmean_plusplus",
)
REQUIRED_PATH = ("ea", "moea", "grid_search", "differential_evolution")
# `config.ablations` (optional; a config without the key runs both): which ablations the run computes and reports.
# "no_param_level" is a second architecture level (RL over the experts' pool); "no_arch_level" is the parameter
# level's Theta(lambda) (no extra work). tiny3.py:smoke_mesh runs only the latter (fewer compilations).
ABLATIONS = ("no_param_level", "no_arch_level")


class ConfigError(ValueError):
    """The run config cannot run (an unknown name, a value out of range); the message names the key."""


def ablations(config) -> tuple:
    return tuple(config.get("ablations", ABLATIONS))


def make_preferences(cfg, num_tasks: int, key: jax.Array) -> np.ndarray:
    """[N, K] preferences: the balanced one first, then Dirichlet(1) samples or a Das-Dennis grid.

    `cfg.num` (dirichlet) counts the balanced preference: `num=1` is a run for the balanced preference alone.
    """
    balanced = np.full((1, num_tasks), 1.0 / num_tasks)
    check_preferences(cfg)
    if cfg.kind == "dirichlet":
        rest = np.zeros((0, num_tasks))
        if cfg.num > 1:
            rest = np.asarray(moo.dirichlet(key, cfg.num - 1, num_tasks), np.float64)
    else:  # das_dennis
        grid = moo.das_dennis(num_tasks, cfg.divisions)
        rest = grid[np.abs(grid - balanced).sum(1) > 1e-9]
    prefs = np.concatenate([balanced, rest]).astype(np.float32)
    return prefs / prefs.sum(1, keepdims=True)


def check_config(config) -> None:
    """The whole run config is usable (ConfigError naming the key otherwise), before anything is written."""
    unknown = [m for m in config.baselines.param_methods if m not in REQUIRED_PARAM]
    unknown += [m for m in config.baselines.path_methods if m not in REQUIRED_PATH]
    if unknown:
        raise ConfigError(f"unknown baseline method(s) {unknown}; known: {REQUIRED_PARAM + REQUIRED_PATH}")
    bad = [a for a in ablations(config) if a not in ABLATIONS]
    if bad:
        raise ConfigError(f"unknown ablation(s) {bad} in config.ablations; known: {ABLATIONS}")
    if config.arch.alignment not in ("none", "moment"):
        raise ConfigError(f"arch.alignment must be 'none' or 'moment', got {config.arch.alignment!r}")
    if config.param_level.pool_model not in ("paper", "tuned"):
        raise ConfigError(
            f"param_level.pool_model must be 'paper' or 'tuned', got {config.param_level.pool_model!r}"
        )
    try:  # before the parameter level runs, not when the neighbourhood refinement starts
        neighbourhood.check_neighbourhood(
            config.arch.get("neighbourhood_kinds", neighbourhood.MOVE_KINDS),
            config.arch.get("neighbourhood_order", "round_robin"),
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    start = config.arch.get("neighbourhood_start", "best")
    if start not in neighbourhood.NEIGHBOURHOOD_STARTS:
        raise ConfigError(
            f"arch.neighbourhood_start must be one of {neighbourhood.NEIGHBOURHOOD_STARTS}, got {start!r}"
        )
    for key in (
        "neighbourhood_evaluations",
        "neighbourhood_evaluations_per_layer",
        "confirm_neighbours",
        "distill_steps",
        "distill_learning_rate",
    ):
        if float(config.arch.get(key, 0)) < 0:
            raise ConfigError(f"arch.{key} must be >= 0, got {config.arch.get(key)}")
    check_preferences(config.preferences)
    zoo_layers = config.get("zoo", {}).get("model", {}).get("num_layers") if not config.get("spec") else None
    if zoo_layers is not None:  # a built-in zoo's depth is known before it is built
        check_t_max(config, zoo_layers)


def check_preferences(prefs) -> None:
    """ConfigError naming the key unless `config.preferences` can make preferences (`make_preferences`)."""
    if prefs.kind not in ("dirichlet", "das_dennis"):
        raise ConfigError(f"preferences.kind must be 'dirichlet' or 'das_dennis', got {prefs.kind!r}")
    if prefs.kind == "dirichlet" and int(prefs.num) < 1:
        raise ConfigError(f"preferences.num must be >= 1 (the balanced preference counts), got {prefs.num}")
    if prefs.kind == "das_dennis" and int(prefs.divisions) < 1:
        raise ConfigError(f"preferences.divisions must be >= 1, got {prefs.divisions}")


def check_t_max(config, num_layers: int) -> None:
    if config.arch.rl.t_max < num_layers:
        raise ConfigError(
            f"arch.rl.t_max={config.arch.rl.t_max} is smaller than the models' {num_layers} blocks: "
            f"Theta(lambda)'s own path would be cut; set --config.arch.rl.t_max >= {num_layers}"
        )
