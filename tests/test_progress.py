"""The run's progress lines: stage i/n, stored stages, and the time left from measured rates (fake clock)."""

import pytest

from experiments.configs import tiny3
from hm3_jax.pipeline import progress
from hm3_jax.pipeline.workdir import Workdir
from hm3_jax.search import neighbourhood


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _lines(log):
    return [fmt % tuple(args) for fmt, *args in log]


def test_time_left_from_rates_per_kind_by_hand(tmp_path):
    stages = [progress.Stage("a", "model", 10), progress.Stage("b", "path", 100),
              progress.Stage("c", "path", 50), progress.Stage("d", "model", 5)]  # fmt: skip
    clock, log = _Clock(), []
    p = progress.RunProgress(stages, clock=clock, log_fn=lambda *a: log.append(a))
    wd = Workdir(str(tmp_path), {"x": 1})
    wd.stage("a", lambda: {"stored": True})  # a stage of an earlier process: read back, teaches no rate

    def compute(seconds, result):
        def fn():
            clock.now += seconds
            return result

        return fn

    assert p.stage(wd, "a", compute(99.0, {})) == {"stored": True}
    assert p.eta_seconds() is None  # nothing computed here yet
    p.stage(wd, "b", compute(20.0, {"evaluations": 80}))  # 80 actual path evaluations: 0.25 s each
    # c: 50 path x 0.25 = 12.5 s; d: no model stage computed here, so the mean rate 20 s / 80 units = 0.25.
    assert p.eta_seconds() == pytest.approx(12.5 + 5 * 0.25)
    p.set_count("c", 40)
    assert p.eta_seconds() == pytest.approx(10 + 1.25)
    p.stage(wd, "c", compute(8.0, {"evaluations": 40}))
    p.stage(wd, "d", compute(1.0, [1, 2]))  # a result without a count keeps its planned one
    assert p.eta_seconds() == 0
    assert p.stage(wd, "unplanned", compute(1.0, {"z": 1})) == {"z": 1}  # passed through, no lines
    assert _lines(log) == [
        "stage 1/4 a: stored, read back",
        "stage 2/4 b (~100 path evaluations): elapsed 0s, time left unknown",
        "stage 2/4 b done in 20s",
        "stage 3/4 c (~40 path evaluations): elapsed 20s, time left ~11s",
        "stage 3/4 c done in 8s",
        "stage 4/4 d (~5 model evaluations): elapsed 28s, time left ~1s",
        "stage 4/4 d done in 1s",
    ]


def test_plan_of_the_tiny3_config_lists_every_stage_in_run_order():
    config = tiny3.get_config()
    plan = progress.plan_stages(config, 3, 15, ("no_param_level", "no_arch_level"))
    names = [s.name for s in plan]
    assert names == ["param_level", "hm3", "hm3_no_param_level",
                     *(f"baseline_{m}" for m in config.baselines.param_methods),
                     *(f"baseline_{m}" for m in config.baselines.path_methods), "bootstrap", "exports"]  # fmt: skip
    assert all(s.kind in progress.KINDS and s.count > 0 for s in plan)
    hm3 = plan[1]
    assert all(
        s.count == hm3.count for s in plan if s.name in ("baseline_ea", "baseline_moea")
    )  # HM3's budget
    assert "hm3_no_param_level" not in [
        s.name for s in progress.plan_stages(config, 3, 15, ("no_arch_level",))
    ]


def test_deep_config_neighbourhood_budget_is_five_per_layer_in_the_search_and_the_plan():
    deep, flat = tiny3.get_config("deep"), tiny3.get_config()
    assert neighbourhood.neighbourhood_budget(deep.arch, 16) == 80  # 5 x L
    assert neighbourhood.neighbourhood_budget(flat.arch, 4) == 16  # the fixed count when no per-layer budget
    hm3 = {s.name: s.count for s in progress.plan_stages(deep, 3, 15, (), num_layers=16)}["hm3"]
    rl = deep.arch.rl
    assert (
        deep.arch.neighbourhood_start == "theta" and deep.arch.confirm_neighbours == 8
    )  # session 14's run D
    assert deep.arch.distill_steps == 500  # the policy fitted onto the answers (suggest)
    assert hm3 == rl.num_iterations * rl.num_envs + 15 * (80 + deep.arch.confirm_top + 1 + 8)


def test_a_stage_written_by_another_process_while_waiting_teaches_no_rate():
    class _WaitedFor:  # Workdir.stage when a stage worker holds the lock: waits, then reads its result
        def has_stage(self, name):
            return False

        def stage(self, name, compute_fn):
            clock.now += 300.0  # the wait
            return {"evaluations": 10}

    clock, log = _Clock(), []
    stages = [progress.Stage("a", "path", 10), progress.Stage("b", "path", 10)]
    p = progress.RunProgress(stages, clock=clock, log_fn=lambda *a: log.append(a))
    assert p.stage(_WaitedFor(), "a", lambda: pytest.fail("computed here")) == {"evaluations": 10}
    assert p.spent == {} and p.eta_seconds() is None  # the 300 s wait is not stage a's time
    assert _lines(log)[-1] == "stage 1/2 a: stored, read back"
