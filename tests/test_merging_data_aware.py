"""Data-aware merges (issue 19): RegMean, Fisher merging, AdaMerging, TSV-M, and the layer-input Grams they use,
each against an independent computation (numpy least squares / closed forms, naive per-example jax.grad
loops, a brute-force grid, a straightforward numpy TSV), plus bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hm3_jax import models
from hm3_jax.merging import (
    Calibration,
    adamerging,
    calibration_passes,
    diagonal_fisher,
    fisher_merge,
    layer_input_grams,
    merge,
    merge_with_coefficients,
    merge_with_data,
    regmean,
    regmean_from_data,
)
from hm3_jax.models import layers

RNG = np.random.default_rng(0)


def _normal(*shape, scale=1.0):
    return (scale * RNG.standard_normal(shape)).astype(np.float32)


def _linear_forward(params, x):
    """A one-layer "model": logits = x @ W + b, x [B, ..., in]."""
    return layers.dense(params["layer"], x)


# ---------------------------------------------------------------- layer inputs

LLAMA = models.ModelConfig(
    family="llama", vocab_size=11, hidden_size=8, intermediate_size=12, num_layers=2, num_heads=2
)


def _llama_forward(params, ids):
    return models.apply(LLAMA, params, ids)


@pytest.fixture(scope="module")
def llama_params():
    params = models.init(LLAMA, jax.random.key(0))
    return jax.tree.map(lambda x: x + _normal(*x.shape, scale=0.1), params)  # norms off 1: layout errors show


def test_layer_input_grams_equal_hand_computed_llama_activations(llama_params):
    """Every linear layer's Gram from the jaxpr tap equals X^T W X / sum(w) of the activations computed here
    block by block with the model's own layer functions, padding tokens (weight 0) excluded."""
    p = llama_params
    ids = jnp.asarray(RNG.integers(0, LLAMA.vocab_size, (3, 6)), jnp.int32)
    w = np.ones((3, 6), np.float32)
    w[0, 4:] = 0.0  # padding
    grams = layer_input_grams(_llama_forward, p, ids, w, batch_size=2)  # 2 chunks, the second padded

    @jax.jit
    def hand_grams(p, ids, w):
        def gram(x):
            x = x.reshape(-1, x.shape[-1])
            wf = w.reshape(-1)
            return (x * wf[:, None]).T @ x / wf.sum()

        h, ctx = models.embed(LLAMA, p, ids)
        expect = {name: [] for name in ("q", "k", "v", "o", "gate", "up", "down")}
        for l in range(LLAMA.num_layers):
            b = jax.tree.map(lambda x, l=l: x[l], p["blocks"])
            x = layers.rms_norm(b["attn_norm"]["scale"], h, LLAMA.norm_eps)
            for name in ("q", "k", "v"):
                expect[name].append(gram(x))
            q = layers.dense(b["q"], x).reshape(3, 6, 2, 4)
            k = layers.dense(b["k"], x).reshape(3, 6, 2, 4)
            v = layers.dense(b["v"], x).reshape(3, 6, 2, 4)
            q, k = (layers.apply_rope(t, ctx["sin"], ctx["cos"]) for t in (q, k))
            attn = layers.attention(q, k, v, ctx["mask"]).reshape(3, 6, 8)
            expect["o"].append(gram(attn))
            h_mid = h + layers.dense(b["o"], attn)
            x = layers.rms_norm(b["mlp_norm"]["scale"], h_mid, LLAMA.norm_eps)
            expect["gate"].append(gram(x))
            expect["up"].append(gram(x))
            expect["down"].append(gram(jax.nn.silu(layers.dense(b["gate"], x)) * layers.dense(b["up"], x)))
            h = models.block(LLAMA, b, h, ctx)
        final = layers.rms_norm(p["final"]["norm"]["scale"], h, LLAMA.norm_eps)
        out = {f"blocks/{name}/kernel": jnp.stack(per_block) for name, per_block in expect.items()}
        return {**out, "head/kernel": gram(final)}

    expect = hand_grams(p, ids, w)
    assert sorted(grams) == sorted(expect)
    for name in expect:
        np.testing.assert_allclose(grams[name], expect[name], rtol=1e-4, atol=1e-5)


