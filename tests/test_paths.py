"""Tests of hm3_jax.paths: engine (strategies, cache, recompiles, cost), prefix tree, alignment."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hm3_jax import models
from hm3_jax.paths import alignment, build_prefix_tree, canonicalize, flops, make_engine
from hm3_jax.tasks.exact_match import make_exact_match_objective

L, K, T_MAX = 3, 2, 5  # layers per source, sources in the pool (2 experts, no merged model needed here)
CFG = models.ModelConfig(
    family="llama", vocab_size=24, hidden_size=16, intermediate_size=32, num_layers=L, num_heads=2
)


class Objective(NamedTuple):
    name: str
    metric: str
    device_fn: object
    host_fn: object


def likelihood_objective(name, ids, batch_size):
    """Synthetic continuous score: 100 * exp(mean next-token log-likelihood), lax.map over batches."""
    ids = np.asarray(ids, np.int32).reshape(-1, batch_size, ids.shape[-1])

    def device_fn(forward):
        def one(x):
            lp = jax.nn.log_softmax(forward(x[:, :-1]), -1)
            return jnp.take_along_axis(lp, x[:, 1:, None], -1)[..., 0].mean(-1)

        return jax.lax.map(one, jnp.asarray(ids)).reshape(-1)

    return Objective(name, "exact_match", device_fn, lambda a: 100.0 * float(np.exp(np.mean(a))))


@pytest.fixture(scope="module")
def setup():
    experts = [models.init(CFG, jax.random.PRNGKey(i)) for i in range(K)]
    pool = models.make_pool([p["blocks"] for p in experts])
    rng = np.random.default_rng(0)
    # a "task" the experts solve perfectly is not needed: the continuous objective sees every difference
    pairs = [(list(rng.integers(3, 24, 3)), list(rng.integers(3, 24, 1))) for _ in range(6)]
    objectives = [
        likelihood_objective("lik_a", rng.integers(0, 24, (4, 9)), 2),
        likelihood_objective("lik_b", rng.integers(0, 24, (2, 6)), 2),
        make_exact_match_objective("em", pairs, 0, 3),
    ]
    shell = models.shell_of(experts[0])
    engine = make_engine(CFG, shell, pool, objectives, strategy="map", chunk_size=4, node_chunk_size=8)
    plain = make_engine(
        CFG, shell, pool, objectives, strategy="map", chunk_size=4, prefix_sharing=False, pool_id="plain"
    )
    return dict(experts=experts, pool=pool, objectives=objectives, shell=shell, engine=engine, plain=plain)


def policy_like_paths(seed, n):
    """Paths sampled around two modes (shared prefixes, some repeats and padding), like a policy's batch."""
    rng = np.random.default_rng(seed)
    modes = np.array([[0, 1, 4, 5, 2], [3, 4, 1, 2, -1]], np.int32)
    out = modes[rng.integers(0, 2, n)].copy()
    for row in out:
        cut = rng.integers(1, T_MAX + 1)
        row[cut:] = rng.integers(-1, K * L, T_MAX - cut)
    return out


def reference_scores(setup, paths, junction=None):
    """Independent reference: every objective on `models.apply_path`, one path at a time (no engine)."""

    @jax.jit
    def one(path, j):
        fwd = lambda ids: models.apply_path(CFG, setup["shell"], setup["pool"], path, ids, j)
        return tuple(o.device_fn(fwd) for o in setup["objectives"])

    out = []
    for i, path in enumerate(paths):
        j = None if junction is None else {k: jnp.asarray(v[i]) for k, v in junction.items()}
        raw = one(jnp.asarray(path), j)
        out.append([o.host_fn(np.asarray(r)) for o, r in zip(setup["objectives"], raw, strict=True)])
    return np.asarray(out)


def test_canonicalize_moves_padding_and_junction_rows():
    paths = np.array([[3, -1, 5], [-1, -1, 2]])
    j = {"scale": np.arange(18, dtype=np.float32).reshape(2, 3, 3), "shift": np.zeros((2, 3, 3))}
    out, jc, lengths = canonicalize(paths, j)
    np.testing.assert_array_equal(out, [[3, 5, -1], [2, -1, -1]])
    np.testing.assert_array_equal(lengths, [2, 1])
    np.testing.assert_array_equal(jc["scale"][0, 1], [6, 7, 8])  # the row of step "5" moved with it
    np.testing.assert_array_equal(jc["scale"][0, 2], [1, 1, 1])  # padding rows are identity
    with pytest.raises(ValueError, match="pool has only"):
        canonicalize(paths, None, pool_size=4)
    with pytest.raises(ValueError, match="junction"):
        canonicalize(paths, {"scale": np.ones((2, 3, 4))})


