"""Which programs the memory plan compiles for the no-parameter-level ablation and the path baselines (issue 16).

The ablation and the path baselines score paths over `arch_level.no_param_level_model` (the experts' averaged
shell, expert 0 again in the last source slot) through the split engines' `with_model` copies: the same shapes
as HM3's preference pools, so the same programs, which `program_memory.engine_programs` plans as
``path_scores/<split>``. Checked on the smoke zoo against the plan's abstract trees and by lowering both engines'
programs. EA, MOEA and DE always pass junction rows (their DFS scale genes), another program: the plan lists it
as ``path_scores/<split>/junction`` unless HM3's own rows have junctions (`arch.alignment`).
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax import baselines, models
from hm3_jax.pipeline import baseline_runs, program_memory
from hm3_jax.search import arch_level, param_level
from hm3_jax.search.problem import make_problem, pool_for

_shapes = lambda tree: jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), tree)  # noqa: E731


def test_the_ablation_model_has_the_planned_shapes_and_programs(smoke_zoo_dir):
    from experiments.configs import tiny3
    from hm3_jax.tasks import zoo as zoo_lib

    config = tiny3.get_config("smoke")
    zoo = zoo_lib.load_matching(config.zoo, smoke_zoo_dir)
    problem = make_problem(
        zoo, config.engine.strategy, config.engine.chunk_size, config.engine.prefix_sharing
    )
    K = len(problem.experts)
    shell, pool = arch_level.no_param_level_model(problem)
    abstract = program_memory.abstract_params(problem.config, jnp.float32)
    assert _shapes(shell) == _shapes(models.shell_of(abstract))
    assert _shapes(pool) == _shapes(program_memory.abstract_pool(abstract, K))
    assert models.pool_size(pool) == (K + 1) * problem.config.num_layers

    # the ablation's engines (the path baselines' evaluator) and a preference's engine lower to one program
    evaluator = baseline_runs.ExpertPathEvaluator(problem, shell, pool)
    theta = param_level.paper_merge(problem, np.array([0.5, 0.3, 0.2]), jax.random.PRNGKey(0), 0.7, 0.3)
    hm3 = problem.engines["search"].with_model(
        models.shell_of(theta), pool_for(problem, theta), pool_id="theta"
    )
    t_max = config.arch.rl.t_max
    for junction in (False, True):
        assert (
            evaluator.search.lower_plain(t_max, junction).as_text()
            == hm3.lower_plain(t_max, junction).as_text()
        )
    assert evaluator.search.lower_tree(t_max).as_text() == hm3.lower_tree(t_max).as_text()
    # junction rows are another program (and another prefix-tree program)
    assert hm3.lower_plain(t_max, True).as_text() != hm3.lower_plain(t_max).as_text()
    assert hm3.lower_tree(t_max, True).as_text() != hm3.lower_tree(t_max).as_text()


def test_the_junction_methods_are_those_whose_genome_has_scales():
    """`JUNCTION_PATH_METHODS` against the baselines' own signatures: scale genes on by default, none in grid
    search."""
    runs = {"ea": baselines.run_ea, "moea": baselines.run_moea, "differential_evolution": baselines.run_de}
    assert set(baseline_runs.JUNCTION_PATH_METHODS) == set(runs)
    for fn in runs.values():
        assert inspect.signature(fn).parameters["use_scales"].default is True
    assert "use_scales" not in inspect.signature(baselines.run_grid_search).parameters


def test_path_variants_follow_the_alignment_and_the_baselines():
    from experiments.configs import tiny3

    config = tiny3.get_config("smoke")
    assert config.arch.alignment == "none" and "ea" in config.baselines.path_methods
    assert program_memory.path_variants(config) == [("", False), ("/junction", True)]
    config.baselines.path_methods = ("grid_search",)
    assert program_memory.path_variants(config) == [("", False)]
    config.baselines.path_methods = ("moea",)
    config.arch.alignment = "moment"  # HM3's rows have junctions already: the baselines' program is theirs
    assert program_memory.path_variants(config) == [("", True)]
    assert program_memory.path_variants(tiny3.get_config("smoke_mesh")) == [("", False)]  # no path baselines
