"""HM3's upper level with the data-aware menu, and the data-aware parameter baselines (issue 19).

Most tests run on a hand-made Problem: a two-block Llama with two experts, one teacher-forced and one generation
search objective, held-out objectives that fail the test when anything reads them, and a scorer (patched in for
`score_params`) that scores a model by its distance to a chosen target merge, so which candidate wins is known.
The last test runs the level with the menu on the smoke zoo's real engines.
"""

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hm3_jax import merging, models
from hm3_jax.merging import Calibration, layer_input_grams
from hm3_jax.pipeline import baseline_runs
from hm3_jax.search import data_aware_menu, merge_genes, param_level
from hm3_jax.search.problem import Problem

LLAMA = models.ModelConfig(
    family="llama", vocab_size=13, hidden_size=8, intermediate_size=12, num_layers=2, num_heads=2
)
RNG = np.random.default_rng(0)
# Teacher-forced rows [bos] + prompt + target (+ padding): prompt lengths 3, 4, 2 (then a padding row).
TF_IDS = np.array(
    [[1, 5, 6, 9, 9, 2, 0], [1, 7, 8, 5, 10, 2, 0], [1, 4, 11, 11, 2, 0, 0], [0, 0, 0, 0, 0, 0, 0]], np.int32
)
TF_TARGET = np.zeros((4, 7), np.float32)
TF_TARGET[0, 2:5] = TF_TARGET[1, 3:5] = TF_TARGET[2, 1:4] = (
    1  # target_mask[t] = 1 when ids[t + 1] is a target
)
GEN_IDS = np.array(
    [[0, 0, 1, 5, 6], [0, 1, 7, 8, 9], [1, 4, 4, 5, 6], [0, 0, 0, 0, 0]], np.int32
)  # left-padded
GEN_MASK = (GEN_IDS > 0).astype(np.int32)


class HeldOut:
    """A held-out objective that fails the test when anything reads it."""

    def __getattr__(self, name):
        raise AssertionError(f"the held-out split was read ({name})")


def _objective(name, metric, tree):
    return SimpleNamespace(name=name, metric=metric, num_examples=3, arrays=SimpleNamespace(tree=tree))


@pytest.fixture(scope="module")
def problem():
    base = models.init(LLAMA, jax.random.key(0))
    experts = [
        jax.tree.map(lambda x, s=s: x + (0.05 * RNG.standard_normal(x.shape)).astype(np.float32), base)
        for s in range(2)
    ]
    search = [
        _objective("a/search", "exact_match", {"input_ids": TF_IDS[None, None], "target_mask": TF_TARGET[None, None]}),
        _objective("b/search", "chrf", {"prompt_ids": GEN_IDS[None], "prompt_mask": GEN_MASK[None]}),
    ]  # fmt: skip
    ideal = {"search": np.full(2, 100.0), "heldout": np.full(2, 100.0)}
    sources = {s: np.full((3, 2), 100.0) for s in ideal}
    return Problem(LLAMA, ("a", "b"), base, experts, {"search": search, "heldout": [HeldOut(), HeldOut()]},
                   sources, ideal, {"search": "search-engine", "heldout": "heldout-engine"})  # fmt: skip


def _forward(params, x):
    return models.apply(LLAMA, params, x[:, 0], x[:, 1])


def _hand_calibration():
    """The menu's calibration written out by hand: the 3 real rows of each task, prompts only."""
    tf_weights = np.zeros((3, 7), np.float32)
    for r, n in enumerate((3, 4, 2)):
        tf_weights[r, :n] = 1
    tf_ids = np.where(tf_weights > 0, TF_IDS[:3], 0)
    tf = np.stack([tf_ids, np.ones_like(tf_ids)], 1)
    gen = np.stack([GEN_IDS[:3], GEN_MASK[:3]], 1)
    return [(tf, tf_weights), (gen, GEN_MASK[:3].astype(np.float32))]


def _menu_cfg(**over):
    c = ml_collections.ConfigDict()
    c.density, c.drop_rate, c.scale_grid, c.task_arithmetic_grid = 0.7, 0.3, (1.0,), True
    c.cmaes = ml_collections.ConfigDict(
        {"enabled": True, "population_size": 4, "num_generations": 1, "sigma": 0.3}
    )
    c.data_aware = ml_collections.ConfigDict({
        "enabled": True, "methods": ("regmean", "fisher", "tsv", "adamerging"), "calibration_rows": 8,
        "regmean_alphas": (0.5, 0.9), "tsv_scales": (1.0,), "fisher_seed": 0, "fisher_num_samples": 1,
        "adamerging": {"num_steps": 2, "learning_rate": 1e-2, "init": 0.3, "batch_size": 4},
    })  # fmt: skip
    for k, v in over.items():
        c.data_aware[k] = v
    return c


