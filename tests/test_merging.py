"""In-memory merges: hand-computed cases for every method, properties, and bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hm3_jax.merging import default_param_group, hm3_merge, kernels, layer_index, leaf_weights, merge, topk

BASE = {"a": jnp.zeros(3), "blocks": {"w": jnp.zeros((2, 3))}}
M1 = {"a": jnp.array([1.0, -2.0, 3.0]), "blocks": {"w": jnp.ones((2, 3))}}
M2 = {"a": jnp.array([3.0, 2.0, -1.0]), "blocks": {"w": -2.0 * jnp.ones((2, 3))}}


def _random_tree(key, scale=1.0, dtype=jnp.float32):
    k1, k2 = jax.random.split(key)
    return {
        "embed": {"embedding": (scale * jax.random.normal(k1, (4, 4))).astype(dtype)},
        "blocks": {"q": {"kernel": (scale * jax.random.normal(k2, (2, 4, 4))).astype(dtype)}},
    }


def _close(a, b, atol=1e-6):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=atol)


# ---------------------------------------------------------------- hand-computed cases


def test_linear_hand():
    out = merge("linear", BASE, [M1, M2], weights=[1.0, 3.0])
    _close(out["a"], [(1 + 9) / 4, (-2 + 6) / 4, (3 - 3) / 4])
    out = merge("linear", None, [M1, M2], weights=[1.0, 3.0], normalize=False)
    _close(out["a"], [10.0, 4.0, 0.0])


def test_task_arithmetic_hand():
    base = {"a": jnp.array([1.0, 1.0, 1.0])}
    m1 = {"a": jnp.array([2.0, -1.0, 4.0])}  # delta [1, -2, 3]
    m2 = {"a": jnp.array([4.0, 3.0, 0.0])}  # delta [3, 2, -1]
    out = merge("task_arithmetic", base, [m1, m2], weights=[0.5, 1.0], scale=2.0)
    _close(out["a"], 1.0 + 2.0 * np.array([0.5 + 3, -1 + 2, 1.5 - 1]))


def test_ties_hand():
    # deltas [1,-2,3] and [3,2,-1]; density 2/3 keeps k=2 each: [0,-2,3], [3,2,0];
    # elected sign of the sum [3,0,3] is + everywhere; agreeing entries: 3 (m2), 2 (m2), 3 (m1).
    out = merge("ties", BASE, [M1, M2], density=2 / 3)
    _close(out["a"], [3.0, 2.0, 3.0])
    # blocks: [1,1,1] -> ties at the threshold go to the lower index: [1,1,0]; [-2,-2,0]; sum [-1,-1,0].
    _close(out["blocks"]["w"], [[-2.0, -2.0, 0.0]] * 2)
    # weights enter the election and the disjoint mean: w=[1, 0.1]: sums [0.3, -1.8, 3], signs [+,-,+]
    out = merge("ties", BASE, [M1, M2], weights=[1.0, 0.1], density=2 / 3)
    _close(out["a"], [0.3 / 0.1, -2.0 / 1.0, 3.0 / 1.0])
    out = merge("ties", BASE, [M1, M2], weights=[1.0, 0.1], density=2 / 3, normalize=False)
    _close(out["a"], [0.3, -2.0, 3.0])


def test_dare_hand_and_masks():
    delta = jnp.arange(1.0, 1001.0)
    key = jax.random.key(7)
    out = kernels.dare(key, delta, 0.25)
    kept = out != 0
    _close(out[kept], delta[kept] / 0.75, atol=1e-4)
    expected = np.asarray(jax.random.bernoulli(key, 0.75, delta.shape))
    np.testing.assert_array_equal(np.asarray(kept), expected)


def test_slerp_hand():
    base = {"a": jnp.array([1.0, 0.0])}
    other = {"a": jnp.array([0.0, 2.0])}
    out = merge("slerp", base, [other], t=0.5)
    # theta0 = pi/2; s0 = s1 = sin(pi/4) / 1
    _close(out["a"], np.sin(np.pi / 4) * np.array([1.0, 2.0]))
    colinear = merge("slerp", base, [{"a": jnp.array([2.0, 0.0])}], t=0.25)
    _close(colinear["a"], [1.25, 0.0])


def test_consensus_hand():
    # weighted deltas [1,-2,3], [3,2,-1]; tau_MTL [4,0,2]; lambda 0.4:
    # m1 = [1>=1.2, 2>=0.8, 3>=0.4] = [0,1,1]; m2 = [3>=0.4, 2>=0.8, 1>=1.2] = [1,1,0]; k=2 keeps index 1 only.
    out = merge("consensus", BASE, [M1, M2])
    _close(out["a"], [0.0, 0.0, 0.0])
    out = merge("consensus", BASE, [M1, M2], k=1)
    _close(out["a"], [4.0, 0.0, 2.0])
    out = merge("consensus", BASE, [M1, M2], tall_lambda=0.1)
    _close(out["a"], [4.0, 0.0, 2.0])


def test_pcb_hand():
    base = {"a": jnp.zeros(2)}
    m1 = {"a": jnp.array([1.0, 0.0])}
    m2 = {"a": jnp.array([0.0, 2.0])}
    n = 2
    d = np.array([[1.0, 0.0], [0.0, 2.0]])

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    def l2n(x):
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    intra = softmax(n * l2n(d * d))
    inter = np.stack([softmax(l2n(d[i] * d)).sum(0) for i in range(n)])
    beta = intra * inter  # density 1: keep all
    expected = (beta * d).sum(0) / beta.sum(0)
    _close(merge("pcb", base, [m1, m2], density=1.0)["a"], expected, atol=1e-6)
    # density 0.5 keeps each model's larger-beta entry: m1 index 0, m2 index 1 -> entries pass unchanged.
    _close(merge("pcb", base, [m1, m2], density=0.5)["a"], [1.0, 2.0])


def test_topk_exact_count_and_radix_select():
    x = jax.random.normal(jax.random.key(0), (1000,))
    for density in (0.01, 0.3, 0.5, 0.999):
        mask = np.asarray(topk.topk_magnitude_mask(x, density))
        k = int(density * 1000)
        assert mask.sum() == k
        order = np.argsort(-np.abs(np.asarray(x)), kind="stable")
        np.testing.assert_array_equal(np.sort(np.flatnonzero(mask)), np.sort(order[:k]))
    ties_x = jnp.array([1.0, -1.0, 1.0, 0.5, -1.0])
    np.testing.assert_array_equal(topk.topk_magnitude_mask(ties_x, 0.4), [True, True, False, False, False])


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize(
    "method,hparams",
    [
        ("linear", {}),
        ("task_arithmetic", {"normalize": True}),
        ("ties", {"density": 0.5}),
        ("dare_linear", {"drop_rate": 0.3, "normalize": True}),
        ("dare_ties", {"drop_rate": 0.3}),
        ("consensus", {"k": 1}),
        ("pcb", {"density": 0.5}),
    ],
)
def test_identical_models_give_the_model_back(method, hparams):
    model = _random_tree(jax.random.key(1))
    out = merge(method, model, [model, model, model], jax.random.key(2), **hparams)
    jax.tree.map(lambda a, b: _close(a, b), out, model)


def test_slerp_endpoints_and_identity():
    a, b = _random_tree(jax.random.key(1)), _random_tree(jax.random.key(2))
    jax.tree.map(lambda x, y: _close(x, y, 1e-5), merge("slerp", a, [b], t=0.0), a)
    jax.tree.map(lambda x, y: _close(x, y, 1e-5), merge("slerp", a, [b], t=1.0), b)
    jax.tree.map(lambda x, y: _close(x, y, 1e-5), merge("slerp", a, [a], t=0.3), a)


def test_task_arithmetic_scale_zero_gives_base():
    base = _random_tree(jax.random.key(0))
    models = [_random_tree(jax.random.key(i)) for i in (1, 2)]
    jax.tree.map(lambda a, b: _close(a, b, 0.0), merge("task_arithmetic", base, models, scale=0.0), base)


def test_ties_density_one_single_model_is_task_arithmetic():
    base = _random_tree(jax.random.key(0))
    model = _random_tree(jax.random.key(1))
    ties = merge("ties", base, [model], density=1.0, weights=[0.7], normalize=False)
    ta = merge("task_arithmetic", base, [model], weights=[0.7])
    jax.tree.map(lambda a, b: _close(a, b), ties, ta)


def test_dare_p0_is_its_non_dare_twin():
    base = _random_tree(jax.random.key(0))
    models = [_random_tree(jax.random.key(i)) for i in (1, 2, 3)]
    key = jax.random.key(4)
    w = [0.2, 0.3, 0.5]
    a = merge("dare_linear", base, models, key, weights=w, drop_rate=0.0)
    b = merge("task_arithmetic", base, models, weights=w)
    jax.tree.map(lambda x, y: _close(x, y), a, b)
    a = merge("dare_ties", base, models, key, weights=w, drop_rate=0.0, density=0.6, normalize=True)
    b = merge("ties", base, models, weights=w, density=0.6)
    jax.tree.map(lambda x, y: _close(x, y), a, b)


def test_dare_expectation_over_keys_is_task_arithmetic():
    """E[DARE_p(delta)] = delta. Over N keys each entry's mean has std <= |delta_k| w_k sqrt(p/(1-p)/N)
    summed over models; we require every entry within 5 such standard deviations (a false failure has
    probability < 1e-4 over the 80 entries)."""
    base = {"w": jnp.zeros((8, 10))}
    models = [{"w": jax.random.normal(jax.random.key(i), (8, 10))} for i in (1, 2)]
    w, p, n = [0.6, 0.4], 0.5, 2000
    keys = jax.random.split(jax.random.key(0), n)
    draw = jax.jit(jax.vmap(lambda k: merge("dare_linear", base, models, k, weights=w, drop_rate=p)["w"]))
    mean = np.asarray(draw(keys)).mean(0)
    ta = np.asarray(merge("task_arithmetic", base, models, weights=w)["w"])
    std = np.sqrt(
        sum((wk * np.asarray(m["w"])) ** 2 for wk, m in zip(w, models, strict=True)) * p / (1 - p) / n
    )
    assert np.all(np.abs(mean - ta) <= 5 * std + 1e-6)
    assert np.abs(mean - ta).max() > 0  # the draws really are random


@pytest.mark.parametrize("method", ["dare_ties", "pcb", "slerp"])
def test_jit_matches_eager(method):
    base = _random_tree(jax.random.key(0))
    models = [_random_tree(jax.random.key(i)) for i in (1, 2)]
    hparams = {
        "ties": {"density": 0.5},
        "dare_ties": {"drop_rate": 0.3, "density": 0.5},
        "consensus": {},
        "pcb": {"density": 0.4},
        "slerp": {"t": 0.3},
    }[method]
    if method == "slerp":
        models = models[:1]
    fn = functools.partial(merge, method, key=jax.random.key(5), **hparams)
    eager = fn(base, models)
    jitted = jax.jit(fn)(base, models)
    jax.tree.map(lambda a, b: _close(a, b, 1e-6), eager, jitted)


def test_bf16_in_bf16_out():
    base = _random_tree(jax.random.key(0), dtype=jnp.bfloat16)
    models = [_random_tree(jax.random.key(i), dtype=jnp.bfloat16) for i in (1, 2)]
    out = merge("ties", base, models, density=0.5)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(out))
    # float32 accumulation: equals the float32 merge of the same inputs rounded once to bf16
    up = jax.tree.map(lambda x: x.astype(jnp.float32), (base, models))
    ref = merge("ties", up[0], up[1], density=0.5)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype(jnp.bfloat16)), out, ref)


def test_hm3_merge_is_dare_ties_with_preference_weights():
    base = _random_tree(jax.random.key(0))
    experts = [_random_tree(jax.random.key(i)) for i in (1, 2, 3)]
    pref = jnp.array([0.5, 0.3, 0.2])
    key = jax.random.key(9)
    a = hm3_merge(base, experts, pref, key, density=0.7, drop_rate=0.2)
    b = merge(
        "dare_ties", base, experts, key, weights=list(pref), density=0.7, drop_rate=0.2, normalize=False
    )
    jax.tree.map(lambda x, y: _close(x, y, 0.0), a, b)
    # traced preference: the whole merge jits, one compilation for new preferences
    fn = jax.jit(lambda p: hm3_merge(base, experts, p, key, density=0.7, drop_rate=0.2))
    jax.tree.map(lambda x, y: _close(x, y, 1e-6), fn(pref), a)


# ---------------------------------------------------------------- per-block / per-group weights


def test_param_groups_and_layer_index():
    assert default_param_group("blocks/q/kernel") == "attention"
    assert default_param_group("blocks/gate/kernel") == "mlp"
    assert default_param_group("blocks/attn_norm/scale") == "norm"
    assert default_param_group("embed/embedding") == "embeddings"
    assert default_param_group("head/kernel") == "embeddings"
    assert default_param_group("model.layers.0.self_attn.o_proj.weight") == "attention"
    assert default_param_group("model.layers.0.post_attention_layernorm.weight") == "norm"
    assert default_param_group("model.layers.0.mlp.down_proj.weight") == "mlp"
    assert default_param_group("transformer.h.0.mlp.c_proj.weight") == "mlp"
    assert default_param_group("transformer.h.0.attn.c_proj.weight") == "attention"
    assert default_param_group("lm_head.weight") == "embeddings"
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("vit.encoder.layer.7.output.dense.weight") == 7
    assert layer_index("model.embed_tokens.weight") is None


def test_per_block_and_per_group_weights():
    base = {"blocks": {"q": jnp.zeros((2, 3)), "up": jnp.zeros((2, 3))}, "embed": jnp.zeros(3)}
    model = {"blocks": {"q": jnp.ones((2, 3)), "up": jnp.ones((2, 3))}, "embed": jnp.ones(3)}
    out = merge("task_arithmetic", base, [model], weights=[jnp.array([0.25, 0.75])])
    _close(out["blocks"]["q"], [[0.25] * 3, [0.75] * 3])
    _close(out["embed"], [0.5] * 3)  # outside the blocks: the mean of the per-block vector
    out = merge(
        "task_arithmetic", base, [model], weights=[{"attention": [0.1, 0.2], "mlp": 0.3, "default": 0.9}]
    )
    _close(out["blocks"]["q"], [[0.1] * 3, [0.2] * 3])
    _close(out["blocks"]["up"], [[0.3] * 3] * 2)
    _close(out["embed"], [0.9] * 3)
    w = leaf_weights([1.0, [0.0, 1.0, 2.0]], "model.layers.2.mlp.up_proj.weight", (4, 4), 2)
    _close(w, [1.0, 2.0])
    with pytest.raises(ValueError, match="parameter group 'embeddings'"):
        merge("task_arithmetic", base, [model], weights=[{"attention": 1.0, "mlp": 1.0}])
    with pytest.raises(ValueError, match="per-block vector of length 3"):
        merge("task_arithmetic", base, [model], weights=[jnp.ones(3)])


# ---------------------------------------------------------------- bad input


def test_unknown_method_lists_known():
    with pytest.raises(ValueError, match="known methods: consensus, dare_linear, dare_ties, linear, pcb"):
        merge("frankenstein", BASE, [M1])


def test_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        merge("ties", BASE, [])
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        merge("ties", BASE, [M1], density=1.5)
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        merge("ties", BASE, [M1], density=0.0)
    with pytest.raises(ValueError, match=r"drop_rate must be in \[0, 1\)"):
        merge("dare_ties", BASE, [M1], jax.random.key(0), drop_rate=1.0)
    with pytest.raises(ValueError, match="weights: got 3 values for 2 models"):
        merge("ties", BASE, [M1, M2], weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="explicit PRNG key"):
        merge("dare_ties", BASE, [M1], drop_rate=0.1)
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        merge("ties", BASE, [M1], desnity=0.5)
    other = {"a": jnp.zeros(4), "blocks": {"w": jnp.zeros((2, 3))}}
    with pytest.raises(ValueError, match="tensor 'a': shape \\(4,\\) vs \\(3,\\)"):
        merge("ties", BASE, [M1, other])
    with pytest.raises(ValueError, match="tensor 'blocks/w' missing"):
        merge("ties", BASE, [{"a": jnp.zeros(3), "blocks": {"v": jnp.zeros((2, 3))}}])
    nan = {"a": jnp.array([1.0, jnp.nan, 0.0]), "blocks": {"w": jnp.zeros((2, 3))}}
    with pytest.raises(ValueError, match="NaN in model 1 at tensor 'a'"):
        merge("ties", BASE, [M1, nan])
    with pytest.raises(ValueError, match="exactly one model"):
        merge("slerp", BASE, [M1, M2], t=0.5)


def test_host_topk_threshold_matches_radix_select_with_ties():
    """Heavy ties (magnitudes from 4 values, both signs): the numpy threshold pair equals the jitted radix
    select's, and both keep exactly the k largest with ties to the lower flat index (by a stable sort)."""
    rng = np.random.default_rng(5)
    x = (rng.integers(0, 4, size=(7, 9)) * rng.choice([-1.0, 1.0], size=(7, 9))).astype(np.float32)
    bits = np.abs(x).view(np.uint32).reshape(-1)
    for density in (0.1, 0.37, 0.5, 0.99):
        k = int(density * x.size)
        host = topk.host_topk_threshold(bits, density)
        np.testing.assert_array_equal(
            host, np.asarray(topk.topk_threshold(jnp.asarray(x), density, on_host=False))
        )
        # the callback path (the default on CPU) under jit and vmap gives the radix select's pairs
        fn = jax.jit(jax.vmap(lambda v, d=density: topk.topk_threshold(v, d, on_host=True)))
        np.testing.assert_array_equal(
            np.asarray(fn(jnp.stack([jnp.asarray(x), -jnp.asarray(x)[::-1]]))),
            np.stack([host, topk.host_topk_threshold(np.abs(-x[::-1]).view(np.uint32).reshape(-1), density)]),
        )
        expected = np.zeros(x.size, bool)
        expected[np.argsort(-np.abs(x).reshape(-1), kind="stable")[:k]] = True
        mask = np.asarray(topk.mask_from_threshold(jnp.asarray(x), host)).reshape(-1)
        np.testing.assert_array_equal(mask, expected)
        # a chunk with its flat offset gives the same entries
        chunk = np.asarray(topk.mask_from_threshold(jnp.asarray(x.reshape(-1)[20:40]), host, 20))
        np.testing.assert_array_equal(chunk, expected[20:40])
    np.testing.assert_array_equal(topk.host_topk_threshold(bits, 1.0), [0, 0xFFFFFFFF])


