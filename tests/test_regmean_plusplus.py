"""RegMean++ (issue 19) against a straightforward numpy implementation of its layer sweep on a toy residual model
(embedding kernel, L stacked blocks with a norm-like scale and two kernels, a head kernel), plus a Llama whose
experts are identical, a weight-0 expert and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hm3_jax import models
from hm3_jax.merging import Calibration, calibration_passes, merge_with_data, regmean_plusplus

RNG = np.random.default_rng(7)
D_IN, D, M, C, L = 5, 4, 6, 2, 3


def _normal(*shape, scale=1.0):
    return (scale * RNG.standard_normal(shape)).astype(np.float32)


def _forward(params, x):
    """x [B, D_IN] -> logits [B, C]: h = x E; per block h += tanh((h * s_l) W1_l) W2_l (a scan); logits = h H."""
    h = x @ params["embed"]["kernel"]

    def block(h, p):
        return h + jnp.tanh((h * p["scale"]) @ p["w1"]["kernel"]) @ p["w2"]["kernel"], None

    h, _ = jax.lax.scan(block, h, params["blocks"])
    return h @ params["head"]["kernel"]


def _params(scale=1.0):
    return {
        "embed": {"kernel": _normal(D_IN, D, scale=scale)},
        "blocks": {
            "scale": 1.0 + _normal(L, D, scale=0.3 * scale),
            "w1": {"kernel": _normal(L, D, M, scale=scale)},
            "w2": {"kernel": _normal(L, M, D, scale=scale)},
        },
        "head": {"kernel": _normal(D, C, scale=scale)},
    }


def _solve(grams, kernels, lam, alpha):
    """numpy RegMean closed form of one kernel: (sum lam G~)^-1 sum lam G~ W."""
    mod = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in grams]
    a = sum(w * m for w, m in zip(lam, mod, strict=True))
    b = sum(w * m @ k for w, m, k in zip(lam, mod, kernels, strict=True))
    return np.linalg.solve(a, b)


def _gram(x):
    return x.T @ x / x.shape[0]


def _naive_regmean_plusplus(base, experts, xs, lam, alpha):
    """The layer sweep written out: embedding merged from the raw inputs, then block by block (expert k's block l
    on the merged prefix's features of task k), the head from the merged model's features."""
    e = [jax.tree.map(lambda a: np.asarray(a, np.float64), p) for p in experts]
    lam = np.asarray(lam, np.float64) / np.sum(lam)
    avg = lambda f: sum(w * f(p) for w, p in zip(lam, e, strict=True))  # noqa: E731
    out = {"embed": {"kernel": _solve([_gram(x) for x in xs], [p["embed"]["kernel"] for p in e], lam, alpha)}}
    scale = avg(lambda p: p["blocks"]["scale"])  # no Gram: the weighted average (base + sum lam delta)
    w1, w2 = np.zeros((L, D, M)), np.zeros((L, M, D))
    hs = [x @ out["embed"]["kernel"] for x in xs]
    for layer in range(L):
        u = [h * p["blocks"]["scale"][layer] for h, p in zip(hs, e, strict=True)]  # expert k's block l
        v = [np.tanh(ui @ p["blocks"]["w1"]["kernel"][layer]) for ui, p in zip(u, e, strict=True)]
        w1[layer] = _solve([_gram(x) for x in u], [p["blocks"]["w1"]["kernel"][layer] for p in e], lam, alpha)
        w2[layer] = _solve([_gram(x) for x in v], [p["blocks"]["w2"]["kernel"][layer] for p in e], lam, alpha)
        hs = [h + np.tanh((h * scale[layer]) @ w1[layer]) @ w2[layer] for h in hs]  # the merged block
    out["blocks"] = {"scale": scale, "w1": {"kernel": w1}, "w2": {"kernel": w2}}
    out["head"] = {"kernel": _solve([_gram(h) for h in hs], [p["head"]["kernel"] for p in e], lam, alpha)}
    return out


@pytest.mark.parametrize("alpha", [0.9, 1.0])
def test_regmean_plusplus_equals_the_naive_layer_sweep(alpha):
    base = _params()
    experts = [jax.tree.map(lambda b: b + _normal(*b.shape, scale=0.5), base) for _ in range(3)]
    xs = [_normal(40, D_IN) for _ in range(3)]
    lam = [0.5, 0.3, 0.2]
    calib = [Calibration(_forward, x) for x in xs]
    got = regmean_plusplus(base, experts, calib, weights=lam, alpha=alpha)
    want = _naive_regmean_plusplus(base, experts, xs, lam, alpha)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-3, atol=2e-4), got, want)
    # and it is not plain RegMean: the blocks after the first see the merged prefix
    plain = merge_with_data("regmean", base, experts, None, calib, weights=lam, alpha=alpha)
    assert not np.allclose(plain["blocks"]["w1"]["kernel"][1], got["blocks"]["w1"]["kernel"][1], atol=1e-3)
    # the registry's entry is this function
    via = merge_with_data("regmean_plusplus", base, experts, None, calib, weights=lam, alpha=alpha)
    jax.tree.map(np.testing.assert_array_equal, via, got)


def test_weight_zero_expert_is_not_used_and_identical_llamas_merge_to_themselves():
    base = _params()
    experts = [jax.tree.map(lambda b: b + _normal(*b.shape, scale=0.5), base) for _ in range(3)]
    xs = [_normal(30, D_IN) for _ in range(3)]
    calib = [Calibration(_forward, x) for x in xs]
    three = regmean_plusplus(base, experts, calib, weights=[0.6, 0.0, 0.4])
    two = regmean_plusplus(base, [experts[0], experts[2]], [calib[0], calib[2]], weights=[0.6, 0.4])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), three, two)

    cfg = models.ModelConfig(
        family="llama", vocab_size=11, hidden_size=8, intermediate_size=12, num_layers=2, num_heads=2
    )
    llama = jax.tree.map(lambda x: x + _normal(*x.shape, scale=0.1), models.init(cfg, jax.random.key(0)))
    ids = jnp.asarray(RNG.integers(0, cfg.vocab_size, (3, 6)), jnp.int32)
    calib = [Calibration(lambda p, x: models.apply(cfg, p, x), ids)] * 2
    out = regmean_plusplus(models.init(cfg, jax.random.key(1)), [llama, llama], calib, weights=[0.3, 0.7])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4), out, llama)


def test_bad_input_and_cost():
    base = _params()
    experts = [jax.tree.map(lambda b: b + _normal(*b.shape, scale=0.5), base) for _ in range(2)]
    calib = [Calibration(_forward, _normal(10, D_IN)) for _ in range(2)]
    with pytest.raises(ValueError, match="RegMean\\+\\+.*calibration data for 1 tasks"):
        regmean_plusplus(base, experts, calib[:1])
    with pytest.raises(ValueError, match="alpha must be in"):
        regmean_plusplus(base, experts, calib, alpha=1.5)
    singular = [Calibration(_forward, np.zeros((10, D_IN), np.float32)) for _ in range(2)]
    with pytest.raises(ValueError, match="'blocks/w1/kernel' \\(block 0\\) is singular"):  # names leaf, block
        regmean_plusplus(base, experts, singular)
    # (L + 2) forward passes of every expert of positive weight: the experts' own Grams, one per block, the outside
    passes = calibration_passes("regmean_plusplus", calib, weights=[1.0, 0.0], params=base)
    assert passes == (10 * (L + 2), 0)