def _distance_scorer(target):
    """score_params stand-in: 100 * exp(-|params - target|^2) on both tasks, whichever engine."""

    def score(engine, experts, params):
        assert engine in ("search-engine", "heldout-engine")
        d = sum(
            float(jnp.sum((a - b) ** 2))
            for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(target), strict=True)
        )
        return np.full(2, 100.0 * np.exp(-d))

    return score


def test_calibration_is_the_search_prompts_only(problem):
    """Calibration rows = the first real search rows, target tokens gone and weighted 0, generation prompts with
    their mask; the held-out objectives are never read (they raise)."""
    calib = data_aware_menu.search_calibration(problem, rows=8)
    for c, (inputs, weights) in zip(calib, _hand_calibration(), strict=True):
        np.testing.assert_array_equal(np.asarray(c.inputs), inputs)
        np.testing.assert_array_equal(np.asarray(c.token_weights), weights)
    for r in range(3):  # every target position of a teacher-forced row is overwritten and weighted 0
        targets = np.flatnonzero(TF_TARGET[r]) + 1
        assert np.all(calib[0].inputs[r, 0, targets] == 0) and np.all(calib[0].token_weights[r, targets] == 0)
    assert calib[0].num_rows == 3 and data_aware_menu.search_calibration(problem, rows=2)[1].num_rows == 2


def test_continued_calibration_uses_each_tasks_own_expert(problem):
    """continuation_tokens = 3: task k's prompts are continued by expert k (merging.own_continuation, the
    problem's EOS ids), the statistics are keyed by the setting, and a stored entry without the key is prompts
    only."""
    prompts = data_aware_menu.search_calibration(problem, rows=8)
    eos = problem._replace(eos_ids=(4,))
    got = data_aware_menu.search_calibration(eos, rows=8, continuation_tokens=3)
    for k in range(2):
        want = merging.own_continuation(LLAMA, problem.experts[k], prompts[k], 3, (4,))
        np.testing.assert_array_equal(np.asarray(got[k].inputs), np.asarray(want.inputs))
        np.testing.assert_array_equal(np.asarray(got[k].token_weights), np.asarray(want.token_weights))
    continued = data_aware_menu.statistics(problem, 8, continuation_tokens=3)
    assert continued is not data_aware_menu.statistics(problem, 8)
    assert data_aware_menu._stats_for(problem, {"calibration_rows": 8}).continuation_tokens == 0
    assert data_aware_menu.statistics(problem, 8).cost(("regmean",)).forward_rows == 6  # Grams only
    assert continued.cost(("regmean",)).forward_rows == 6 + 6  # + one pass per row for the continuation


