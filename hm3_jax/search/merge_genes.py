"""The parameter level's search space: merge hyperparameters as real genes, and the tuned merge they give.

Gene decoding (a real vector `x`, unconstrained): density = 0.05 + 0.95 * sigmoid(x0), drop_rate =
0.9 * sigmoid(x1), scale = SCALE_MID * exp(SCALE_SPAN * tanh(x2)) (in [0.5, 3.0]), block weight multipliers =
exp(0.5 * tanh(x[3:3+L])). `initial_genes` encodes any (density, drop rate, scale) with unit block weights;
its default decodes to the paper's setting. `tuned_merge` is DARE-TIES (HM3_SPEC Eq. 5) at decoded genes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax.merging.traced import dare_ties_traced
from hm3_jax.search.problem import Problem


def _logit(p: float) -> float:
    p = float(np.clip(p, 1e-4, 1 - 1e-4))
    return float(np.log(p / (1 - p)))


SCALE_MID = float(np.sqrt(0.5 * 3.0))  # geometric middle of the scale range [0.5, 3.0]
SCALE_SPAN = float(np.log(3.0 / SCALE_MID))


def decode_genes(x: np.ndarray, num_layers: int) -> dict:
    """Real genes [3 + L] -> merge hyperparameters (see the module docstring)."""
    x = np.asarray(x, np.float64)
    sig = lambda v: 1.0 / (1.0 + np.exp(-v))
    return {
        "density": float(0.05 + 0.95 * sig(x[0])),
        "drop_rate": float(0.9 * sig(x[1])),
        "scale": float(SCALE_MID * np.exp(SCALE_SPAN * np.tanh(x[2]))),
        "block_weights": np.exp(0.5 * np.tanh(x[3 : 3 + num_layers])).tolist(),
    }


def initial_genes(density: float, drop_rate: float, num_layers: int, scale: float = 1.0) -> np.ndarray:
    """Genes that decode to (density, drop_rate, scale) with unit block weights (up to the box's clipping)."""
    d = (np.clip(density, 0.06, 0.999) - 0.05) / 0.95
    x2 = np.arctanh(np.clip(np.log(scale / SCALE_MID) / SCALE_SPAN, -0.999, 0.999))
    x1 = _logit(np.clip(drop_rate, 1e-3, 0.899) / 0.9)
    return np.concatenate([[_logit(d), x1, x2], np.zeros(num_layers)]).astype(np.float32)


def tuned_merge(problem: Problem, preference, key: jax.Array, hparams: dict) -> dict:
    """DARE-TIES with per-block weights `lambda_k * block_weights` at tuned density / drop rate / scale.

    Shell leaves (embeddings, final norm, head) get `lambda_k * mean(block_weights)`. Implemented by
    `merging.traced.dare_ties_traced`, whose hyperparameters are traced, so CMA-ES candidates never recompile.
    """
    block = jnp.asarray(hparams["block_weights"], jnp.float32)
    lam = jnp.asarray(np.asarray(preference, np.float32))
    return dare_ties_traced(
        problem.base,
        problem.experts,
        key,
        lam[:, None] * block[None],
        lam * jnp.mean(block),
        jnp.float32(hparams["density"]),
        jnp.float32(hparams["drop_rate"]),
        jnp.float32(hparams["scale"]),
        jnp.float32(hparams.get("sign_election", True)),
    )
