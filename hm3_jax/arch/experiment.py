"""The library side of ``experiments/train_arch.py``: train on a planted problem, log, checkpoint, evaluate."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from hm3_jax.arch import env, loop, planted, ppo
from hm3_jax.arch.config import ArchConfig
from hm3_jax.io import atomic


class MetricsWriter:
    """Appends one JSON object per iteration to ``metrics.jsonl`` and scalars to TensorBoard (``tb/``).

    On resume, rows past ``resume_iteration`` (written after the last checkpoint by a killed run) are dropped
    first, via a temporary file and an atomic rename, so the log matches the restored state. In a
    multi-process run only process 0 writes (every process sees the same metrics; N writers appending to one
    file would log every iteration N times); the others' writer does nothing.
    """

    def __init__(self, workdir: str, resume_iteration: int = 0):
        from tensorboardX import SummaryWriter

        self.path = os.path.join(workdir, "metrics.jsonl")
        self.active = jax.process_index() == 0
        if not self.active:
            return
        if os.path.exists(self.path):
            with open(self.path) as f:
                rows = [
                    line for line in f if line.strip() and json.loads(line)["iteration"] <= resume_iteration
                ]
            atomic.write_text(self.path, "".join(rows))
        self.file = open(self.path, "a")  # noqa: SIM115 (closed in close())
        self.tb = SummaryWriter(os.path.join(workdir, "tb"))

    def __call__(self, iteration: int, row: dict[str, float]) -> None:
        if not self.active:
            return
        self.file.write(json.dumps({**row, "iteration": int(iteration)}) + "\n")
        for name, value in row.items():
            self.tb.add_scalar(f"arch/{name}", value, iteration)

    def close(self) -> None:
        if not self.active:
            return
        self.file.close()
        self.tb.close()


def _latest_checkpoint_iteration(directory: str) -> int:
    if not os.path.isdir(directory):
        return 0
    steps = [int(name) for name in os.listdir(directory) if name.isdigit()]
    return max(steps, default=0)


def train_planted(config: Any, workdir: str) -> dict[str, Any]:
    """Trains one preference-conditioned network (or one per preference with ``config.per_preference``) on the
    planted problem of ``config.planted`` and evaluates greedy decoding against the brute-force optimum.

    Returns (and writes to ``workdir/result.json``) ``{"evaluations": [...], "num_optimal": int, ...}``.
    """
    os.makedirs(workdir, exist_ok=True)
    arch_config = ArchConfig.from_mapping(config.arch)
    problem = planted.make_planted_problem(**dict(config.planted))
    score_fn = planted.make_score_fn(problem)
    preferences = jnp.asarray(config.preferences, jnp.float32)
    key = jax.random.key(config.seed)
    if config.per_preference:
        train = jax.jit(
            ppo.make_train_per_preference(arch_config, score_fn, problem.descriptors, preferences)
        )
        runners, _ = train(key)
        trainers = [
            ppo.make_trainer(arch_config, score_fn, problem.descriptors, preferences[i : i + 1])
            for i in range(preferences.shape[0])
        ]
        decoders = [
            (
                preferences[i],
                lambda w, t=trainers[i], i=i: t.decode(jax.tree.map(lambda x, i=i: x[i], runners.params), w),
            )
            for i in range(preferences.shape[0])
        ]
        eval_prefs = [np.asarray(w) for w, _ in decoders]
        decode_fns = [fn for _, fn in decoders]
    else:
        trainer = ppo.make_trainer(arch_config, score_fn, problem.descriptors, preferences)
        checkpoint_dir = os.path.join(workdir, "checkpoints")
        writer = MetricsWriter(workdir, resume_iteration=_latest_checkpoint_iteration(checkpoint_dir))
        try:
            runner = loop.run_training(
                trainer,
                key,
                arch_config.num_iterations,
                checkpoint_dir=checkpoint_dir,
                checkpoint_every=config.checkpoint_every,
                metrics_fn=writer,
            )
        finally:
            writer.close()
        decode = jax.jit(trainer.decode)
        eval_prefs = [np.asarray(w, np.float32) for w in config.eval_preferences]
        decode_fns = [lambda w, runner=runner: decode(runner.params, jnp.asarray(w))] * len(eval_prefs)
    evaluations = []
    for w, fn in zip(eval_prefs, decode_fns, strict=True):
        path, length = fn(jnp.asarray(w, jnp.float32))
        found = tuple(int(a) for a in np.asarray(path)[: int(length)])
        weighted = float(w @ planted.numpy_scores(problem, found))
        value = env.length_penalised(weighted, len(found), arch_config.beta1, problem.t_max)
        optimum, optimum_value = planted.brute_force_optimum(problem, w, arch_config.beta1, arch_config.t_min)
        evaluations.append(
            {
                "preference": [float(x) for x in w],
                "path": list(found),
                "value": value,
                "optimal_path": list(optimum),
                "optimal_value": optimum_value,
                "optimal": found == tuple(optimum),
            }
        )
        logging.info(
            "preference %s: path %s (%.4f), optimum %s (%.4f)", w, found, value, optimum, optimum_value
        )
    result = {"evaluations": evaluations, "num_optimal": sum(e["optimal"] for e in evaluations)}
    if jax.process_index() == 0:  # one writer; every process returns the same result
        atomic.write_text(os.path.join(workdir, "result.json"), json.dumps(result, indent=1))
    return result
