"""AdaMerging is a pure function of its inputs and key (issue 19, the tiny8 stage that did not reproduce: its
cause was the caller's key, `test_baseline_keys.py`): the jitted `adamerging` equals a Python loop of
`optax.adam` steps written from the paper's equations, and the same inputs give bitwise the same coefficients
and losses in two calls and in another process."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hm3_jax

# A hand-sized layer-wise problem: a stacked "blocks" leaf (coefficients [K, L]) and a plain one ([K]), three
# tasks with 7 rows each (minibatches of 4 are real subsets), one task of weight 0 (not run).
PROBLEM = '''
import functools
import jax, jax.numpy as jnp, numpy as np
from hm3_jax.merging import Calibration, adamerging

def forward(task, params, x):
    """logits [B, 3] of a two-block residual tanh network read by task `task`'s row of the head."""
    h = x
    for l in range(2):
        h = h + jnp.tanh(h @ params["blocks"]["w"][l])
    return h @ params["head"][task]

rng = np.random.default_rng(7)
base = {"blocks": {"w": rng.normal(0, 0.3, (2, 4, 4)).astype(np.float32)},
        "head": rng.normal(0, 1.0, (3, 4, 3)).astype(np.float32)}
experts = [jax.tree.map(lambda a: a + rng.normal(0, 0.5, a.shape).astype(np.float32), base) for _ in range(3)]
calibration = [Calibration(functools.partial(forward, k), rng.normal(0, 1, (7, 4)).astype(np.float32))
               for k in range(3)]
KW = dict(num_steps=12, weights=[0.5, 0.0, 1.5], learning_rate=0.05, batch_size=4, init=0.3)

def run():
    """The coefficients (sorted by leaf name) and the losses as the hex of their float32 bytes."""
    res = adamerging(jax.random.key(3), base, experts, calibration, **KW)
    parts = [np.asarray(res.coefficients[n], np.float32).ravel() for n in sorted(res.coefficients)]
    return np.concatenate(parts + [np.asarray(res.losses, np.float32)]).tobytes().hex()
'''


def _problem() -> dict:
    ns: dict = {}
    exec(PROBLEM, ns)  # noqa: S102 - the same source the subprocess runs
    return ns


def _naive(ns) -> tuple[dict, np.ndarray]:
    """Paper Eqs. 3, 4 and 6 as a Python loop: eager `jax.grad` of the weighted entropy of each step's minibatch
    (`permutation(fold_in(step_key, k))[:batch]`, step keys `split(key, num_steps)`), an `optax.adam` update,
    then the clip to [0, 1]."""
    base, experts, calibration, kw = ns["base"], ns["experts"], ns["calibration"], ns["KW"]
    lam = np.asarray(kw["weights"], np.float32) / np.sum(kw["weights"])
    coeffs = {"blocks/w": jnp.full((3, 2), 0.3), "head": jnp.full((3,), 0.3)}

    def merged(c):
        w = base["blocks"]["w"] + sum(
            c["blocks/w"][k][:, None, None] * (experts[k]["blocks"]["w"] - base["blocks"]["w"])
            for k in range(3)
        )
        head = base["head"] + sum(c["head"][k] * (experts[k]["head"] - base["head"]) for k in range(3))
        return {"blocks": {"w": w}, "head": head}

    def objective(c, step_key):
        total = 0.0
        for k in (0, 2):  # task 1 has weight 0
            x = calibration[k].inputs
            rows = jax.random.permutation(jax.random.fold_in(step_key, k), x.shape[0])[: kw["batch_size"]]
            logp = jax.nn.log_softmax(calibration[k].forward_fn(merged(c), x[rows]))
            total = total + lam[k] * jnp.mean(-jnp.sum(jnp.exp(logp) * logp, -1))
        return total

    optimiser = optax.adam(kw["learning_rate"])
    state, losses = optimiser.init(coeffs), []
    for step_key in jax.random.split(jax.random.key(3), kw["num_steps"]):
        loss, grads = jax.value_and_grad(objective)(coeffs, step_key)
        updates, state = optimiser.update(grads, state, coeffs)
        coeffs = {n: jnp.clip(v, 0.0, 1.0) for n, v in optax.apply_updates(coeffs, updates).items()}
        losses.append(float(loss))
    return coeffs, np.asarray(losses)


def test_adamerging_equals_a_python_optax_loop():
    ns = _problem()
    res = ns["adamerging"](jax.random.key(3), ns["base"], ns["experts"], ns["calibration"], **ns["KW"])
    coeffs, losses = _naive(ns)
    assert sorted(res.coefficients) == sorted(coeffs)
    for n in coeffs:
        np.testing.assert_allclose(res.coefficients[n], coeffs[n], rtol=1e-5, atol=1e-6, err_msg=n)
    np.testing.assert_allclose(res.losses, losses, rtol=1e-5)
    assert not np.allclose(coeffs["blocks/w"], 0.3)  # it moved: a loop that did nothing would not match


def test_adamerging_is_bitwise_reproducible_in_process_and_across_processes():
    ns = _problem()
    first, second = ns["run"](), ns["run"]()
    assert first == second
    root = os.path.dirname(
        os.path.dirname(os.path.abspath(hm3_jax.__file__))
    )  # this checkout first on the path
    out = subprocess.run(
        [sys.executable, "-c", PROBLEM + "\nprint(run())"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == first