def test_blockwise_merge_of_large_stacked_leaves_gives_the_same_values(monkeypatch):
    """Stacked leaves above `BLOCKWISE_MERGE_BYTES` are merged one block at a time (memory: K + 1 float32 copies
    of one block); the values equal the one-program merge over all blocks, DARE masks included."""
    from hm3_jax import models
    from hm3_jax.merging import api

    config = models.ModelConfig(
        family="llama", vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=3, num_heads=2
    )
    base = models.init(config, jax.random.PRNGKey(0))
    experts = [
        jax.tree.map(lambda x, i=i: x + 0.05 * jax.random.normal(jax.random.PRNGKey(10 + i), x.shape), base)
        for i in range(3)
    ]
    key = jax.random.PRNGKey(3)
    for method, hp in (("dare_ties", dict(density=0.5, drop_rate=0.3)), ("ties", dict(density=0.4))):
        whole = api.merge(method, base, experts, key, weights=[0.5, 0.3, 0.2], **hp)
        with monkeypatch.context() as m:
            m.setattr(api, "BLOCKWISE_MERGE_BYTES", 0)
            blockwise = api.merge(method, base, experts, key, weights=[0.5, 0.3, 0.2], **hp)
        for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(blockwise), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_chunked_merge_of_large_flat_leaves_gives_the_same_values(monkeypatch):
    """Non-stacked leaves above `CHUNKED_MERGE_BYTES` (embeddings, LM heads) are merged in flat chunks by the
    elementwise methods (DARE survivors drawn for the whole leaf, TIES' top-k cut found on the host first); the
    values equal the whole-leaf merge bit for bit, over several chunks and a padded last one (dare_ties has both
    the survivors and the cut; the streaming merge's tests cover the other methods' chunks). Methods outside
    `CHUNKED_METHODS` (PCB: whole-tensor statistics) still merge the leaf whole."""
    from hm3_jax.merging import api

    rng = np.random.default_rng(0)
    base = {"embed": rng.normal(size=(97, 130)).astype(np.float32), "norm": np.ones(130, np.float32)}
    experts = [jax.tree.map(lambda x, i=i: x + 0.05 * rng.normal(size=x.shape).astype(np.float32), base)
               for i in range(3)]  # fmt: skip
    key = jax.random.PRNGKey(3)
    cases = (
        ("dare_ties", dict(density=0.5, drop_rate=0.3)),
        ("task_arithmetic", dict(scale=0.7)),
        ("pcb", dict(density=0.4)),
    )
    calls = []
    real = api.merge_leaf_in_chunks
    for method, hp in cases:
        whole = api.merge(method, base, experts, key, weights=[0.5, 0.3, 0.2], **hp)
        with monkeypatch.context() as m:
            m.setattr(api, "CHUNKED_MERGE_BYTES", 4 * 130 * 4)  # the [97, 130] leaf, not the [130] one
            m.setattr(api, "CHUNK_ELEMENTS", 4096)  # 12610 elements: 4 chunks, the last one padded
            m.setattr(
                api,
                "merge_leaf_in_chunks",
                lambda *a, method=method, **k: calls.append(method) or real(*a, **k),
            )
            chunked = api.merge(method, base, experts, key, weights=[0.5, 0.3, 0.2], **hp)
        for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=method)
    assert calls == [method for method, _ in cases if method != "pcb"]  # the chunked path ran, once per leaf