def test_layer_input_grams_skip_tied_heads_and_take_row_weights():
    """A tied LM head (GPT-2's `h @ E^T`, contracting E's second axis) is not an x @ W layer: neither the
    embedding nor anything else gets an entry for it. Per-row weights [B] broadcast over each row's tokens
    (weight 0 = a padding row)."""

    def tied_lm(params, ids):
        h = jnp.take(params["embed"], ids, axis=0)  # [B, S, D]
        h = jnp.tanh(layers.dense(params["mlp"], h))
        return jnp.einsum("bsd,vd->bsv", h, params["embed"])

    p = {"embed": _normal(11, 4), "mlp": {"kernel": _normal(4, 4), "bias": _normal(4)}}
    ids = jnp.asarray(RNG.integers(0, 11, (2, 3)), jnp.int32)
    grams = layer_input_grams(tied_lm, p, ids, np.array([1.0, 0.0], np.float32))
    assert sorted(grams) == ["mlp/kernel"]
    x = np.asarray(p["embed"], np.float64)[np.asarray(ids[0])]  # row 0's tokens
    np.testing.assert_allclose(grams["mlp/kernel"], x.T @ x / 3, rtol=1e-5, atol=1e-6)


def test_layer_input_grams_bad_input():
    params = {"layer": {"kernel": _normal(3, 2)}}
    x = _normal(4, 3)
    with pytest.raises(ValueError, match="no calibration data"):
        layer_input_grams(_linear_forward, params, x[:0])
    with pytest.raises(ValueError, match="no calibration data reached linear layer 'layer/kernel'"):
        layer_input_grams(_linear_forward, params, x, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="'layer/kernel'.*token_weights of shape"):
        layer_input_grams(_linear_forward, params, x, np.ones((4, 5), np.float32))

    def path_like(params, x):  # a kernel inside lax.cond, as the path engine skips padding steps
        return jax.lax.cond(x.sum() > 0, lambda: x @ params["layer"]["kernel"], lambda: x[:, :2])

    with pytest.raises(ValueError, match="'layer/kernel' enters a 'cond'"):
        layer_input_grams(path_like, params, x)


# ---------------------------------------------------------------- RegMean


def test_regmean_single_layer_is_least_squares_of_the_concatenated_regression():
    """alpha = 1: W* = argmin_W sum_k lambda_k ||X_k W - X_k W_k||^2 / N_k, solved with numpy lstsq on the
    stacked rows sqrt(lambda_k / N_k) X_k; the bias (no Gram) is the lambda-weighted average."""
    base = {"layer": {"kernel": _normal(4, 3), "bias": _normal(3)}}
    experts = [jax.tree.map(lambda x: x + _normal(*x.shape), base) for _ in range(2)]
    xs = [_normal(7, 4), _normal(5, 4)]
    lam = np.array([0.3, 0.7])
    calib = [Calibration(_linear_forward, x) for x in xs]
    out = regmean_from_data(base, experts, calib, weights=lam, alpha=1.0)
    rows = [np.sqrt(lam[k] / len(xs[k])) * xs[k].astype(np.float64) for k in range(2)]
    targets = [r @ np.asarray(e["layer"]["kernel"], np.float64) for r, e in zip(rows, experts, strict=True)]
    expect = np.linalg.lstsq(np.concatenate(rows), np.concatenate(targets), rcond=None)[0]
    np.testing.assert_allclose(out["layer"]["kernel"], expect, rtol=1e-4, atol=1e-5)
    bias = sum(lam[k] * np.asarray(experts[k]["layer"]["bias"]) for k in range(2))
    np.testing.assert_allclose(out["layer"]["bias"], bias, rtol=1e-6, atol=1e-6)


def test_regmean_alpha_and_stacked_blocks_closed_form():
    """alpha < 1 on stacked [L, in, out] leaves, Grams given: per block the float64 closed form
    (sum lambda_k G~_k)^-1 sum lambda_k G~_k W_k with G~ = alpha G + (1 - alpha) diag(G)."""
    base = {"blocks": {"w": {"kernel": _normal(2, 3, 2)}}, "norm": _normal(3)}
    experts = [jax.tree.map(lambda x: x + _normal(*x.shape), base) for _ in range(3)]
    grams = []
    for _ in range(3):
        x = _normal(2, 6, 3)
        grams.append({"blocks/w/kernel": np.einsum("lni,lnj->lij", x, x) / 6})
    lam, alpha = np.array([0.5, 0.2, 0.3]), 0.6
    out = regmean(base, experts, grams, weights=lam, alpha=alpha, nonlinear_scale=2.0)
    for l in range(2):
        mod = [
            alpha * g["blocks/w/kernel"][l] + (1 - alpha) * np.diag(np.diag(g["blocks/w/kernel"][l]))
            for g in grams
        ]
        a = sum(lam[k] * mod[k] for k in range(3))
        rhs = sum(
            lam[k] * mod[k] @ np.asarray(experts[k]["blocks"]["w"]["kernel"][l], np.float64) for k in range(3)
        )
        np.testing.assert_allclose(
            out["blocks"]["w"]["kernel"][l], np.linalg.solve(a, rhs), rtol=1e-4, atol=1e-5
        )
    deltas = sum(lam[k] * (np.asarray(experts[k]["norm"]) - base["norm"]) for k in range(3))
    np.testing.assert_allclose(out["norm"], base["norm"] + 2.0 * deltas, rtol=1e-5, atol=1e-6)


