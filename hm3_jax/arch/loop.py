"""Host-side training driver: chunked ``lax.scan`` training with orbax checkpoints between chunks.

``train(key)`` from ``ppo.make_train`` runs everything in one jitted scan, which cannot be interrupted. Here the
iterations are cut into chunks of ``checkpoint_every`` (one compiled ``train_chunk``); after each chunk the
:class:`~hm3_jax.arch.rollout.RunnerState` (params, optimiser state, PRNG key, iteration) is saved with an orbax
``CheckpointManager`` (orbax writes to a temporary directory and renames it, so a kill never leaves a half-written
checkpoint). A killed run restarted with the same arguments restores the latest checkpoint and continues; since
all randomness comes from the key inside the runner state, it ends bit-for-bit where the uninterrupted run ends.

Multi-process runs (``jax.distributed``): every process runs the same training on its own devices and calls
``save``/``restore`` on the same (shared) directory, as orbax's multi-host support requires (its barriers are
collectives); the state is saved as numpy arrays, which orbax writes from process 0 only, and process 0
finalises each step. Only process 0 shows the progress bar.

Two ways to score a chunk with a HOST score function (``score_mode``):

* ``"callback"`` (default): ``ppo.train_chunk`` jitted once, the host function called from inside it through
  ``jax.pure_callback`` (``scoring.host_score_fn``); about 1.5x faster on one device (docs/arch.md).
* ``"split"``: per iteration a jitted ``rollout``, the host function on numpy, a jitted ``update`` (the loop of
  ``ppo.split_iteration``). For host functions that run a computation over SEVERAL devices (the path engine
  on a mesh, or across processes): launched from the callback of a program that is still executing on one of
  those devices, such a computation can hang in XLA's CPU collective rendezvous (one participant never
  arrives; XLA aborts after 40 s; intermittent, issue 7, docs/scaling.md). Split mode launches the engine only between jitted calls. Both modes give bit-identical
  results for the same key (tests/test_distributed_loop.py), so checkpoints are interchangeable.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from tqdm import tqdm

from hm3_jax.arch.ppo import Trainer
from hm3_jax.arch.rollout import RunnerState
from hm3_jax.arch.scoring import HostScoreFn


def _to_saveable(runner: RunnerState) -> RunnerState:
    runner = runner.replace(key=jax.random.key_data(runner.key))
    if jax.process_count() > 1:
        # Multi-process (every process trains the same replicated RL state on its own device): numpy leaves,
        # which orbax's NumpyHandler writes from process 0 only. A process-local jax.Array would be written by
        # every process to the same tensorstore path (each calls itself the owner of replica 0).
        runner = jax.tree.map(np.asarray, jax.device_get(runner))
    return runner


def _from_saveable(runner: RunnerState) -> RunnerState:
    return runner.replace(key=jax.random.wrap_key_data(runner.key))


def make_checkpoint_manager(directory: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """An orbax ``CheckpointManager`` over ``directory`` (created if missing), keeping the last ``max_to_keep``.

    A checkpoint that a killed run left half-written (orbax's temporary directory `<step>.orbax-checkpoint-tmp-*`,
    renamed to `<step>` only when complete) is removed first, by process 0, before any process saves (orbax's
    own `cleanup_tmp_directories` runs in a future that only a save waits for)."""
    if jax.process_index() == 0 and os.path.isdir(directory):
        for name in os.listdir(directory):
            if ".orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def restore_latest(manager: ocp.CheckpointManager, like) -> RunnerState | None:
    """The latest checkpoint restored into the structure of ``like``, or None when there is none.

    ``like``: a RunnerState, or a function returning one (e.g. ``lambda: trainer.init(key)``), which is then
    only traced for its shapes (`jax.eval_shape`), not run: restoring skips the initialisation's work (the
    warm start's behaviour cloning).
    """
    step = manager.latest_step()
    if step is None:
        return None
    if jax.process_count() > 1:  # numpy targets: every process reads the whole (small) state
        abstract = _to_saveable(like() if callable(like) else like)
    elif callable(like):
        abstract = jax.eval_shape(lambda: _to_saveable(like()))
    else:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saveable(like))
    restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    # orbax returns device-committed arrays; host round trip makes them look like init's, so the compiled
    # training chunk is reused instead of recompiled for a different placement.
    restored = jax.tree.map(jnp.asarray, jax.device_get(restored))
    return _from_saveable(restored)


def save_runner(directory: str, runner: RunnerState) -> None:
    """``runner`` as the only checkpoint of ``directory`` (step = its iteration), e.g. the distilled policy
    (`warm_start.distill`) beside the training checkpoints; a checkpoint already there is kept (a resumed run
    distils the same parameters again: deterministic)."""
    manager = make_checkpoint_manager(directory, max_to_keep=1)
    step = int(runner.iteration)
    if step not in manager.all_steps():
        manager.save(step, args=ocp.args.StandardSave(_to_saveable(runner)))
        manager.wait_until_finished()
    manager.close()


def run_training(
    trainer: Trainer,
    key: jax.Array,
    num_iterations: int,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 10,
    metrics_fn: Callable[[int, dict[str, float]], Any] | None = None,
    progress: bool = True,
    max_to_keep: int = 2,
    score_mode: str = "callback",
    host_fn: HostScoreFn | None = None,
) -> RunnerState:
    """Trains to ``num_iterations`` iterations in chunks, checkpointing after each chunk, resuming if possible.

    Args:
      trainer: from ``ppo.make_trainer``.
      key: PRNG key of the run (used only when no checkpoint exists).
      num_iterations: total iterations of the run (not "more iterations").
      checkpoint_dir: orbax directory; None disables checkpointing and resuming.
      checkpoint_every: iterations per jitted chunk (and between checkpoints).
      metrics_fn: called on the host as ``metrics_fn(iteration, {name: float})`` for every iteration (1-based).
      progress: show a tqdm bar.
      max_to_keep: checkpoints kept on disk (the latest ones).
      score_mode: "callback" (``trainer``'s own score function inside one jitted chunk) or "split" (module
        docstring): ``host_fn(paths [N, t_max] int32, preferences [N, K] float32, preference_index [N] int32)
        -> scores [N, K]`` called on the host between a jitted rollout and a jitted update; ``trainer``'s score
        function is then unused.
      host_fn: the host score function of split mode (required there, rejected in callback mode).

    Returns:
      The final :class:`RunnerState`.
    """
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    if score_mode not in ("callback", "split"):
        raise ValueError(f"score_mode must be 'callback' or 'split', got {score_mode!r}")
    if (score_mode == "split") != (host_fn is not None):
        raise ValueError(
            f"host_fn is required with score_mode='split' and only then (score_mode={score_mode!r})"
        )
    runner = trainer.init(key)
    manager = make_checkpoint_manager(checkpoint_dir, max_to_keep) if checkpoint_dir else None
    if manager is not None:
        restored = restore_latest(manager, runner)
        if restored is not None:
            runner = restored
            logging.info("resumed from iteration %d in %s", int(runner.iteration), checkpoint_dir)
    start = int(runner.iteration)
    if start > num_iterations:
        raise ValueError(f"checkpoint is at iteration {start}, past num_iterations={num_iterations}")
    chunk_fn = jax.jit(trainer.train_chunk, static_argnums=1) if score_mode == "callback" else None
    split_chunk = make_split_chunk(trainer, host_fn) if score_mode == "split" else None
    show = progress and jax.process_index() == 0  # one progress bar per run, not per process
    bar = tqdm(total=num_iterations, initial=start, disable=not show, desc="arch ppo", unit="it")
    done = start
    while done < num_iterations:
        size = min(checkpoint_every, num_iterations - done)
        runner, metrics = chunk_fn(runner, size) if chunk_fn is not None else split_chunk(runner, size)
        metrics = jax.device_get(metrics)
        for i in range(size):
            row = {name: float(np.asarray(value[i])) for name, value in metrics.items()}
            if metrics_fn is not None:
                metrics_fn(done + i + 1, row)
        done += size
        bar.update(size)
        bar.set_postfix(ret=f"{float(metrics['episode_return'][-1]):.3f}")
        if manager is not None:
            manager.save(done, args=ocp.args.StandardSave(_to_saveable(runner)))
            manager.wait_until_finished()
    bar.close()
    if manager is not None:
        manager.close()
    return runner


def make_split_chunk(
    trainer: Trainer, host_fn: HostScoreFn
) -> Callable[[RunnerState, int], tuple[RunnerState, dict]]:
    """``chunk(runner, num_iters) -> (runner, metrics {name: [num_iters]})`` like ``trainer.train_chunk``, but
    each iteration is jitted ``rollout`` -> ``host_fn(final paths, preferences, preference_index)`` on numpy -> jitted ``update``.

    No jitted computation is executing while ``host_fn`` runs (its inputs are fetched to the host first, and
    the next rollout is dispatched only after the update it depends on), so ``host_fn`` may run SPMD programs
    over any number of devices or processes.
    """
    rollout = jax.jit(trainer.rollout)
    update = jax.jit(trainer.update)

    def one(runner: RunnerState) -> tuple[RunnerState, dict]:
        runner, batch = rollout(runner)
        paths, prefs, index = jax.device_get((batch.final_path, batch.preference, batch.preference_index))
        scores = np.asarray(
            host_fn(np.asarray(paths, np.int32), np.asarray(prefs, np.float32), np.asarray(index, np.int32)),
            np.float32,
        )
        if scores.shape != prefs.shape:
            raise ValueError(f"host_fn returned scores of shape {scores.shape}, expected {prefs.shape}")
        return update(runner, batch, jnp.asarray(scores))

    def chunk(runner: RunnerState, num_iters: int) -> tuple[RunnerState, dict]:
        rows = []
        for _ in range(num_iters):
            runner, metrics = one(runner)
            rows.append(metrics)
        return runner, jax.tree.map(lambda *xs: jnp.stack(xs), *rows)

    return chunk
