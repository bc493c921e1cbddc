"""One progress display for the whole run: "stage i/n", elapsed time and an estimate of the time left.

The estimate comes from the budgets: every stage has a kind of work (model evaluations, path evaluations,
held-out re-runs, exports) and a count of it from the config (`plan_stages`); the seconds per unit of each kind
are measured on the stages this process computed (stages read back from the workdir cost nothing and teach
nothing), and the time left is the sum over the stages still to do of count x seconds per unit of their kind
(a kind not measured yet borrows the mean rate over everything computed so far). Counts are estimates; a stage's
own count is replaced by its result's `evaluations` once it is known, and the path baselines' by HM3's actual
count (their budget). Host-side only; each stage's own bars (PPO, baselines) keep showing inside a stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

from absl import logging

from hm3_jax.pipeline.workdir import BUSY
from hm3_jax.search.neighbourhood import neighbourhood_budget

KINDS = {
    "model": "model evaluations",
    "path": "path evaluations",
    "heldout": "held-out re-runs",
    "export": "exports",
}


class Stage(NamedTuple):
    name: str
    kind: str  # a key of KINDS
    count: float  # estimated units of `kind`


def plan_stages(
    config, num_tasks: int, num_preferences: int, ablations: tuple, num_layers: int = 0
) -> list[Stage]:
    """The stages `run_hm3` computes after the preferences, in order, with their budgets from `config`
    (`num_layers`: the models' L, for a neighbourhood budget per layer)."""
    n = num_preferences
    pl = config.param_level
    per_pref = 1
    if pl.cmaes.enabled:  # the grid (scales, (1, 0), task arithmetic) then CMA-ES
        per_pref += len(pl.get("scale_grid", ()) or ()) + 1 + int(pl.get("task_arithmetic_grid", True))
        per_pref += pl.cmaes.population_size * pl.cmaes.num_generations
    rl, arch = config.arch.rl, config.arch
    search = rl.num_iterations * rl.num_envs + n * (
        neighbourhood_budget(arch, num_layers)
        + arch.get("confirm_top", 0)
        + 1
        + arch.get("confirm_neighbours", 0)
    )
    stages = [Stage("param_level", "model", n * per_pref), Stage("hm3", "path", search)]
    if "no_param_level" in ablations:
        stages.append(Stage("hm3_no_param_level", "path", search))
    grid = 4 if config.baselines.tune else 1  # a tuned parameter baseline scores a small grid per preference
    stages += [Stage(f"baseline_{m}", "model", n * grid) for m in config.baselines.param_methods]
    budget = config.baselines.budget if config.baselines.budget > 0 else search
    stages += [Stage(f"baseline_{m}", "path", budget) for m in config.baselines.path_methods]
    if config.report.get("bootstrap_samples", 0) > 0:
        # The held-out engine keeps every scored model's per-example statistics: only points scored by an earlier
        # process (a resumed run) are re-run; about one re-run's time for the resampling itself.
        stages.append(Stage("bootstrap", "heldout", 1))
    if config.export:
        stages.append(Stage("exports", "export", n))
    return stages


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class RunProgress:
    """Logs "stage i/n" at the start and end of every planned stage, with the elapsed time and the time left.

    Args:
      stages: `plan_stages(...)`.
      clock: seconds (tests pass a fake one).
      log_fn: printf-style logger.
      start: `clock()` when the run started (default: now).
    """

    def __init__(
        self,
        stages: list[Stage],
        clock: Callable[[], float] = time.perf_counter,
        log_fn: Callable[..., None] = logging.info,
        start: float | None = None,
    ):
        self.stages = {s.name: s for s in stages}
        self.order = [s.name for s in stages]
        self.clock, self.log_fn = clock, log_fn
        self.start = clock() if start is None else start
        self.done: set[str] = set()
        self.spent: dict[str, float] = {}  # seconds of the stages computed here

    def set_count(self, name: str, count: float) -> None:
        """A better count for a planned stage (e.g. the path baselines' budget once HM3's count is known)."""
        if name in self.stages:
            self.stages[name] = self.stages[name]._replace(count=float(count))

    def rate(self, kind: str) -> float | None:
        """Seconds per unit of `kind` measured here; else the mean over all computed stages; None before any."""

        def per_unit(names):
            units = sum(self.stages[n].count for n in names)
            return sum(self.spent[n] for n in names) / units if units > 0 else None

        same = [n for n in self.spent if self.stages[n].kind == kind]
        return per_unit(same) if same else (per_unit(list(self.spent)) if self.spent else None)

    def eta_seconds(self) -> float | None:
        """Estimated seconds for the planned stages not done yet; None while nothing was computed here."""
        left = [self.stages[n] for n in self.order if n not in self.done]
        rates = [self.rate(s.kind) for s in left]
        if any(r is None for r in rates):
            return None
        return sum(s.count * r for s, r in zip(left, rates, strict=True))

    def _prefix(self, name: str) -> str:
        return f"stage {self.order.index(name) + 1}/{len(self.order)} {name}"

    def stage(self, wd, name: str, compute_fn: Callable[[], Any], **kwargs) -> Any:
        """`wd.stage(name, compute_fn, **kwargs)` with progress lines around it (unplanned names: no lines)."""
        if name not in self.stages:
            return wd.stage(name, compute_fn, **kwargs)
        if wd.has_stage(name):
            return self._read_back(wd.stage(name, compute_fn, **kwargs), name)
        self._log_start(name)
        t0 = self.clock()
        computed: list[bool] = []

        def compute():
            computed.append(True)
            return compute_fn()

        result = wd.stage(name, compute, **kwargs)
        if (
            not computed
        ):  # another process wrote it while this one waited (a stage worker): not this one's time
            return self._read_back(result, name)
        return self._record(name, result, self.clock() - t0)

    def try_stage(self, wd, name: str, compute_fn: Callable[[], Any]) -> Any:
        """`wd.try_stage(name, compute_fn)` (`BUSY` at once when another process computes the stage) with the
        progress lines of `stage` when this process computes it (stage workers: `pipeline.stage_workers`)."""
        if name not in self.stages:
            return wd.try_stage(name, compute_fn)
        started: list[float] = []

        def compute():
            self._log_start(name)
            started.append(self.clock())
            return compute_fn()

        result = wd.try_stage(name, compute)
        if result is BUSY or not started:  # busy, or stored (by an earlier run or another process)
            return result if result is BUSY else self._read_back(result, name)
        return self._record(name, result, self.clock() - started[0])

    def _log_start(self, name: str) -> None:
        eta = self.eta_seconds()
        self.log_fn(
            "%s (~%d %s): elapsed %s, time left %s",
            self._prefix(name),
            self.stages[name].count,
            KINDS[self.stages[name].kind],
            _duration(self.clock() - self.start),
            "unknown" if eta is None else f"~{_duration(eta)}",
        )

    def _read_back(self, result: Any, name: str) -> Any:
        self.done.add(name)
        self.log_fn("%s: stored, read back", self._prefix(name))
        return result

    def _record(self, name: str, result: Any, seconds: float) -> Any:
        """Marks stage `name` computed here in `seconds` (its `evaluations`, if any, become its count)."""
        self.spent[name] = seconds
        evaluations = result.get("evaluations") if isinstance(result, dict) else None
        if isinstance(evaluations, (int, float)) and evaluations > 0:
            self.set_count(name, evaluations)
        self.done.add(name)
        self.log_fn("%s done in %s", self._prefix(name), _duration(seconds))
        return result