def test_regmean_of_identical_llamas_is_the_llama(llama_params):
    ids = jnp.asarray(RNG.integers(0, LLAMA.vocab_size, (2, 6)), jnp.int32)
    calib = [Calibration(_llama_forward, ids)] * 2
    base = models.init(LLAMA, jax.random.key(3))
    out = merge_with_data("regmean", base, [llama_params, llama_params], None, calib, weights=[0.4, 0.6])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4), out, llama_params)


def test_regmean_bad_input():
    base = {"layer": {"kernel": _normal(4, 3)}}
    experts = [base, base]
    few = Calibration(_linear_forward, _normal(2, 4))  # 2 tokens, 4 input dimensions
    with pytest.raises(ValueError, match=r"'layer/kernel' is singular \(smallest/largest eigenvalue"):
        regmean_from_data(base, experts, [few, few], alpha=1.0)
    dead = _normal(6, 4)
    dead[:, 2] = 0.0
    calib = Calibration(_linear_forward, dead)
    with pytest.raises(ValueError, match="'layer/kernel' is singular: input dimension 2 is zero"):
        regmean_from_data(base, experts, [calib, calib], alpha=0.9)
    regmean_from_data(base, experts, [calib, calib], alpha=0.9, ridge=1e-3)  # the fix the error names
    with pytest.raises(ValueError, match="no calibration data for task 1"):
        regmean_from_data(base, experts, [calib, Calibration(_linear_forward, dead[:0])])
    with pytest.raises(ValueError, match="model 1's Gram matrix of 'layer/kernel' has shape"):
        regmean(base, experts, [{"layer/kernel": np.eye(4)}, {"layer/kernel": np.eye(3)}])
    with pytest.raises(ValueError, match="differs from the base at tensor 'layer/kernel'"):
        regmean(base, [base, {"layer": {"kernel": _normal(4, 2)}}], [{}, {}])
    with pytest.raises(ValueError, match="weights must be finite, >= 0 and not all 0"):
        regmean(base, experts, [{}, {}], weights=[0.0, 0.0])


# ---------------------------------------------------------------- Fisher


def _mlp_forward(params, x):
    """Logits [B, ..., C] of a two-layer tanh network (per position when x is [B, S, D])."""
    return jnp.tanh(x @ params["w1"]) @ params["w2"] + params["b"]


def _mlp_params(d=3, hidden=4, classes=3):
    return {"w1": _normal(d, hidden), "w2": _normal(hidden, classes), "b": _normal(classes, scale=0.5)}


FISHER = jax.jit(diagonal_fisher, static_argnums=1, static_argnames=("mode", "num_samples"))


@jax.jit
def _log_prob_grad(params, x, weight, position, label):
    """grad_params of weight * log p(label | x, position) for one row x [S, D] (jitted once: the naive loops
    below call it per row, position and label)."""
    return jax.grad(lambda p: weight * jax.nn.log_softmax(_mlp_forward(p, x), -1)[position, label])(params)