def test_menu_picks_regmean_when_it_scores_best(problem, monkeypatch):
    """The scorer rewards exactly RegMean at alpha 0.5 (computed here from hand-built calibration data): the
    level picks it over the grid, CMA-ES and the other menu candidates, and merged_for rebuilds it from the
    stored (JSON) entry. Held-out objectives are never read (the fixture's raise)."""
    pref = np.array([[0.7, 0.3]], np.float32)
    hand = [Calibration(_forward, x, w) for x, w in _hand_calibration()]
    target = merging.merge_with_data("regmean", problem.base, problem.experts, None, hand, weights=[1.4, 0.6],
                                     alpha=0.5)  # fmt: skip
    monkeypatch.setattr(param_level, "score_params", _distance_scorer(target))
    (entry,) = param_level.run_param_level(problem, pref, jax.random.PRNGKey(1), _menu_cfg())
    tuned = entry["tuned"]
    assert tuned["hparams"]["method"] == "regmean" and tuned["hparams"]["alpha"] == 0.5
    assert tuned["fitness"] == pytest.approx(0.0, abs=1e-6)
    assert tuned["without_menu"]["fitness"] < -1e-3  # the DARE-TIES family could not reach it (maximised)
    assert [m[0]["method"] for m in tuned["menu"]] == ["regmean", "regmean", "fisher", "tsv", "adamerging"]
    assert tuned["evaluations"] == 3 + 4 + 5  # grid (3 settings x 1 scale), CMA-ES (4), menu (5)
    rebuilt = param_level.merged_for(problem, json.loads(json.dumps(entry)), "tuned")
    for a, b in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(target), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_menu_picks_regmean_plusplus_and_charges_its_sweep(problem, monkeypatch):
    """With RegMean++ on the menu and the scorer rewarding exactly RegMean++ at alpha 0.9 (computed here from the
    hand-built calibration), the level picks it and rebuilds it from the JSON entry; each RegMean++ candidate
    costs (L + 1) x 6 forward rows beyond the shared Grams (L = 2 blocks), and so does the baseline per merge."""
    pref = np.array([[0.7, 0.3]], np.float32)
    hand = [Calibration(_forward, x, w) for x, w in _hand_calibration()]
    target = merging.merge_with_data("regmean_plusplus", problem.base, problem.experts, None, hand,
                                     weights=[1.4, 0.6], alpha=0.9)  # fmt: skip
    monkeypatch.setattr(param_level, "score_params", _distance_scorer(target))
    cfg = _menu_cfg(methods=("regmean", "regmean_plusplus"))
    (entry,) = param_level.run_param_level(problem, pref, jax.random.PRNGKey(1), cfg)
    tuned = entry["tuned"]
    assert tuned["hparams"]["method"] == "regmean_plusplus" and tuned["hparams"]["alpha"] == 0.9
    assert tuned["fitness"] == pytest.approx(0.0, abs=1e-6)
    assert [m[0]["method"] for m in tuned["menu"]] == ["regmean"] * 2 + ["regmean_plusplus"] * 2
    assert tuned["calibration_passes"] == {"forward_rows": 6 + 2 * 3 * 6, "backward_rows": 0}
    rebuilt = param_level.merged_for(problem, json.loads(json.dumps(entry)), "tuned")
    for a, b in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(target), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    monkeypatch.setattr(baseline_runs, "score_params", _distance_scorer(target))
    base = baseline_runs.run_param_baseline(
        problem, "regmean_plusplus", pref, jax.random.PRNGKey(4), tune=False
    )
    # the baselines' calibration is continued by each expert (6 rows), then Grams (6) and default + grid sweeps
    assert base["calibration_passes"] == {"forward_rows": 6 + 6 + 2 * 3 * 6, "backward_rows": 0}


def test_menu_statistics_equal_independent_grams(problem):
    """The shared Grams are each expert's layer_input_grams on its own task's hand-built calibration."""
    stats = data_aware_menu.statistics(problem, 8)
    for k, (x, w) in enumerate(_hand_calibration()):
        want = layer_input_grams(_forward, problem.experts[k], x, w)
        got = stats.grams()[k]
        assert sorted(got) == sorted(want)
        for name in want:
            np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), rtol=1e-5, atol=1e-6)
    assert data_aware_menu.statistics(problem, 8) is stats  # computed once per run


def test_switch_off_changes_nothing(problem, monkeypatch):
    """With the menu off (or no data_aware section) the entries are identical and carry no menu keys."""
    monkeypatch.setattr(param_level, "score_params", _distance_scorer(problem.experts[0]))
    prefs = np.array([[0.5, 0.5], [0.2, 0.8]], np.float32)
    off = _menu_cfg(enabled=False)
    absent = _menu_cfg()
    del absent["data_aware"]
    a = param_level.run_param_level(problem, prefs, jax.random.PRNGKey(2), off)
    b = param_level.run_param_level(problem, prefs, jax.random.PRNGKey(2), absent)
    for x, y in zip(a, b, strict=True):
        x.pop("wall_seconds"), y.pop("wall_seconds")
        assert json.dumps(x) == json.dumps(y)
        assert not {"menu", "calibration_passes", "without_menu"} & set(x["tuned"])
        assert "method" not in x["tuned"]["hparams"]
    assert param_level.calibration_cost(a) == {"forward_rows": 0, "backward_rows": 0}


