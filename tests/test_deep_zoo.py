"""`tiny3.py:deep` (issue 20): the tiny3 tasks and recipe at 16 blocks, at tiny3's cost. Cheap: nothing is
trained; the FLOPs are `hm3_jax.models.flops`' accounting, the paths `benchmarks/arch_headroom.py`'s."""

import importlib.util
import os

import numpy as np

from experiments.configs import tiny3
from hm3_jax.models import flops
from hm3_jax.search import neighbourhood, path_confirmation
from hm3_jax.tasks import tiny3_zoo
from hm3_jax.tasks import zoo as zoo_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(variant):
    zoo = tiny3.get_config(variant).zoo
    return zoo, tiny3_zoo.model_config(zoo, zoo.vocab_size)


def _training_flops(zoo, model) -> int:
    """3 x forward FLOPs (forward + backward) x rows seen by the base and the three experts."""
    rows = (
        zoo.base.num_steps * zoo.base.batch_size
        + len(zoo.tasks) * zoo.expert.num_steps * zoo.expert.batch_size
    )
    return 3 * flops.forward_flops(model, zoo.seq_len) * rows


def test_deep_config_resolves_from_the_config_file():
    config = _load(os.path.join(REPO, "experiments/configs/tiny3.py")).get_config("deep")
    assert config.zoo.model.num_layers == 16 and config.zoo.model.hidden_size == 64
    assert (
        config.arch.rl.t_max >= config.zoo.model.num_layers
    )  # Theta's own path fits (run_config.check_t_max)
    assert config.arch.rl.t_min < config.zoo.model.num_layers  # deletions are neighbours


def test_deep_zoo_has_the_promised_depth_at_tiny3s_cost():
    deep_zoo, deep = _model("deep")
    tiny_zoo, tiny = _model(None)
    assert deep.num_layers >= 12 and tiny.num_layers == 4
    assert deep.hidden_size % deep.num_heads == 0
    # the same tasks, data and recipe: only the model section differs
    a, b = deep_zoo.to_dict(), tiny_zoo.to_dict()
    assert {k: v for k, v in a.items() if k != "model"} == {k: v for k, v in b.items() if k != "model"}
    for ratio in (
        _training_flops(deep_zoo, deep) / _training_flops(tiny_zoo, tiny),
        flops.forward_flops(deep, deep_zoo.seq_len) / flops.forward_flops(tiny, tiny_zoo.seq_len),
    ):
        assert 1 / 1.5 <= ratio <= 1.5
    # tiny3's own zoo (and so its fingerprint) is unchanged by the variant
    assert zoo_lib.config_fingerprint(tiny_zoo) == "685ffb7819130762"
    assert zoo_lib.config_fingerprint(deep_zoo) != zoo_lib.config_fingerprint(tiny_zoo)


def _load(path: str):
    """The module of a file (a config file, as --config=FILE:deep loads it; a benchmark script)."""
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_headroom_insertions_and_two_edits():
    headroom = _load(os.path.join(REPO, "benchmarks/arch_headroom.py"))
    K, L, t_min, t_max = 3, 4, 3, 8
    theta = path_confirmation.identity_paths(K + 1, L, t_max)[K]  # [12, 13, 14, 15]
    ins = headroom.insertions(theta, K, L, t_max)
    assert ins.shape == (K * L, t_max)
    assert ins[0, :5].tolist() == [12, 0, 13, 14, 15]  # expert 0's block 0 after Theta's block 0
    assert ins[-1, :5].tolist() == [12, 13, 14, 15, 2 * L + 3]  # expert 2's last block after Theta's last
    one = neighbourhood.neighbours(theta, K + 1, L, t_min, t_max, **headroom.ONE_EDIT)
    cands = np.concatenate([theta[None], one])
    gains = np.zeros(len(one))
    gains[0] = 1.0  # [0, 13, 14, 15] is the best one-edit path
    two = headroom.two_edits(one, gains, 1, 1000, 0, K + 1, L, t_min, t_max, cands)
    known = {tuple(r) for r in cands.tolist()}
    assert len(two) > 0 and not any(tuple(r) in known for r in two.tolist())
    around_best = neighbourhood.neighbours(one[0], K + 1, L, t_min, t_max, **headroom.ONE_EDIT)
    around_best = {tuple(r) for r in around_best.tolist()}
    assert all(tuple(r) in around_best for r in two.tolist())
    assert len(headroom.two_edits(one, gains, 2, 5, 0, K + 1, L, t_min, t_max, cands)) == 5


def test_headroom_neighbourhood_without_a_run(smoke_zoo_dir, tmp_path):
    """`arch_headroom.py --neighbourhood` on a zoo with no HM3 run (how the deep zoo is measured): the parameter
    level is computed and cached, insertions and two-edit paths are scored, nothing is checked against a run."""
    headroom = _load(os.path.join(REPO, "benchmarks/arch_headroom.py"))
    argv = [f"--run={tmp_path}", f"--zoo={smoke_zoo_dir}", "--config=experiments/configs/tiny3.py:smoke",
            "--neighbourhood", "--preferences=0", "--bootstrap=10", "--insertions", "--two_edit_sample=3",
            "--two_edit_top=1", f"--plot={tmp_path / 'n.png'}", f"--out={tmp_path / 'out.json'}"]  # fmt: skip
    out = headroom.main(argv)
    assert not out["has_run"] and (tmp_path / "headroom_param_level.json").exists()
    assert "insertion" in out["mean_over_preferences"]["by_edit_type"]
    assert len(out["per_preference"][0]["two_edit"]["paths"]) == 3
    assert (tmp_path / "out.json").exists()
    again = headroom.main(argv)  # the cached parameter level: the same Theta, the same rewards
    assert (
        again["per_preference"][0]["search_full"]["theta_reward"]
        == out["per_preference"][0]["search_full"]["theta_reward"]
    )