def test_diagonal_fisher_expected_and_sampled_equal_naive_loops():
    """F = mean over real rows of E_y[g^2]: "expected" as a Python loop over rows, positions and classes of
    p(c) * grad^2; "sample" as a loop over rows and draws (the documented key scheme) of (sum_s grad)^2."""
    params = _mlp_params()
    x = _normal(3, 2, 3)  # 3 rows of 2 positions
    w = np.array([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]], np.float32)  # row 2 is padding
    key, num_samples = jax.random.key(7), 2
    square = lambda g: jax.tree.map(lambda a: np.asarray(a, np.float64) ** 2, g)  # noqa: E731
    add = lambda a, b, c=1.0: jax.tree.map(lambda u, v: u + c * np.asarray(v, np.float64), a, b)  # noqa: E731
    expected = sampled = jax.tree.map(lambda a: np.zeros(a.shape), params)
    for n in range(2):  # the real rows
        logp = np.asarray(jax.nn.log_softmax(_mlp_forward(params, x[n]), -1))  # [2, C]
        for s in range(2):
            for c in range(3):
                expected = add(
                    expected, square(_log_prob_grad(params, x[n], w[n, s], s, c)), np.exp(logp[s, c])
                )
        for j in range(num_samples):
            y = jax.random.categorical(jax.random.fold_in(jax.random.fold_in(key, n), j), logp[None])[0]
            g = jax.tree.map(lambda a: np.zeros(a.shape), params)
            for s in range(2):
                g = add(g, _log_prob_grad(params, x[n], w[n, s], s, int(y[s])))
            sampled = add(sampled, square(g), 1.0 / num_samples)
    for mode, naive in (("expected", expected), ("sample", sampled)):
        fisher = FISHER(key, _mlp_forward, params, x, w, mode=mode, num_samples=num_samples)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b / 2, rtol=1e-4, atol=1e-7), fisher, naive)


def test_fisher_merge_formula_floor_and_zero_weight():
    a, b, c = ({"w": _normal(5), "i": np.arange(2)} for _ in range(3))
    fa, fb = {"w": np.abs(_normal(5)), "i": np.zeros(2)}, {"w": np.abs(_normal(5)), "i": np.zeros(2)}
    fa["w"][0] = fb["w"][0] = 0.0  # nobody sensitive: the floor gives the lambda-weighted average
    lam = [0.25, 0.75, 0.0]
    out = fisher_merge([a, b, c], [fa, fb, {"w": -np.ones(5), "i": np.zeros(2)}], weights=lam, floor=1e-6)
    fa_, fb_ = np.maximum(fa["w"], 1e-6), np.maximum(fb["w"], 1e-6)
    expect = (0.25 * fa_ * a["w"] + 0.75 * fb_ * b["w"]) / (0.25 * fa_ + 0.75 * fb_)
    np.testing.assert_allclose(out["w"], expect, rtol=1e-5)
    np.testing.assert_allclose(out["w"][0], 0.25 * a["w"][0] + 0.75 * b["w"][0], rtol=1e-5)
    np.testing.assert_array_equal(out["i"], a["i"])
    with pytest.raises(ValueError, match="model 1's Fisher of 'w' has negative"):
        fisher_merge([a, b], [fa, {"w": -np.ones(5), "i": np.zeros(2)}])
    with pytest.raises(ValueError, match="differs from the base at tensor 'w'"):
        fisher_merge([a, b], [fa, {"w": np.ones(4), "i": np.zeros(2)}])


def test_fisher_from_data_and_bad_input():
    params = _mlp_params()
    experts = [jax.tree.map(lambda x: x + _normal(*x.shape, scale=0.1), params) for _ in range(2)]
    w = np.array([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]], np.float32)
    calib = [Calibration(_mlp_forward, _normal(3, 2, 3), w) for _ in range(2)]  # the shapes of the test above
    out = merge_with_data(
        "fisher", params, experts, jax.random.key(0), calib, weights=[0.5, 0.5], mode="expected"
    )
    f = [
        FISHER(None, _mlp_forward, e, c.inputs, w, mode="expected")
        for e, c in zip(experts, calib, strict=True)
    ]
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5),
        out,
        fisher_merge(experts, f, weights=[0.5, 0.5]),
    )
    with pytest.raises(ValueError, match="every token weight is 0"):
        merge_with_data("fisher", params, experts, jax.random.key(0),
                        [calib[0], calib[1]._replace(token_weights=np.zeros((3, 2), np.float32))])  # fmt: skip
    with pytest.raises(ValueError, match="pass an explicit PRNG key"):
        merge_with_data("fisher", params, experts, None, calib)
    with pytest.raises(ValueError, match="do not match predictions of shape"):
        diagonal_fisher(jax.random.key(0), _mlp_forward, params, _normal(2, 3), np.ones((2, 5), np.float32))


# ---------------------------------------------------------------- AdaMerging