def test_calibration_passes_are_counted(problem, monkeypatch):
    """Hand-counted rows (3 per task): statistics once (Grams 3 + 3 forwards; Fishers 6 forwards and 6
    backwards, one label draw), AdaMerging per preference 2 steps x min(4, 3) rows x the tasks of positive
    weight; the data-aware baselines charge their statistics once plus every AdaMerging run."""
    monkeypatch.setattr(param_level, "score_params", _distance_scorer(problem.base))
    monkeypatch.setattr(baseline_runs, "score_params", _distance_scorer(problem.base))
    prefs = np.array([[0.5, 0.5], [1.0, 0.0]], np.float32)
    entries = param_level.run_param_level(problem, prefs, jax.random.PRNGKey(3), _menu_cfg())
    assert entries[0]["tuned"]["calibration_passes"] == {"forward_rows": 6 + 6 + 12, "backward_rows": 6 + 12}
    assert entries[1]["tuned"]["calibration_passes"] == {"forward_rows": 6, "backward_rows": 6}
    assert param_level.calibration_cost(entries) == {"forward_rows": 30, "backward_rows": 24}
    costs = {m: baseline_runs.run_param_baseline(problem, m, prefs, jax.random.PRNGKey(4), tune=False)
             for m in ("regmean", "fisher", "adamerging")}  # fmt: skip
    # the baselines continue their 6 calibration rows first (one forward each, baseline_runs.CALIBRATION)
    assert costs["regmean"]["calibration_passes"] == {"forward_rows": 6 + 6, "backward_rows": 0}
    assert costs["fisher"]["calibration_passes"] == {"forward_rows": 6 + 6, "backward_rows": 6}
    # default + the one-point grid per preference, 20 steps x 3 rows x (2 tasks, then 1)
    assert costs["adamerging"]["calibration_passes"] == {"forward_rows": 6 + 360, "backward_rows": 360}
    ada = costs["adamerging"]
    rebuilt = baseline_runs.param_baseline_models(problem, "adamerging", ada, jax.random.PRNGKey(4))[1]
    direct = baseline_runs.param_merge(problem, "adamerging", prefs[1], jax.random.fold_in(jax.random.PRNGKey(4), 1),
                                          ada["hparams"][1])  # fmt: skip
    for a, b in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(direct), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_smoke_level_with_menu_finishes(smoke_zoo_dir):
    """The smoke zoo's parameter level with the menu on (the smoke config's sizes), on the real engines, for one
    preference: the entry has the menu, its cost, and a tuned model that merged_for rebuilds to the same held-out
    score."""
    from experiments.configs import tiny3
    from hm3_jax.search import problem as problem_lib
    from hm3_jax.search.problem import make_problem, score_params
    from hm3_jax.tasks import zoo as zoo_lib

    config = tiny3.get_config("smoke")
    zoo = zoo_lib.load_matching(config.zoo, smoke_zoo_dir)
    problem = make_problem(
        zoo, config.engine.strategy, config.engine.chunk_size, config.engine.prefix_sharing
    )
    # the continuation stops at the zoo tokenizer's EOS; a spec zoo gives its own list (generation_config.json)
    assert problem.eos_ids == (zoo.tokenizer.eos_token_id,)
    assert problem_lib._eos_ids(SimpleNamespace(eos_ids=(5, 7), tokenizer=zoo.tokenizer)) == (5, 7)
    assert problem_lib._eos_ids(SimpleNamespace(images={})) == ()  # no tokenizer (an image zoo's objects)
    cfg = config.param_level
    cfg.data_aware.enabled = True
    assert cfg.data_aware.continuation_tokens == 8  # the rows are continued in this run
    prefs = np.array([[0.6, 0.3, 0.1]], np.float32)
    entries = param_level.run_param_level(problem, prefs, jax.random.PRNGKey(0), cfg)
    for e in entries:
        # the smoke menu: RegMean, Fisher, TSV-M, AdaMerging, RegMean++ (one alpha, one scale each)
        assert len(e["tuned"]["menu"]) == 5 and e["tuned"]["evaluations"] == 3 + 4 + 5
        rebuilt = param_level.merged_for(problem, json.loads(json.dumps(e)), "tuned")
        heldout = score_params(problem.engines["heldout"], problem.experts, rebuilt)
        np.testing.assert_allclose(heldout, e["tuned"]["heldout"])
    assert param_level.calibration_cost(entries)["forward_rows"] > 0


def test_bad_settings_raise_clear_errors(problem):
    """The menu without the tuned variant, a search objective without token prompts, zero calibration rows."""
    cfg = _menu_cfg()
    cfg.cmaes.enabled = False
    with pytest.raises(ValueError, match="cmaes.enabled"):
        param_level.run_param_level(problem, np.array([[0.5, 0.5]], np.float32), jax.random.PRNGKey(0), cfg)
    vit = _objective("img/search", "accuracy", {"pixel_values": np.zeros((1, 4, 3, 8, 8), np.float32)})
    no_prompts = problem._replace(
        objectives={**problem.objectives, "search": [vit, problem.objectives["search"][1]]}
    )
    with pytest.raises(ValueError, match="need token prompts.*img/search"):
        data_aware_menu.search_calibration(no_prompts, rows=8)
    with pytest.raises(ValueError, match="rows must be >= 1"):
        data_aware_menu.search_calibration(problem, rows=0)


