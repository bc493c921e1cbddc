"""Unit checks of the end-to-end run's pieces against hand-computed or independent values (fast, no zoo)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hm3_jax import merging, models
from hm3_jax.merging import traced
from hm3_jax.models.config import ModelConfig
from hm3_jax.pipeline import report as report_lib
from hm3_jax.pipeline import run as run_lib
from hm3_jax.pipeline import run_config
from hm3_jax.pipeline.workdir import Workdir, WorkdirError, atomic_write_json, config_diff
from hm3_jax.search import merge_genes


def test_workdir_stage_is_computed_once_and_read_back(tmp_path):
    wd = Workdir(str(tmp_path / "w"), {"seed": 0})
    calls = []
    first = wd.stage("a", lambda: calls.append(1) or {"x": np.arange(3)})
    again = wd.stage("a", lambda: calls.append(1) or {"x": [9]})
    assert first == again == {"x": [0, 1, 2]} and len(calls) == 1
    with pytest.raises(WorkdirError, match="config differs in seed: 0 -> 1; use a new --workdir"):
        Workdir(str(tmp_path / "w"), {"seed": 1})
    Workdir(str(tmp_path / "w"), {"seed": 0})  # same config: reused


def test_config_diff_names_the_keys_that_differ(tmp_path):
    old = {"seed": 0, "arch": {"rl": {"t_max": 4, "lr": 1e-3}}, "methods": ("ea", "grid"), "gone": 1}
    new = {"seed": 0, "arch": {"rl": {"t_max": 2, "lr": 1e-3}}, "methods": ["ea", "grid"], "added": "x"}
    assert config_diff(old, new) == ['added: (absent) -> "x"', "arch.rl.t_max: 4 -> 2", "gone: 1 -> (absent)"]
    assert config_diff(old, old) == []
    many = config_diff({f"k{i}": i for i in range(10)}, {f"k{i}": -i for i in range(10)}, limit=3)
    assert many[-1] == "... (6 more)" and len(many) == 4  # k0 is equal


def _smoke_config():
    from experiments.configs import tiny3

    return tiny3.get_config("smoke")


@pytest.mark.parametrize(
    "key,value,words",
    [
        ("preferences.num", 0, "preferences.num must be >= 1"),
        ("preferences.kind", "sobol", "preferences.kind"),
        ("arch.rl.t_max", 1, "arch.rl.t_max=1 is smaller than the models' 2 blocks"),
        ("arch.alignment", "cca", "arch.alignment"),
        ("arch.neighbourhood_start", "greedy", "arch.neighbourhood_start must be one of"),
        ("arch.confirm_neighbours", -1, "arch.confirm_neighbours must be >= 0"),
        ("arch.neighbourhood_evaluations_per_layer", -2, "arch.neighbourhood_evaluations_per_layer must be"),
        ("arch.distill_steps", -1, "arch.distill_steps must be >= 0"),
        ("arch.distill_learning_rate", -1e-3, "arch.distill_learning_rate must be >= 0"),
    ],
)
def test_bad_config_is_refused_before_anything_is_written(tmp_path, key, value, words):
    """Checked before the workdir is bound to the config (or a zoo is built): fixing the value and re-running into
    the same --workdir is not refused as another run's."""
    config = _smoke_config()
    section, _, name = key.rpartition(".")
    setattr(_section(config, section), name, value)
    with pytest.raises(run_config.ConfigError, match=words):
        run_lib.setup(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def _section(config, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def test_zoo_of_another_config_says_what_to_do_from_the_cli(tmp_path):
    from hm3_jax.tasks import zoo as zoo_lib

    config = _smoke_config()
    built = config.zoo.to_dict()
    built["seed"] = built.get("seed", 0) + 1
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / zoo_lib.MANIFEST).write_text(json.dumps({"fingerprint": "0" * 16, "config": built}))
    with pytest.raises(
        WorkdirError, match=r"zoo\.seed: \d+ -> \d+\); pass another --zoo_dir or --workdir, or delete"
    ):
        run_lib.setup(config, str(tmp_path / "w"), str(tmp_path / "zoo"))
    assert not (tmp_path / "w").exists()


def test_suggest_normalizes_on_request_and_names_a_directory_without_a_run(tmp_path):
    from hm3_jax.pipeline import suggest as suggest_lib

    with pytest.raises(WorkdirError, match="holds no HM3 run"):
        suggest_lib.suggest(str(tmp_path), [1 / 3] * 3)
    (tmp_path / "run.json").write_text(json.dumps({"fingerprint": "0", "config": {}}))
    front = {"preferences": [[1 / 3] * 3, [0.6, 0.2, 0.2]], "paths": [[0, 1], [1, 0]], "points": [[1, 2, 3]] * 2,
             "normalised_points": [[0.1, 0.2, 0.3]] * 2}  # fmt: skip
    (tmp_path / "report.json").write_text(json.dumps({"tasks": ["a", "b", "c"], "methods": {"hm3": front}}))
    with pytest.raises(ValueError, match="normalize=True"):
        suggest_lib.suggest(str(tmp_path), [3, 1, 1])
    answer = suggest_lib.suggest(str(tmp_path), [3, 1, 1], normalize=True)
    assert answer["front_index"] == 1 and answer["preference"] == pytest.approx([0.6, 0.2, 0.2])


def test_atomic_write_leaves_nothing_half_written(tmp_path):
    path = tmp_path / "r.json"
    atomic_write_json(str(path), {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(str(path), {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_preferences_start_balanced_and_lie_on_the_simplex():
    import ml_collections

    cfg = ml_collections.ConfigDict({"num": 6, "kind": "dirichlet", "divisions": 2})
    prefs = run_config.make_preferences(cfg, 3, jax.random.PRNGKey(0))
    assert prefs.shape == (6, 3)
    np.testing.assert_allclose(prefs[0], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(prefs.sum(1), 1, rtol=1e-6)
    assert np.all(prefs >= 0)
    cfg.kind = "das_dennis"
    grid = run_config.make_preferences(cfg, 3, jax.random.PRNGKey(0))
    assert len(grid) == 1 + 6  # balanced + the 6 points of the 2-division grid (none of them balanced)


def test_one_preference_is_the_balanced_one():
    import ml_collections

    cfg = ml_collections.ConfigDict({"num": 1, "kind": "dirichlet", "divisions": 2})
    prefs = run_config.make_preferences(cfg, 3, jax.random.PRNGKey(0))
    np.testing.assert_allclose(prefs, np.full((1, 3), 1 / 3), rtol=1e-6)
    cfg.num = 0
    with pytest.raises(ValueError, match="preferences.num"):
        run_config.make_preferences(cfg, 3, jax.random.PRNGKey(0))


def test_report_hypervolume_and_retention_by_hand():
    methods = {
        "hm3": {"points": [[80.0, 40.0], [40.0, 80.0]]},
        "ta": {"points": [[40.0, 40.0]]},
    }
    rep = report_lib.build_report(["a", "b"], [80.0, 80.0], methods, fixed_reference=[0.0, 0.0])
    # Normalised points (1, .5), (.5, 1): union of two boxes 1*.5 + .5*1 - .5*.5 = 0.75.
    assert rep["methods"]["hm3"]["hypervolume"] == pytest.approx(0.75)
    assert rep["methods"]["ta"]["hypervolume"] == pytest.approx(0.25)
    assert rep["dominance"]["ta"]["b_dominated_by_a"] == 1.0
    assert rep["claims"]["hm3_has_highest_hypervolume"]
    bal = report_lib.balanced_retention(["a", "b"], [72.0, 40.0], [[80.0, 1.0], [2.0, 80.0]])
    assert bal["retention"] == pytest.approx([0.9, 0.5])


def test_initial_genes_decode_to_the_papers_setting():
    hp = merge_genes.decode_genes(merge_genes.initial_genes(0.7, 0.3, 4), 4)
    assert hp["density"] == pytest.approx(0.7, abs=1e-5)
    assert hp["drop_rate"] == pytest.approx(0.3, abs=1e-5)
    assert hp["scale"] == pytest.approx(1.0, abs=1e-5)
    assert hp["block_weights"] == pytest.approx([1.0] * 4)


def _tiny(key):
    config = ModelConfig(family="llama", vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2,
                         num_heads=2, num_kv_heads=2, max_position_embeddings=32)  # fmt: skip
    return config, models.init(config, key)


def _tiny_base_and_experts(seed: int):
    """A tiny base, three experts at base + 0.1 N(0, 1), and the key the base was initialised with."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    _, base = _tiny(keys[0])
    experts = [jax.tree.map(lambda b, k=k: b + 0.1 * jax.random.normal(k, b.shape), base) for k in keys[1:]]
    return base, experts, keys[0]


def test_traced_dare_ties_matches_the_merging_library_without_trim_or_drop():
    base, experts, key = _tiny_base_and_experts(0)
    pref = np.array([0.5, 0.3, 0.2], np.float32)
    ours = traced.dare_ties_traced(base, experts, key, jnp.asarray(pref)[:, None] * jnp.ones((3, 2)),
                                        jnp.asarray(pref), 1.0, 0.0, 1.0)  # fmt: skip
    ref = merging.hm3_merge(base, experts, list(pref), key, density=1.0, drop_rate=0.0)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_traced_merge_without_sign_election_is_task_arithmetic():
    """elect = 0 at density 1, drop 0: Theta = base + scale * sum_k w_k delta_k, independently computed."""
    base, experts, key = _tiny_base_and_experts(3)
    w = np.array([0.5, 0.3, 0.2], np.float32)
    ours = traced.dare_ties_traced(base, experts, key, jnp.asarray(w)[:, None] * jnp.ones((3, 2)),
                                        jnp.asarray(w), 1.0, 0.0, 1.7, 0.0)  # fmt: skip
    ref = merging.merge("task_arithmetic", base, experts, key, weights=list(w), scale=1.7)
    expected = jax.tree.map(
        lambda b, *e: b + 1.7 * sum(wk * (ek - b) for wk, ek in zip(w, e, strict=True)), base, *experts
    )
    for a, b, c in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5)
        np.testing.assert_allclose(np.asarray(b), np.asarray(c), atol=1e-5)
    with_election = traced.dare_ties_traced(base, experts, key, jnp.asarray(w)[:, None] * jnp.ones((3, 2)),
                                                 jnp.asarray(w), 1.0, 0.0, 1.7, 1.0)  # fmt: skip
    assert any(
        not np.allclose(a, b)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(with_election), strict=True)
    )


def test_traced_dare_ties_trim_against_numpy():
    rng = np.random.default_rng(0)
    base = {
        "blocks": {"w": rng.normal(size=(1, 10)).astype(np.float32)},
        "head": {"w": np.zeros(3, np.float32)},
    }
    experts = [
        jax.tree.map(lambda b: b + rng.normal(size=b.shape).astype(np.float32), base) for _ in range(2)
    ]
    w = np.array([0.6, 0.4], np.float32)
    out = traced.dare_ties_traced(base, experts, jax.random.PRNGKey(1), jnp.asarray(w)[:, None], jnp.asarray(w),
                                       0.5, 0.0, 1.0)  # fmt: skip
    b = base["blocks"]["w"][0]
    deltas = np.stack([e["blocks"]["w"][0] - b for e in experts])
    kept = np.where(np.abs(deltas) >= np.quantile(np.abs(deltas), 0.5, axis=1, keepdims=True), deltas, 0)
    weighted = kept * w[:, None]
    sign = np.sign(weighted.sum(0))
    expected = b + np.where(np.sign(kept) == sign, weighted, 0).sum(0)
    np.testing.assert_allclose(np.asarray(out["blocks"]["w"][0]), expected, atol=1e-6)


def test_export_yaml_lists_one_slice_per_step():
    import yaml

    from hm3_jax.pipeline import export

    text = export.mergekit_passthrough_yaml(["e0", "e1", "m"], [5, 0, -1, 9], num_layers=4)
    cfg = yaml.safe_load(text)
    assert cfg["merge_method"] == "passthrough"
    assert [s["sources"][0] for s in cfg["slices"]] == [
        {"model": "e1", "layer_range": [1, 2]}, {"model": "e0", "layer_range": [0, 1]},
        {"model": "m", "layer_range": [1, 2]},
    ]  # fmt: skip


@pytest.mark.parametrize("scale", [0.5, 1.0, 1.5, 2.5, 3.0])
def test_initial_genes_encode_every_grid_scale(scale):
    """The scale grid's starting points decode back to their scale (the box is [0.5, 3.0])."""
    hp = merge_genes.decode_genes(merge_genes.initial_genes(1.0, 0.0, 4, scale), 4)
    assert hp["scale"] == pytest.approx(scale, rel=2e-3)
    assert hp["density"] == pytest.approx(1.0, abs=2e-3)
    assert hp["drop_rate"] == pytest.approx(0.0, abs=2e-3)


def test_neighbours_by_hand():
    """Path (0,0) (1,1) over 3 sources x L=2 (pool index m * 2 + l), t_min 1, t_max 3."""
    from hm3_jax.search import neighbourhood

    # the neighbourhood before issue 20, in its order (tests/test_neighbourhood.py: insertions, round robin)
    legacy = {"kinds": neighbourhood.KINDS_WITHOUT_INSERTION, "order": "by_kind"}
    nb = neighbourhood.neighbours(np.array([0, 3, -1], np.int32), 3, 2, t_min=1, t_max=3, **legacy)
    got = {tuple(int(a) for a in p if a >= 0) for p in nb}
    expected = {
        (2, 3), (4, 3), (0, 1), (0, 5),  # source swaps at each step
        (3,), (0,),  # deletions
        (0, 0, 3), (0, 3, 3),  # repeats
        (1, 3), (0, 2),  # neighbouring layers of the same source
    }  # fmt: skip
    assert got == expected and len(nb) == len(expected)
    assert nb.shape == (len(expected), 3) and np.all(nb[:4, 2] == -1)
    # At t_min no deletion, at t_max no repeat.
    nb = neighbourhood.neighbours(np.array([0, 3], np.int32), 3, 2, t_min=2, t_max=2)
    assert all((p >= 0).sum() == 2 for p in nb)


def test_neighbourhood_search_climbs_to_a_planted_optimum_within_budget():
    """Score = 1 - (Hamming distance to a planted path) / 4: two source swaps away from the start."""
    from hm3_jax.search import neighbourhood

    target = np.array([8, 1, 10, 3], np.int32)  # sources 2, 0, 2, 0 over L = 4 (3 sources)
    calls = []

    def score_fn(paths):
        calls.append(len(paths))
        d = np.array([np.sum(p != target) if len(p) == len(target) else 4 for p in paths])
        return np.stack([1 - d / 4, 1 - d / 4], 1)

    start = np.array([0, 1, 2, 3], np.int32)
    out = neighbourhood.neighbourhood_search(score_fn, start, np.array([0.5, 0.5]), num_sources=3, num_layers=4,
                                          t_min=4, t_max=4, beta1=0.0, budget=60)  # fmt: skip
    assert out["path"].tolist() == target.tolist() and out["reward"] == pytest.approx(1.0)
    assert out["steps"] == 2 and out["evaluations"] == sum(calls) <= 60
    # A budget smaller than one neighbourhood stops after it; known paths are not scored again.
    calls.clear()
    known = {start.tobytes(): np.array([0.5, 0.5])}
    out = neighbourhood.neighbourhood_search(score_fn, start, np.array([0.5, 0.5]), num_sources=3, num_layers=4,
                                          t_min=4, t_max=4, beta1=0.0, budget=3, known=known)  # fmt: skip
    assert sum(calls) == out["evaluations"] == 3
    assert len(out["scored"]) == 3 and start.tobytes() not in {p.tobytes() for p, _ in out["scored"]}
    assert all(np.array_equal(sc, score_fn(p[None])[0]) for p, sc in out["scored"])  # the new ones, as scored


def test_memory_settings_are_not_part_of_the_run_fingerprint(tmp_path):
    """`config.memory` chooses how much is held, not what is computed: a run resumes under another value, while
    any other key still refuses the workdir (naming the key)."""
    a = Workdir(str(tmp_path), {"seed": 0, "memory": {"resident_preferences": 0}})
    b = Workdir(str(tmp_path), {"seed": 0, "memory": {"resident_preferences": 1}})
    assert a.fingerprint == b.fingerprint
    with pytest.raises(WorkdirError, match="seed"):
        Workdir(str(tmp_path), {"seed": 1, "memory": {"resident_preferences": 1}})