def _ada_problem():
    """Linear classifier, 3 classes, two tasks on orthogonal inputs. Expert 1 makes task 1 confident (class 0);
    expert 2 makes task 2 confident (class 1) through W but also adds a class-2 bias that blurs both tasks."""
    zeros = np.zeros(3, np.float32)
    base = {"layer": {"kernel": np.zeros((2, 3), np.float32), "bias": zeros}}
    e1 = {"layer": {"kernel": np.array([[4.0, 0, 0], [0, 0, 0]], np.float32), "bias": zeros}}
    e2 = {
        "layer": {
            "kernel": np.array([[0, 0, 0], [0, 4.0, 0]], np.float32),
            "bias": np.array([0, 0, 2.0], np.float32),
        }
    }
    return base, [e1, e2], _orthogonal_tasks(np.linspace(1.0, 2.0, 6, dtype=np.float32))


def _orthogonal_tasks(scales):
    """Task 1's rows s * e1, task 2's s * e2."""
    zero = np.zeros_like(scales)
    return [Calibration(_linear_forward, np.stack(cols, 1)) for cols in ((scales, zero), (zero, scales))]


def test_adamerging_layer_wise_recovers_known_good_coefficients():
    """The entropy-minimising layer-wise coefficients are known here: both kernels at the upper bound 1,
    expert 2's harmful bias at 0, expert 1's (zero) bias untouched at init."""
    base, experts, calib = _ada_problem()
    res = adamerging(jax.random.key(0), base, experts, calib, num_steps=150, learning_rate=0.05, batch_size=4)
    c = res.coefficients
    np.testing.assert_allclose(c["layer/kernel"], [1.0, 1.0], atol=1e-3)
    np.testing.assert_allclose(c["layer/bias"], [0.3, 0.0], atol=1e-3)
    assert float(res.losses[-1]) < 0.5 * float(res.losses[0])
    np.testing.assert_allclose(res.merged["layer"]["bias"], [0, 0, 0], atol=1e-3)


def test_adamerging_task_wise_finds_the_interior_optimum():
    """Base logits on task k's rows are s (8, 0, 8) (classes 0 and 2 tied) and expert k adds c s (0, 8, -8) / c*_k,
    so the margins of class 0 over classes 1 and 2 are s (8 - 8 c / c*_k) and s 8 c / c*_k: the entropy is
    symmetric about and minimal at c = c*_k / 2 for every s while c <= c*_k (beyond it class 1 takes over, with a
    margin below the optimum's 4 s up to c = 1 when c*_k > 2/3). With c* = (1, 0.8) the task-wise optimum in
    [0, 1]^2 is (0.5, 0.4) whatever the preference; a 201 x 201 grid of the full-data objective agrees."""
    tie = np.array([[8.0, 0, 8], [8, 0, 8]], np.float32)
    base = {"layer": {"kernel": tie, "bias": np.zeros(3, np.float32)}}
    experts = [{"layer": {"kernel": tie + np.array(d, np.float32), "bias": np.zeros(3, np.float32)}}
               for d in ([[0, 8, -8], [0, 0, 0]], [[0, 0, 0], [0, 10, -10]])]  # fmt: skip
    calib = _orthogonal_tasks(np.linspace(0.5, 1.0, 6, dtype=np.float32))
    lam = np.array([0.7, 0.3])
    res = adamerging(jax.random.key(1), base, experts, calib, num_steps=200, weights=lam, granularity="task",
                     learning_rate=0.02, batch_size=4)  # fmt: skip
    np.testing.assert_allclose(res.coefficients, [0.5, 0.4], atol=2e-3)

    grid = np.linspace(0.0, 1.0, 201)
    c = np.stack(np.meshgrid(grid, grid, indexing="ij"), -1)  # [G, G, 2]
    deltas = [np.asarray(e["layer"]["kernel"], np.float64) - tie for e in experts]
    kernel = tie + c[..., 0, None, None] * deltas[0] + c[..., 1, None, None] * deltas[1]  # [G, G, 2, 3]
    objective = 0.0
    for lam_k, cal in zip(lam, calib, strict=True):
        logits = np.einsum("ni,abio->abno", np.asarray(cal.inputs, np.float64), kernel)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        objective = objective + lam_k * (-(p * np.log(np.maximum(p, 1e-300))).sum(-1).mean(-1))
    best = np.unravel_index(np.argmin(objective), objective.shape)
    np.testing.assert_allclose([grid[best[0]], grid[best[1]]], [0.5, 0.4])