def test_a_switched_off_menu_leaves_the_run_fingerprint_unchanged():
    """Runs made before `param_level.data_aware` existed resume under a config that has it switched off; with
    it on, the fingerprint differs (the entries do)."""
    from hm3_jax.pipeline import workdir

    old = {"seed": 0, "param_level": {"density": 0.5}, "memory": {"resident_preferences": 1}}
    off = {**old, "param_level": {"density": 0.5, "data_aware": {"enabled": False, "rows": 8}}}
    on = {**old, "param_level": {"density": 0.5, "data_aware": {"enabled": True, "rows": 8}}}
    assert (
        workdir.run_identity(off) == workdir.run_identity(old) == {"seed": 0, "param_level": {"density": 0.5}}
    )
    assert workdir.run_identity(on) != workdir.run_identity(old)


def _capped(problem):
    """The hand-made problem with a capped search split: "search_full" holds 9 examples per task (3 in "search"),
    so one whole-split score costs ceil(18 / 6) = 3 evaluations."""
    full = [SimpleNamespace(**{**vars(o), "num_examples": 9}) for o in problem.objectives["search"]]
    return problem._replace(
        objectives={**problem.objectives, "search_full": full},
        ideal={**problem.ideal, "search_full": np.full(2, 50.0)},
        engines={**problem.engines, "search_full": "full-engine"},
    )


def _two_scorer(subset_target, full_target):
    """score_params stand-in: the capped split rewards `subset_target`, the whole split `full_target`."""
    near, far = _distance_scorer(subset_target), _distance_scorer(full_target)

    def score(engine, experts, params):
        if engine == "full-engine":
            return far("search-engine", experts, params) / 2  # the whole split's ideal is 50
        return near(engine, experts, params)

    return score


def test_confirmation_on_the_whole_search_split_picks_its_best(problem, monkeypatch):
    """With a capped search split, `confirm_top` re-scores the M best candidates (by capped fitness) on the whole
    split and answers the best there: here the whole split rewards exactly task arithmetic at scale 1, a grid
    point the capped split ranks low; with M = every candidate it is chosen, and the confirmation is charged
    M x 3 evaluations. Without a cap, or with M = 0, nothing changes. The parameter baselines confirm alike."""
    capped = _capped(problem)
    pref = np.array([[0.7, 0.3]], np.float32)
    cfg = _menu_cfg(enabled=False)
    cfg.scale_grid = (1.0, 2.0)
    key = jax.random.PRNGKey(5)
    merge_key = jax.random.split(jax.random.split(key, 1)[0])[0]
    ta = {**merge_genes.decode_genes(merge_genes.initial_genes(1.0, 0.0, 2, 1.0), 2), "sign_election": False}
    target = param_level.merged_from_hparams(capped, pref[0], merge_key, ta)
    monkeypatch.setattr(param_level, "score_params", _two_scorer(problem.base, target))
    (plain,) = param_level.run_param_level(capped, pref, key, cfg)
    cfg.confirm_top = 100
    (entry,) = param_level.run_param_level(capped, pref, key, cfg)
    tuned = entry["tuned"]
    assert plain["tuned"]["hparams"] != ta and "confirm" not in plain["tuned"]
    assert tuned["hparams"] == ta
    n = len(tuned["confirm"]["full_fitness"])
    assert n == 10  # distinct: 6 grid points (the paper's setting is the (0.7, 0.3, scale 1) one), 4 CMA-ES
    assert max(tuned["confirm"]["full_fitness"]) == pytest.approx(0.0, abs=1e-9)
    assert tuned["evaluations"] == plain["tuned"]["evaluations"] + 3 * n
    (uncapped,) = param_level.run_param_level(problem, pref, key, cfg)  # no "search_full": no confirmation
    assert json.dumps(uncapped["tuned"]["hparams"]) == json.dumps(plain["tuned"]["hparams"])

    grid = baseline_runs.PARAM_GRIDS["task_arithmetic"]
    k = jax.random.fold_in(jax.random.PRNGKey(6), 0)
    best_full = baseline_runs.param_merge(capped, "task_arithmetic", pref[0], k, grid[0])
    monkeypatch.setattr(baseline_runs, "score_params", _two_scorer(problem.experts[0], best_full))
    plain_b = baseline_runs.run_param_baseline(capped, "task_arithmetic", pref, jax.random.PRNGKey(6))
    conf_b = baseline_runs.run_param_baseline(capped, "task_arithmetic", pref, jax.random.PRNGKey(6),
                                                 confirm_top=len(grid))  # fmt: skip
    assert plain_b["hparams"][0] != grid[0] and conf_b["hparams"] == [grid[0]]
    assert conf_b["evaluations"] == plain_b["evaluations"] + 3 * len(grid)
