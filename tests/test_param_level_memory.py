"""The parameter level holds one merged model at a time (issue 16: the plan's `merge` counts one).

The paper's Theta(lambda) is scored and released before the tuned search builds its candidates, the tuned model
is released before the next preference's merges, and the confirmation on the whole search split holds one
candidate at a time. Counted two ways at every scoring call: the merges' outputs still alive (weak references to
their leaves) and the bytes of jax's live arrays above those held before the level, in units of one model.
"""

import gc
import weakref
from types import SimpleNamespace

import jax
import numpy as np

from hm3_jax.pipeline.program_memory import tree_bytes
from hm3_jax.search import param_level
from hm3_jax.search import problem as problem_lib


def _count_merges(monkeypatch):
    """Weak references to the leaves of every merge the level makes (paper, tuned: its two entry points)."""
    made = []

    def register(fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            made.append([weakref.ref(x) for x in jax.tree.leaves(out)])
            return out

        return wrapped

    for name in ("paper_merge", "tuned_merge"):
        monkeypatch.setattr(param_level, name, register(getattr(param_level, name)))
    return lambda: sum(any(r() is not None for r in refs) for refs in made)


def test_the_smoke_level_holds_one_merged_model(smoke_zoo_dir, monkeypatch):
    """Two preferences (a tuned model left from the first would sit beside the second's merges), the tuned search
    and a confirmation of 2 candidates on the whole search split (capped split of 16 examples per task)."""
    from experiments.configs import tiny3
    from hm3_jax.tasks import zoo as zoo_lib

    config = tiny3.get_config("smoke")
    zoo = zoo_lib.load_matching(config.zoo, smoke_zoo_dir)
    problem = problem_lib.make_problem(
        zoo,
        config.engine.strategy,
        config.engine.chunk_size,
        config.engine.prefix_sharing,
        search_examples=16,
    )
    cfg = config.param_level
    cfg.scale_grid, cfg.confirm_top = (1.0,), 2
    cfg.cmaes.population_size, cfg.cmaes.num_generations = 2, 1
    alive = _count_merges(monkeypatch)

    def live():  # arrays other tests of this process left unreachable are collected first, not mid-measurement
        gc.collect()
        return sum(x.nbytes for x in jax.live_arrays())

    score = problem_lib.score_params
    for split in ("search", "search_full", "heldout"):  # the engines' lazily made arrays, before the baseline
        score(problem.engines[split], problem.experts, problem.base)
    start, model = live(), tree_bytes(problem.base)
    calls = []

    def spy(engine, experts, params):
        calls.append((alive(), (live() - start) / model))
        return score(engine, experts, params)

    monkeypatch.setattr(param_level, "score_params", spy)
    prefs = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]], np.float32)
    entries = param_level.run_param_level(problem, prefs, jax.random.PRNGKey(0), cfg)
    # per preference: paper search + heldout, the grid's 3 settings, 2 CMA-ES candidates, 2 confirmed, heldout
    assert len(calls) == 2 * (2 + 3 + 2 + 2 + 1)
    assert all("confirm" in e["tuned"] for e in entries)
    assert [c[0] for c in calls] == [1] * len(calls), calls
    # the scored model and a few scalars (keys, hyperparameters): below one model and a half, not two
    assert all(0.99 < c[1] < 1.5 for c in calls), [
        (i, c) for i, c in enumerate(calls) if not 0.99 < c[1] < 1.5
    ]


def test_a_confirmation_holds_one_candidate_and_rebuilds_the_chosen_one():
    """Three candidates whose whole-split fitness is 1, 3, 2: the second is chosen, built again at the end (after
    the third was scored) and returned; at every scoring exactly one candidate is alive."""
    full_fitness = {"a": 1.0, "b": 3.0, "c": 2.0}
    objectives = {
        "search": [SimpleNamespace(num_examples=2)],
        "search_full": [SimpleNamespace(num_examples=4)],
    }
    problem = SimpleNamespace(
        engines={"search_full": None}, objectives=objectives, normalise=lambda f, split: np.asarray(f)
    )
    built, alive_at_scoring = [], []

    def rebuild(name):
        params = {"w": np.full(1000, full_fitness[name])}
        built.append((name, weakref.ref(params["w"])))
        return params

    def score_full(params):
        alive_at_scoring.append(sum(r() is not None for _, r in built))
        return np.array([params["w"][0]])

    candidates = [(0.9, "a", "a"), (0.8, "b", "b"), (0.7, "c", "c"), (0.1, "d", "d")]
    out = problem_lib.confirm_params(problem, candidates, 3, rebuild, score_full, lambda f: float(f[0]))
    assert out["payload"] == "b" and out["chosen"] == 1
    assert out["full_fitness"] == [1.0, 3.0, 2.0]
    assert alive_at_scoring == [1, 1, 1]
    assert [name for name, _ in built] == ["a", "b", "c", "b"]  # b built again, after c was released
    assert float(out["params"]["w"][0]) == 3.0
    assert out["charged_evaluations"] == 3 * 2  # ceil(4 / 2) per re-scored candidate
    # chosen last: returned as scored, not built again
    full_fitness["c"] = 5.0
    built.clear()
    out = problem_lib.confirm_params(problem, candidates, 3, rebuild, score_full, lambda f: float(f[0]))
    assert out["chosen"] == 2 and [name for name, _ in built] == ["a", "b", "c"]