def test_adamerging_bad_input_and_merge_with_coefficients():
    base, experts, calib = _ada_problem()
    with pytest.raises(ValueError, match="no calibration data for task 0"):
        adamerging(
            jax.random.key(0),
            base,
            experts,
            [calib[0]._replace(inputs=np.zeros((0, 2))), calib[1]],
            num_steps=1,
        )
    with pytest.raises(ValueError, match="pass num_steps"):
        merge_with_data("adamerging", base, experts, jax.random.key(0), calib)
    with pytest.raises(ValueError, match="got calibration data for 1 tasks"):
        adamerging(jax.random.key(0), base, experts, calib[:1], num_steps=1)
    merged = merge_with_coefficients(base, experts, jnp.array([0.5, 2.0]))
    np.testing.assert_allclose(
        merged["layer"]["kernel"], 0.5 * experts[0]["layer"]["kernel"] + 2 * experts[1]["layer"]["kernel"]
    )


# ---------------------------------------------------------------- TSV-M


def _numpy_tsv(base, thetas, weights, scale, rank_fraction=None):
    """TSV-M per the paper with numpy, dropping weight-0 tasks."""
    live = [k for k, w in enumerate(weights) if w != 0]
    if base.ndim != 2:
        return base + scale * sum(weights[k] * (thetas[k] - base) for k in range(len(thetas))) / len(thetas)
    frac = 1.0 / len(thetas) if rank_fraction is None else rank_fraction
    r = max(1, int(min(base.shape) * frac))
    us, ss, vs = [], [], []
    for k in live:
        u, s, vt = np.linalg.svd(thetas[k] - base, full_matrices=False)
        us.append(u[:, :r])
        ss.append(weights[k] * s[:r])
        vs.append(vt[:r].T)
    u, v = np.concatenate(us, 1), np.concatenate(vs, 1)
    pu, _, qu = np.linalg.svd(u, full_matrices=False)
    pv, _, qv = np.linalg.svd(v, full_matrices=False)
    return base + scale * (pu @ qu) @ np.diag(np.concatenate(ss)) @ (pv @ qv).T


def test_tsv_matches_numpy_reference():
    base = {"blocks": {"w": _normal(2, 6, 5), "b": _normal(2, 5)}, "head": _normal(4, 6)}
    thetas = [jax.tree.map(lambda x: x + _normal(*x.shape), base) for _ in range(3)]
    for weights, scale, frac in (([1.5, 0.0, 1.5], 0.7, 0.4),):  # a weight-0 task is dropped
        out = merge("tsv", base, thetas, weights=weights, scale=scale, rank_fraction=frac)
        for l in range(2):
            expect = _numpy_tsv(
                base["blocks"]["w"][l].astype(np.float64),
                [t["blocks"]["w"][l] for t in thetas],
                weights,
                scale,
                frac,
            )
            np.testing.assert_allclose(out["blocks"]["w"][l], expect, rtol=1e-4, atol=1e-4)
            expect = _numpy_tsv(base["blocks"]["b"][l], [t["blocks"]["b"][l] for t in thetas], weights, scale)
            np.testing.assert_allclose(out["blocks"]["b"][l], expect, rtol=1e-5, atol=1e-5)
        expect = _numpy_tsv(
            base["head"].astype(np.float64), [t["head"] for t in thetas], weights, scale, frac
        )
        np.testing.assert_allclose(out["head"], expect, rtol=1e-4, atol=1e-4)
    one = merge(
        "tsv", base, thetas[:1]
    )  # one task at full rank: Procrustes of orthonormal columns is themselves
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), one, thetas[0])
    with pytest.raises(ValueError, match="rank_fraction must be in"):
        merge("tsv", base, thetas, rank_fraction=1.5)
    with pytest.raises(ValueError, match="differs from the base at tensor 'head'"):
        merge("tsv", base, [{**thetas[0], "head": _normal(4, 5)}])


# ---------------------------------------------------------------- registry and cost


def test_registry_errors_and_calibration_passes():
    base, experts, calib = _ada_problem()
    with pytest.raises(ValueError, match="unknown data-aware merge method 'ties'"):
        merge_with_data("ties", base, experts, None, calib)
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['density'\]"):
        merge_with_data("regmean", base, experts, None, calib, density=0.5)
    assert calibration_passes("regmean", calib, weights=[1.0, 0.0]) == (6, 0)
    assert calibration_passes("fisher", calib, num_samples=3) == (12, 36)
    assert calibration_passes("fisher", calib, mode="expected", params=base) == (12, 36)  # 3 classes
    assert calibration_passes("adamerging", calib, num_steps=10, batch_size=4) == (80, 80)
