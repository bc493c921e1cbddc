"""PPO on the planted path problem: one preference-conditioned network finds the known optimum for two
preferences, and a killed-and-resumed run ends exactly where the uninterrupted run ends.

Cost on a loaded 2-core CPU: one compilation of the training chunk (~20-30 s) plus 2 x 80 iterations.
"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hm3_jax.arch import loop, planted, ppo
from hm3_jax.arch.config import ArchConfig
from hm3_jax.arch.warm_start import demonstration

PREFERENCES = ((0.9, 0.1), (0.1, 0.9))
NUM_ITERATIONS = 80  # stated budget: the optimum for both preferences within 80 iterations of 64 episodes
CHUNK = 20


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    problem = planted.make_planted_problem(0, num_tasks=2, num_layers=3, t_max=4, merged_value=0.7)
    config = ArchConfig(
        num_sources=3,
        num_layers=3,
        num_tasks=2,
        t_min=1,
        t_max=4,
        beta1=0.3,
        num_envs=64,
        k_nearest=1,
        explore_eps=0.05,
        init_log_std=-1.0,
        learning_rate=3e-3,
        num_iterations=NUM_ITERATIONS,
    )
    trainer = ppo.make_trainer(
        config, planted.make_score_fn(problem), problem.descriptors, jnp.array(PREFERENCES)
    )
    straight_dir = str(tmp_path_factory.mktemp("straight"))
    runner = loop.run_training(
        trainer,
        jax.random.key(0),
        NUM_ITERATIONS,
        straight_dir,
        checkpoint_every=CHUNK,
        progress=False,
        max_to_keep=NUM_ITERATIONS // CHUNK,
    )
    return problem, config, trainer, runner, straight_dir


def test_planted_optimum_found_for_two_preferences(setup):
    problem, config, trainer, runner, _ = setup
    decode = jax.jit(trainer.decode)
    for w in PREFERENCES:
        optimum, _ = planted.brute_force_optimum(problem, np.array(w), config.beta1, config.t_min)
        path, length = decode(runner.params, jnp.array(w))
        found = tuple(int(a) for a in np.asarray(path)[: int(length)])
        assert found == optimum, f"preference {w}: decoded {found}, optimum {optimum}"
    # the two optima differ, so the one network really is preference-conditioned
    assert (
        planted.brute_force_optimum(problem, np.array(PREFERENCES[0]), config.beta1)[0]
        != (planted.brute_force_optimum(problem, np.array(PREFERENCES[1]), config.beta1)[0])
    )
    # decoding is deterministic and works for a preference never trained on
    path_a, _ = decode(runner.params, jnp.array([0.6, 0.4]))
    path_b, _ = decode(runner.params, jnp.array([0.6, 0.4]))
    np.testing.assert_array_equal(path_a, path_b)
    assert ((np.asarray(path_a) >= -1) & (np.asarray(path_a) < problem.pool_size)).all()


def test_resume_equals_uninterrupted(setup, tmp_path):
    """A run killed after the checkpoint at NUM_ITERATIONS / 2 leaves exactly that checkpoint on disk (orbax
    writes atomically); we copy it from the uninterrupted run, which saved it on its way, and resume."""
    _, _, trainer, straight, straight_dir = setup
    half = NUM_ITERATIONS // 2
    workdir = tmp_path / "killed"
    workdir.mkdir()
    shutil.copytree(os.path.join(straight_dir, str(half)), workdir / str(half))
    resumed = loop.run_training(
        trainer, jax.random.key(123), NUM_ITERATIONS, str(workdir), checkpoint_every=CHUNK, progress=False
    )  # a different key: the restored state's key must win
    assert int(resumed.iteration) == NUM_ITERATIONS
    jax.tree.map(np.testing.assert_array_equal, resumed.params, straight.params)
    jax.tree.map(np.testing.assert_array_equal, resumed.opt_state, straight.opt_state)
    np.testing.assert_array_equal(jax.random.key_data(resumed.key), jax.random.key_data(straight.key))
    assert sorted(os.listdir(workdir)) == [str(NUM_ITERATIONS - CHUNK), str(NUM_ITERATIONS)]


def test_run_from_scratch_and_halfway_checkpoint_match(setup, tmp_path):
    """The first half of a fresh checkpointed run equals the uninterrupted run's halfway checkpoint."""
    _, _, trainer, _, straight_dir = setup
    half = NUM_ITERATIONS // 2
    runner = loop.run_training(
        trainer, jax.random.key(0), half, str(tmp_path), checkpoint_every=CHUNK, progress=False
    )
    manager = loop.make_checkpoint_manager(straight_dir, max_to_keep=NUM_ITERATIONS // CHUNK)
    saved = manager.restore(half, args=loop.ocp.args.StandardRestore())
    manager.close()
    jax.tree.map(np.testing.assert_array_equal, runner.params, saved["params"])


def test_warm_start_decodes_the_demonstration_before_any_ppo():
    """Behaviour cloning onto source 2's identity path: the untrained-by-PPO policy decodes exactly that path
    (then STOP) for every training preference and for one never seen; without warm start it does not."""
    problem = planted.make_planted_problem(0, num_tasks=2, num_layers=3, t_max=5, merged_value=0.7)
    prefs = jnp.array(((0.9, 0.1), (0.1, 0.9), (0.5, 0.5)))
    base = dict(
        num_sources=3,
        num_layers=3,
        num_tasks=2,
        t_min=1,
        t_max=5,
        num_envs=8,
        num_iterations=0,
        k_nearest=1,
        learning_rate=3e-3,
    )
    demo = (6, 7, 8)
    paths, lengths, actions = demonstration(ArchConfig(**base, warm_start_source=2, warm_start_steps=1))
    np.testing.assert_array_equal(actions, [6, 7, 8, 9])  # blocks of source 2, then STOP (index P = 9)
    np.testing.assert_array_equal(paths[2], [6, 7, -1, -1, -1])
    decoded = {}
    for steps in (0, 300):
        config = ArchConfig(**base, warm_start_source=2 if steps else -1, warm_start_steps=steps)
        trainer = ppo.make_trainer(config, planted.make_score_fn(problem), problem.descriptors, prefs[:2])
        params = trainer.init(jax.random.key(1)).params
        decode = jax.jit(trainer.decode)  # as the architecture level decodes: one compilation per trainer
        decoded[steps] = []
        for w in prefs:
            path, length = decode(params, w)
            decoded[steps].append(tuple(int(a) for a in np.asarray(path)[: int(length)]))
    assert decoded[300] == [demo] * 3
    assert decoded[0] != [demo] * 3


def test_warm_start_uses_its_own_learning_rate_when_given():
    """warm_start_learning_rate = x fits exactly what learning_rate = x fits (0 = the PPO learning rate)."""
    problem = planted.make_planted_problem(0, num_tasks=2, num_layers=3, t_max=5, merged_value=0.7)
    prefs = jnp.array(((0.9, 0.1), (0.1, 0.9)))
    base = dict(
        num_sources=3,
        num_layers=3,
        num_tasks=2,
        t_min=1,
        t_max=5,
        num_envs=8,
        num_iterations=0,
        k_nearest=1,
        warm_start_source=2,
        warm_start_steps=20,
    )

    def init(**kw):
        config = ArchConfig(**base, **kw)
        trainer = ppo.make_trainer(config, planted.make_score_fn(problem), problem.descriptors, prefs)
        return trainer.init(jax.random.key(1)).params

    own = init(learning_rate=1e-4, warm_start_learning_rate=3e-3)
    jax.tree.map(np.testing.assert_array_equal, own, init(learning_rate=3e-3))
    slow = init(learning_rate=1e-4)  # warm_start_learning_rate = 0 (default): the PPO rate
    assert any(
        not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(own), jax.tree.leaves(slow), strict=True)
    )


def test_metrics_writer_writes_on_process_zero_only(tmp_path, monkeypatch):
    """Multi-process training: every process calls the writer with the same rows; only process 0 writes, so
    metrics.jsonl has each iteration once. Resume drops rows written after the last checkpoint."""
    import json

    from hm3_jax.arch import experiment

    writer = experiment.MetricsWriter(str(tmp_path))
    for it in (1, 2, 3):
        writer(it, {"return": 0.5 * it})
    writer.close()
    monkeypatch.setattr(experiment.jax, "process_index", lambda: 1)
    other = experiment.MetricsWriter(str(tmp_path))
    other(1, {"return": 9.0})
    other.close()
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["iteration"] for r in rows] == [1, 2, 3] and rows[0]["return"] == 0.5
    monkeypatch.setattr(experiment.jax, "process_index", lambda: 0)
    experiment.MetricsWriter(str(tmp_path), resume_iteration=2).close()
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line)["iteration"] for line in f] == [1, 2]
