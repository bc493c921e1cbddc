"""The split training loop (jitted rollout -> host scoring -> jitted update; `loop.run_training(...,
score_mode="split")`, the mode HM3 uses when its path engine spans several devices, issue 7) against the callback
loop (one jitted chunk, the host score function through `jax.pure_callback`): the same key gives bit-identical
parameters, optimiser state, key and metrics; a run checkpointed in one mode resumes in the other and ends where
the uninterrupted run ends. The planted path problem, scored by a numpy host function (cheap: a few seconds).
"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hm3_jax.arch import loop, planted, ppo
from hm3_jax.arch.config import ArchConfig
from hm3_jax.arch.scoring import host_score_fn

PREFERENCES = ((0.9, 0.1), (0.1, 0.9))
ITERATIONS = 4
CHUNK = 2


@pytest.fixture(scope="module")
def setup():
    problem = planted.make_planted_problem(0, num_tasks=2, num_layers=3, t_max=4, merged_value=0.7)
    config = ArchConfig(
        num_sources=3, num_layers=3, num_tasks=2, t_min=1, t_max=4, beta1=0.3, num_envs=8, k_nearest=1,
        explore_eps=0.2, num_minibatches=2, update_epochs=2, num_iterations=ITERATIONS,
    )  # fmt: skip
    calls = []

    def host_fn(paths, prefs, preference_index):  # numpy, independent of the jittable planted score
        calls.append(paths.shape)
        del prefs, preference_index
        valid = paths >= 0
        gathered = problem.tables[:, np.arange(problem.t_max)[None, :], np.where(valid, paths, 0)]
        return (np.where(valid[None], gathered, 0.0).sum(-1) / problem.t_max).T.astype(np.float32)

    trainer = ppo.make_trainer(config, host_score_fn(host_fn, 2), problem.descriptors, jnp.array(PREFERENCES))
    return trainer, host_fn, calls


def _run(trainer, host_fn, mode, **kw):
    rows = []
    runner = loop.run_training(
        trainer, jax.random.key(7), ITERATIONS, checkpoint_every=CHUNK, progress=False,
        metrics_fn=lambda i, row: rows.append((i, row)), score_mode=mode,
        host_fn=host_fn if mode == "split" else None, **kw,
    )  # fmt: skip
    return runner, rows


def _assert_same_state(a, b):
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    jax.tree.map(np.testing.assert_array_equal, a.opt_state, b.opt_state)
    np.testing.assert_array_equal(jax.random.key_data(a.key), jax.random.key_data(b.key))
    assert int(a.iteration) == int(b.iteration)


def test_split_equals_callback_bit_for_bit(setup, tmp_path):
    trainer, host_fn, calls = setup
    ref, ref_rows = _run(trainer, host_fn, "callback", checkpoint_dir=str(tmp_path / "cb"), max_to_keep=4)
    del calls[:]
    got, got_rows = _run(trainer, host_fn, "split", checkpoint_dir=str(tmp_path / "split"), max_to_keep=4)
    assert calls == [(8, 4)] * ITERATIONS  # the split loop scored each iteration's 8 episodes on the host
    _assert_same_state(got, ref)
    assert [i for i, _ in got_rows] == [i for i, _ in ref_rows] == list(range(1, ITERATIONS + 1))
    for (_, g), (_, r) in zip(got_rows, ref_rows, strict=True):
        assert g.keys() == r.keys()
        for name in r:
            assert g[name] == r[name], name
    # training really moved the parameters (the comparison above can fail)
    init = trainer.init(jax.random.key(7))
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(init.params), strict=True)
    )
    assert sorted(os.listdir(tmp_path / "split")) == sorted(os.listdir(tmp_path / "cb")) == ["2", "4"]

    # Resume across modes: the callback run's checkpoint at iteration 2, continued by the split loop.
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "cb" / str(CHUNK), resumed_dir / str(CHUNK))
    resumed, rows = _run(trainer, host_fn, "split", checkpoint_dir=str(resumed_dir))
    assert [i for i, _ in rows] == list(range(CHUNK + 1, ITERATIONS + 1))
    _assert_same_state(resumed, ref)


def test_bad_score_mode_arguments_raise(setup):
    trainer, host_fn, _ = setup
    with pytest.raises(ValueError, match="score_mode must be"):
        loop.run_training(trainer, jax.random.key(0), 1, score_mode="async", progress=False)
    with pytest.raises(ValueError, match="host_fn is required"):
        loop.run_training(trainer, jax.random.key(0), 1, score_mode="split", progress=False)
    with pytest.raises(ValueError, match="host_fn is required"):
        loop.run_training(trainer, jax.random.key(0), 1, host_fn=host_fn, progress=False)
    with pytest.raises(ValueError, match="host_fn returned scores of shape"):
        loop.run_training(trainer, jax.random.key(0), 1, score_mode="split", progress=False,
                          host_fn=lambda p, w, i: np.zeros((len(p), 3), np.float32))  # fmt: skip


def test_arch_level_picks_the_split_loop_for_a_multi_device_engine():
    from types import SimpleNamespace

    from hm3_jax.search import arch_level

    one = SimpleNamespace(strategy="map", mesh=None)
    mesh1 = SimpleNamespace(strategy="shard", mesh=SimpleNamespace(size=1))
    mesh8 = SimpleNamespace(strategy="shard", mesh=SimpleNamespace(size=8))
    assert arch_level.score_mode_for(one) == "callback"
    assert arch_level.score_mode_for(mesh1) == "callback"
    assert arch_level.score_mode_for(mesh8) == "split"
    assert arch_level.score_mode_for(one, "split") == "split"
    assert arch_level.score_mode_for(mesh8, "split") == "split"
    with pytest.raises(ValueError, match="cannot drive a path engine on several"):
        arch_level.score_mode_for(mesh8, "callback")
    with pytest.raises(ValueError, match="arch.score_mode must be"):
        arch_level.score_mode_for(one, "async")
