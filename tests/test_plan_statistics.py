"""The data-aware merges' statistics in the memory plan (issue 16; `pipeline/statistics_memory.py`).

A run with RegMean or Fisher merging (the upper level's menu or a baseline) keeps every expert's input Grams
and diagonal Fisher on device 0 once computed. On a tiny Llama-2-style spec the plan's bytes equal the statistics
`merging.model_grams` / `model_fishers` compute on that spec's calibration rows, and the Grams' part equals the
hand count from the config (every kernel's input dimension squared, float32); the plan lists the programs that
compute them and adds the statistics to every other program's resident bytes.
"""

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax import merging, models
from hm3_jax.pipeline import memory_plan, program_memory, statistics_memory
from hm3_jax.search import data_aware_menu
from hm3_jax.tasks import spec_zoo
from tests.test_host_sources import spec_path  # noqa: F401  (the fixture: a tiny Llama-2-style spec)


def _config(spec, param_methods=("regmean", "fisher")):
    from experiments.configs import llama2_7b

    config = llama2_7b.get_config(f"{spec},smoke")
    config.baselines.param_methods = tuple(param_methods)
    config.param_level.data_aware.enabled = False
    return config


def _parts(spec, config):
    tasks = spec_zoo.load_tasks(spec)
    experts = tuple(tasks.spec.experts)
    groups = tuple(experts.index(tasks.spec.tasks[t].objective) for t in tasks.spec.tasks)
    search = list(tasks.objectives["search"].values())
    return tasks, (tasks.base_config, len(experts), jnp.float32, search, groups, experts, config)


def test_settings_follow_the_menu_and_the_baselines():
    from experiments.configs import tiny3

    config = tiny3.get_config("smoke")
    assert statistics_memory.statistics_settings(config) == ((), 0, 1)  # no data-aware method anywhere
    config.baselines.param_methods = ("ties", "fisher", "tsv", "adamerging")  # only Fisher keeps statistics
    assert statistics_memory.statistics_settings(config) == (("fisher",), 32, 1)
    config.param_level.data_aware.enabled = True
    config.param_level.data_aware.calibration_rows = 64
    config.param_level.data_aware.fisher_num_samples = 2
    config.param_level.cmaes.enabled = False  # the menu extends the tuned variant only: not used
    assert statistics_memory.statistics_settings(config) == (("fisher",), 32, 1)
    config.param_level.cmaes.enabled = True
    assert statistics_memory.statistics_settings(config) == (("regmean", "fisher"), 64, 2)
    config.param_level.data_aware.methods = ("tsv",)
    config.baselines.param_methods = ()
    assert statistics_memory.statistics_settings(config) == ((), 0, 1)


def test_statistics_bytes_are_what_the_run_computes(spec_path):  # noqa: F811
    config = _config(spec_path)
    tasks, args = _parts(spec_path, config)
    base_config, K, _, search, groups, experts, _ = args
    planned = statistics_memory.statistics_bytes(K, statistics_memory.traced_statistics(*args))
    # what the run keeps: each expert's Grams and Fisher on its own calibration rows (random weights: the shapes)
    calibration = data_aware_menu.objective_calibration(base_config, search, groups, experts, 32)
    sources = [models.init(base_config, jax.random.PRNGKey(k)) for k in range(K)]
    grams = merging.model_grams(sources, calibration)
    fishers = merging.model_fishers(jax.random.PRNGKey(0), sources, calibration)
    assert planned == program_memory.tree_bytes(grams) + program_memory.tree_bytes(fishers)
    # by hand: q, k, v, o, gate, up read [h] (o: heads x head_dim = h), down [m]; the untied LM head [h]
    h, m, L = base_config.hidden_size, base_config.intermediate_size, base_config.num_layers
    assert program_memory.tree_bytes(grams) == K * 4 * (L * (6 * h * h + m * m) + h * h)
    f32_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(sources[0])) * 4
    assert program_memory.tree_bytes(fishers) == K * f32_params
    no_stats = statistics_memory.traced_statistics(*args[:-1], _config(spec_path, ("ties",)))
    assert no_stats == ({}, {}) and statistics_memory.statistics_bytes(K, no_stats) == 0


def test_the_plan_lists_the_programs_and_keeps_the_statistics_resident(spec_path):  # noqa: F811
    config = _config(spec_path)
    _, args = _parts(spec_path, config)
    stats = statistics_memory.statistics_bytes(args[1], statistics_memory.traced_statistics(*args))
    kinds = ("model_scores", "statistics")
    plan = memory_plan.plan_run(config, None, 1 << 30, programs=kinds, search_batch=False)
    without = memory_plan.plan_run(
        _config(spec_path, ("ties",)), None, 1 << 30, programs=kinds, search_batch=False
    )
    names = [p.name for p in plan.programs]
    assert names[-2:] == ["statistics/grams", "statistics/fisher"]
    assert [p.name for p in without.programs] == names[:-2]
    for p, q in zip(plan.programs, without.programs, strict=False):
        assert p.resident_bytes == q.resident_bytes + stats  # kept beside every later program
    grams, fisher = plan.programs[-2:]
    one_expert = args[1]
    # each program's output is one expert's statistic (the Grams with their token counts); the others resident
    assert fisher.output_bytes * one_expert + grams.output_bytes * one_expert >= stats
    model = program_memory.tree_bytes(program_memory.abstract_params(args[0], jnp.float32))
    # float32 model: the Fisher is the model's size (XLA adds the output tuple's table of pointers)
    assert model <= fisher.output_bytes <= model + 1024
    sources = (one_expert + 1) * model + program_memory.pool_copy_bytes(
        program_memory.abstract_params(args[0], jnp.float32), one_expert, sharded=False
    )
    assert fisher.resident_bytes == sources - model + stats - model  # less the argument and its own output
    assert "statistics/grams" in memory_plan.format_plan(plan)