def test_prefix_tree_structure():
    paths = np.array([[1, 2, 3], [1, 2, -1], [1, 4, -1], [5, -1, -1]], np.int32)
    tree = build_prefix_tree(paths, np.array([3, 2, 2, 1]))
    # preorder: 1, 1-2 (ends path 1), 1-2-3 (ends path 0), 1-4 (ends path 2), 5 (ends path 3)
    np.testing.assert_array_equal(tree.block, [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(tree.depth, [1, 2, 3, 2, 1])
    np.testing.assert_array_equal(tree.terminal, [-1, 1, 0, 2, 3])
    assert tree.num_block_steps == 5  # plain evaluation would run 3 + 2 + 2 + 1 = 8
    with pytest.raises(ValueError, match="distinct"):
        build_prefix_tree(paths[[0, 0]], np.array([3, 3]))


def test_flops_formula_by_hand():
    # D=16, F=32, H=2, hd=8, KV=2: proj 2*2*16*16 + 2*2*16*16 = 2048; attn at context 6: 2*2*6*16 = 384;
    # MLP 3*2*16*32 = 3072 -> 5504 per token; head 2*16*24 = 768
    assert flops.block_flops_per_token(CFG, 6) == 5504
    assert flops.head_flops_per_token(CFG) == 768
    assert flops.teacher_forced_flops(CFG, 2, 6, 3) == 12 * (3 * 5504 + 768)
    # decoding 2 rows, prompt 3, 2 new tokens, 3 block steps: cache of 5 slots -> attn 2*2*5*16 = 320, block
    # 2048 + 320 + 3072 = 5440 per token for 3 + 1 tokens per row; the head on 2 positions per row only
    assert flops.decode_flops(CFG, 2, 3, 2, 3) == 2 * 4 * 3 * 5440 + 2 * 2 * 768


def test_head_flops_count_the_positions_the_objectives_read(setup):
    """The likelihood objectives read the logits of every position; exact match asks for the target positions
    only (`positions=`), and the engine computes and counts the head there only."""
    em = setup["objectives"][2]
    em_positions = sum(p.shape[0] * p.shape[1] * p.shape[2] for p in em.arrays.tree["target_positions"])
    assert em_positions < sum(ids.size for ids in em.arrays.tree["input_ids"])
    expected = flops.head_flops_per_token(CFG) * (4 * 8 + 2 * 5 + em_positions)
    assert setup["engine"]._shared["tf_head_flops"] == expected


def test_path_flops_of_one_path_alone(setup):
    """`path_flops` = blocks x length + the heads the objectives read, what the plain engine counts."""
    shared = setup["engine"]._shared
    assert setup["engine"].path_flops(3) == 3 * shared["tf_block_flops"] + shared["tf_head_flops"]
    path = np.array([[0, 4, 2, -1, -1]], np.int32)
    result = setup["plain"].evaluate(path, use_cache=False)
    assert result.cost.flops == setup["plain"].path_flops(3)


def test_identity_path_scores_what_the_expert_scores(setup):
    engine = setup["engine"]
    for k, expert in enumerate(setup["experts"]):
        own = [o.host_fn(np.asarray(o.device_fn(lambda ids, p=expert: models.apply(CFG, p, ids))))
               for o in setup["objectives"]]  # fmt: skip
        path = np.full((1, T_MAX), -1, np.int32)
        path[0, :L] = np.arange(L) + k * L
        for eng in (engine, setup["plain"]):  # the expert's own shell: with_model reuses the compiled code
            eng = eng.with_model(models.shell_of(expert), setup["pool"])
            np.testing.assert_array_equal(eng.evaluate(path).scores[0], own)


def test_prefix_tree_equals_plain_and_reference_and_saves_work(setup):
    paths = policy_like_paths(1, 10)
    tree_result = setup["engine"].evaluate(paths, use_cache=False)
    plain_result = setup["plain"].evaluate(paths, use_cache=False)
    np.testing.assert_array_equal(tree_result.scores, plain_result.scores)
    np.testing.assert_allclose(tree_result.scores, reference_scores(setup, paths), rtol=1e-6, atol=1e-6)
    assert tree_result.cost.block_steps < plain_result.cost.block_steps == tree_result.cost.block_steps_plain
    assert tree_result.cost.flops < tree_result.cost.flops_plain


def test_cache_hits_and_no_recompiles(setup):
    engine = setup["engine"]
    first = engine.evaluate(policy_like_paths(2, 6))
    traces = engine.num_traces
    paths = policy_like_paths(3, 7)
    paths = np.concatenate([paths, paths[:3]])  # in-batch duplicates
    result = engine.evaluate(paths)
    assert result.cost.num_unique <= 7 and result.cost.num_evaluations == result.cost.num_unique - (
        result.cost.num_cache_hits
    )
    np.testing.assert_array_equal(result.scores[-3:], result.scores[:3])
    again = engine.evaluate(paths)
    assert again.cost.num_evaluations == 0 and again.cost.flops == 0
    assert again.cost.num_cache_hits == again.cost.num_unique
    np.testing.assert_array_equal(again.scores, result.scores)
    # new paths, new batch sizes, padding in the middle of a row, and a new model: no new traces
    weird = np.array([[0, -1, 1, -1, 2]], np.int32)
    np.testing.assert_array_equal(
        engine.evaluate(weird).scores, engine.evaluate(weird[:, [0, 2, 4, 1, 3]]).scores
    )
    other = engine.with_model(models.shell_of(setup["experts"][1]), setup["pool"])
    assert other.evaluate(paths[:2]).cost.num_evaluations == 2  # another model: its own cache entries
    assert engine.num_traces == traces and first.cost.num_evaluations > 0
    assert all(v == 1 for v in engine.num_traces.values())


def test_compiled_programs_do_not_keep_a_models_pool_alive(setup):
    """`with_model` copies share the compiled programs; a copy's pool must be freed once the copy is gone (the
    programs' closures captured the first copy that compiled them, with its whole pool: two extra pools per
    split of a run, what ran Qwen2.5-0.5B's shapes out of memory)."""
    import gc
    import weakref

    for prefix_sharing in (True, False):  # the prefix tree's program and the plain (map) program
        engine = make_engine(CFG, setup["shell"], setup["pool"], setup["objectives"], strategy="map",
                             chunk_size=4, prefix_sharing=prefix_sharing, pool_id=f"leak{prefix_sharing}")  # fmt: skip
        pool = jax.tree.map(lambda x: x + 0, setup["pool"])  # a fresh copy of the pool's buffers
        refs = [weakref.ref(x) for x in jax.tree.leaves(pool)]
        copy = engine.with_model(setup["shell"], pool, pool_id="copy")
        assert copy.evaluate(policy_like_paths(5, 3)).cost.num_evaluations == 3  # compiles its programs
        del copy, pool
        gc.collect()
        assert all(r() is None for r in refs), f"prefix_sharing={prefix_sharing}: the copy's pool is alive"
        assert engine.evaluate(policy_like_paths(5, 3)).scores.shape == (3, 3)  # programs still work


def test_strategies_agree(setup):
    paths = policy_like_paths(4, 5)
    ref = setup["plain"].evaluate(paths).scores
    mesh = jax.make_mesh((1,), ("paths",))
    for strategy in ("vmap", "shard"):
        eng = make_engine(CFG, setup["shell"], setup["pool"], setup["objectives"], strategy=strategy,
                          chunk_size=4, prefix_sharing=False, mesh=mesh)  # fmt: skip
        np.testing.assert_allclose(eng.evaluate(paths).scores, ref, rtol=1e-5, atol=1e-5)


def test_threads_give_the_same_scores_and_pass_errors_on(setup, monkeypatch):
    paths = policy_like_paths(5, 11)  # 3 chunks of 4: the worker thread and the caller share them
    kwargs = dict(strategy="map", chunk_size=4, prefix_sharing=False)
    one = make_engine(CFG, setup["shell"], setup["pool"], setup["objectives"], num_threads=1, **kwargs)
    three = make_engine(CFG, setup["shell"], setup["pool"], setup["objectives"], num_threads=3, **kwargs)
    expected = one.evaluate(paths, use_cache=False).scores
    np.testing.assert_array_equal(three.evaluate(paths, use_cache=False).scores, expected)
    np.testing.assert_array_equal(setup["plain"].evaluate(paths, use_cache=False).scores, expected)
    assert all(v == 1 for v in three.num_traces.values())  # compiled once, before the workers start

    original = type(three)._plain_chunk

    def failing(self, obj_idx, rows, junction, start, size):
        if start == 8:
            raise RuntimeError("chunk 8 failed")
        return original(self, obj_idx, rows, junction, start, size)

    monkeypatch.setattr(type(three), "_plain_chunk", failing)
    with pytest.raises(RuntimeError, match="chunk 8 failed"):
        three.evaluate(paths, use_cache=False)
    with pytest.raises(ValueError, match="num_threads"):
        make_engine(CFG, setup["shell"], setup["pool"], setup["objectives"], num_threads=0, **kwargs)


def test_a_small_remainder_runs_as_single_paths_with_the_same_scores(setup):
    """Chunks of `chunk_size`, then a remainder of at most a quarter chunk as chunks of one path (a lone path
    padded with 7 empty ones costs about twice as much): the scores are those of whole padded chunks."""
    kwargs = dict(strategy="map", prefix_sharing=False, num_threads=2)
    eng = make_engine(CFG, setup["shell"], setup["pool"], setup["objectives"], chunk_size=8, **kwargs)
    assert eng._chunk_plan(17) == [(0, 8), (8, 8), (16, 1)]
    assert eng._chunk_plan(13) == [(0, 8), (8, 8)]  # a remainder of 5: one padded chunk
    assert eng._chunk_plan(2) == [(0, 1), (1, 1)] and eng._chunk_plan(8) == [(0, 8)]
    assert eng.with_model(setup["shell"], setup["pool"]).use_single_path_chunks(False)._chunk_plan(17)[
        -1
    ] == (16, 8)
    eng.use_single_path_chunks(True)  # the switch is shared with `with_model` copies
    padded = make_engine(CFG, setup["shell"], setup["pool"], setup["objectives"], chunk_size=6, **kwargs)
    assert padded._chunk_plan(17) == [(0, 6), (6, 6), (12, 6)]
    paths = policy_like_paths(9, 17)
    np.testing.assert_array_equal(eng.evaluate(paths).scores, padded.evaluate(paths).scores)
    np.testing.assert_array_equal(
        eng.evaluate(paths[:1], use_cache=False).scores, padded.evaluate(paths[:1]).scores
    )


def test_bad_inputs_raise_clear_errors(setup):
    with pytest.raises(ValueError, match="strategy"):
        make_engine(CFG, setup["shell"], setup["pool"], setup["objectives"], strategy="pmap")
    with pytest.raises(ValueError, match="pool has only"):
        setup["engine"].evaluate(np.array([[0, 99]]))
    with pytest.raises(ValueError, match="2-D"):
        setup["engine"].evaluate(np.array([0, 1]))


# ------------------------------------------------------------------------------------------------ alignment
@pytest.fixture(scope="module")
def aligned(setup):
    rng = np.random.default_rng(7)
    calib = rng.integers(0, 24, (4, 8))
    shells = [models.shell_of(p) for p in setup["experts"]]
    stats = alignment.native_stats(CFG, shells, setup["pool"], calib)
    return dict(calib=calib, stats=stats)


def test_masked_moments_and_coral_by_hand():
    h = jnp.array([[[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]]])
    mean, std, cov = alignment.masked_moments(h, jnp.array([[1, 1, 0]]))
    np.testing.assert_allclose(mean, [2.0, 4.0])
    np.testing.assert_allclose(std, [1.0, 2.0])
    np.testing.assert_allclose(cov, [[1.0, 2.0], [2.0, 4.0]])
    # ||C_s - C_t||_F^2 / (4 d^2) with d = 2: (1 + 0 + 0 + 9) / 16
    assert float(alignment.coral_loss(jnp.eye(2), jnp.diag(jnp.array([2.0, 4.0])))) == pytest.approx(10 / 16)


def test_moment_alignment_identity_and_matching(setup, aligned):
    aligner = alignment.make_aligner("moment", CFG, setup["shell"], setup["pool"], stats=aligned["stats"],
                                     calib_ids=aligned["calib"], shell_source=0, chunk_size=4)  # fmt: skip
    own = np.array([[0, 1, 2, -1, -1]], np.int32)
    j = aligner.junctions(own)
    np.testing.assert_array_equal(j["scale"], 1.0)
    np.testing.assert_array_equal(j["shift"], 0.0)
    # a stitched path: after the junction, block 4's input has exactly its native mean and std
    stitched = np.array([[0, 4, 5, -1, -1]], np.int32)
    j = aligner.junctions(stitched)
    assert not np.allclose(j["scale"][0, 1], 1.0)
    h, ctx = models.embed(CFG, setup["shell"], jnp.asarray(aligned["calib"]))
    h = models.block(CFG, jax.tree.map(lambda x: x[0], setup["pool"]), h, ctx)
    h = h * j["scale"][0, 1] + j["shift"][0, 1]
    mean, std, _ = alignment.masked_moments(h, jnp.ones(aligned["calib"].shape))
    np.testing.assert_allclose(mean, aligned["stats"].mean[4], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(std, aligned["stats"].std[4], rtol=1e-4, atol=1e-4)


def test_alignment_outputs_do_not_depend_on_the_batch(setup, aligned):
    target = np.array([[3, 1, 2, 5, -1]], np.int32)
    params, losses = alignment.fit_learned(
        jax.random.PRNGKey(0), CFG, setup["shell"], setup["pool"], aligned["stats"], aligned["calib"],
        policy_like_paths(5, 8), shell_source=0, num_steps=10, batch_paths=8, learning_rate=1e-3,
    )  # fmt: skip
    assert losses[-1] < 0.9 * losses[0]  # full-batch losses: the fit reduces CORAL + mean loss
    for mode in ("moment", "learned"):
        results = []
        for seed in (8, 9):  # two batch compositions, fresh aligners and engine caches
            aligner = alignment.make_aligner(
                mode, CFG, setup["shell"], setup["pool"], stats=aligned["stats"], calib_ids=aligned["calib"],
                shell_source=0, learned_params=params, chunk_size=4,
            )  # fmt: skip
            batch = np.concatenate([policy_like_paths(seed, 2 + seed - 8), target])
            j = aligner.junctions(batch)
            scores = setup["engine"].evaluate(batch, j, use_cache=False).scores
            results.append((j["scale"][-1], j["shift"][-1], scores[-1]))
        for a, b in zip(*results, strict=True):
            np.testing.assert_array_equal(a, b)
        # and the engine's aligned scores match the independent reference on apply_path
        ref = reference_scores(setup, target, {k: v[-1:] for k, v in j.items()})
        np.testing.assert_allclose(results[0][2], ref[0], rtol=1e-6, atol=1e-6)


def test_decode_objective_matches_greedy_decode_per_path(setup):
    """A chrF-like (decode) objective through the engine equals greedy_decode run path by path; 3 paths in
    chunks of 2, so the last chunk is padded with an empty path."""
    rng = np.random.default_rng(11)
    ids = rng.integers(3, 24, (2, 2, 4)).astype(np.int32)  # [batches, B, P]
    mask = np.ones_like(ids)
    mask[:, 0, :2] = 0  # a left-padded prompt
    weights = np.arange(1, 2 * 2 * 3 + 1).reshape(4, 3)

    def device_fn(decode_fn):
        return jax.lax.map(lambda b: decode_fn(b[0], b[1], 3), (jnp.asarray(ids), jnp.asarray(mask))).reshape(
            4, 3
        )

    def host_fn(tokens):  # a hash of every token, in [0, 100]
        return float(np.sum(np.asarray(tokens) * weights) % 10007) / 100.07

    objective = Objective("dec", "chrf", device_fn, host_fn)
    engine = make_engine(CFG, setup["shell"], setup["pool"], [objective], strategy="map", chunk_size=2)
    paths = np.array([[0, 4, -1, 2, -1], [3, -1, -1, -1, -1], [5, 5, 1, 0, 2]], np.int32)
    scores = engine.evaluate(paths).scores[:, 0]
    decode = jax.jit(models.greedy_decode, static_argnums=(0, 6))  # one compilation for every reference call
    for path, score in zip(paths, scores, strict=True):
        tokens = [
            decode(CFG, setup["shell"], setup["pool"], path, i, m, 3) for i, m in zip(ids, mask, strict=True)
        ]
        assert score == host_fn(np.concatenate(tokens))


def test_score_params_gives_the_same_scores_with_or_without_a_pool_copy(setup, monkeypatch):
    """`search.problem.score_params` scores a model as source K of a pool copy (small models) or of a parted pool,
    the experts' and its own block arrays (above SCORE_POOL_COPY_MAX_BYTES): the same scores as the expert's
    identity path in the sources' pool."""
    from hm3_jax.search import problem as problem_lib

    engine, experts = setup["engine"], setup["experts"]
    reference = engine.with_model(models.shell_of(experts[1]), setup["pool"], pool_id="ref1")
    expected = reference.evaluate((L + np.arange(L, dtype=np.int32))[None]).scores[0]
    copied = problem_lib.score_params(engine, experts, experts[1])
    monkeypatch.setattr(problem_lib, "SCORE_POOL_COPY_MAX_BYTES", 0)
    own = problem_lib.score_params(engine, experts, experts[1])
    np.testing.assert_array_equal(copied, expected)
    np.testing.assert_array_equal(own, expected)
