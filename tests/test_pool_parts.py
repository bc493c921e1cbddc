"""Parted pools (`hm3_jax.models.pool.make_parted_pool`): the sources' own block arrays under pool index m * L + l.

Every consumer must give exactly what the stacked pool (`make_pool`, a copy) gives: the forward along a path, greedy
decoding, the path engine's scores under every strategy (map, vmap, the prefix tree, "shard" on a mesh that splits
the blocks over "model"), `score_params`, the block descriptors and the export's path model. The parted pool reads
the same block values (a `lax.switch` over the parts instead of one gather), and the blocks then do the same
arithmetic, so the results are compared bitwise. And it must hold no copy: its parts are the sources' arrays.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hm3_jax import distributed, models
from hm3_jax.arch import descriptors
from hm3_jax.paths import engine as engine_module
from hm3_jax.paths import make_engine
from hm3_jax.paths.engine import place_model
from hm3_jax.pipeline import export, program_memory
from hm3_jax.pipeline.preference_models import PreferenceModels
from hm3_jax.search import problem as problem_lib
from hm3_jax.tasks.exact_match import make_exact_match_objective
from hm3_jax.tasks.generation import make_generation_objective
from tests._subprocess_util import child_result

L, M, T_MAX = 3, 3, 5  # layers per source, sources (parts)
CONFIGS = {
    "llama": models.ModelConfig(
        family="llama", vocab_size=24, hidden_size=16, intermediate_size=32, num_layers=L, num_heads=2
    ),
    "gpt2": models.ModelConfig(
        family="gpt2",
        vocab_size=24,
        hidden_size=16,
        intermediate_size=32,
        num_layers=L,
        num_heads=2,
        max_position_embeddings=32,
    ),  # fmt: skip
    "vit": models.ModelConfig(
        family="vit",
        vocab_size=0,
        hidden_size=16,
        intermediate_size=32,
        num_layers=L,
        num_heads=2,
        image_size=8,
        patch_size=4,
        num_channels=3,
        num_labels=5,
    ),  # fmt: skip
}
# paths with padding anywhere, repeats, blocks of every part, and the clamped ends of the index range
PATHS = np.array(
    [
        [0, 1, 2, -1, -1],
        [8, 7, 6, 5, 4],
        [3, -1, 4, -1, 8],
        [6, 0, 3, 1, 7],
        [-1, -1, -1, -1, -1],
        [2, 2, 2, 5, 5],
    ],
    np.int32,
)


def sources(family: str):
    config = CONFIGS[family]
    params = [models.init(config, k) for k in jax.random.split(jax.random.key(7), M)]
    blocks = [p["blocks"] for p in params]
    return config, params, models.make_pool(blocks), models.make_parted_pool(blocks)


def inputs(config, batch: int = 2):
    if config.family == "vit":
        return jax.random.normal(jax.random.key(1), (batch, 3, 8, 8))
    return jax.random.randint(jax.random.key(1), (batch, 6), 0, config.vocab_size)


def junction(n: int | None = None):
    shape = (T_MAX, 16) if n is None else (n, T_MAX, 16)
    return {
        "scale": 1.0 + 0.1 * jax.random.normal(jax.random.key(2), shape),
        "shift": 0.1 * jax.random.normal(jax.random.key(3), shape),
    }


@pytest.mark.parametrize("family", ["llama", "gpt2", "vit"])
def test_apply_path_parted_equals_stacked(family):
    """Eager, jitted and vmapped over paths, with padding and with a junction, `uniform` or not: bitwise."""
    config, params, stacked, parted = sources(family)
    shell, x = models.shell_of(params[0]), inputs(config)
    for path in PATHS:
        for j in (None, junction()):
            for uniform in (False, True):
                want = models.apply_path(config, shell, stacked, path, x, j, uniform=uniform)
                got = models.apply_path(config, shell, parted, path, x, j, uniform=uniform)
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    fn = jax.jit(lambda pool, path, j: models.apply_path(config, shell, pool, path, x, j))
    vfn = jax.jit(
        jax.vmap(lambda pool, path, j: models.apply_path(config, shell, pool, path, x, j), (None, 0, 0))
    )
    js = junction(len(PATHS))
    np.testing.assert_array_equal(np.asarray(vfn(parted, PATHS, js)), np.asarray(vfn(stacked, PATHS, js)))
    for path in PATHS:
        np.testing.assert_array_equal(np.asarray(fn(parted, path, None)), np.asarray(fn(stacked, path, None)))
    # and the identity path of source m over the parts is that source's own forward
    for m in range(M):
        own = models.apply(config, params[m], x)
        got = models.apply_path(
            config, models.shell_of(params[m]), parted, models.identity_path(L, source=m), x
        )
        np.testing.assert_allclose(np.asarray(got), np.asarray(own), rtol=0, atol=0)


@pytest.fixture
def compiled_here():
    """This test's programs are compiled, never loaded from the persistent compilation cache: reading them back
    crashed the test process three times in fresh-clone CI runs (a segfault in XLA's CPU
    `deserialize_executable`, jax 0.10.2, `compilation_cache.get_executable_and_time`, always at this test's
    decode; the same cache entries loaded fine in other runs, and xdist then hung). Compiling them costs a few
    seconds; the persistent cache is restored afterwards."""
    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_decode_parted_equals_stacked(family, compiled_here):
    config, params, stacked, parted = sources(family)
    shell = models.shell_of(params[1])
    ids = jax.random.randint(jax.random.key(4), (2, 4), 0, config.vocab_size)
    mask = jnp.ones_like(ids).at[0, 0].set(0)  # one left-padded row
    decode = jax.jit(models.greedy_decode, static_argnums=(0, 6), static_argnames=("uniform",))
    # junction and uniform each exercised (two of their four combinations: every one is compiled here)
    for j, uniform in ((None, False), (junction(), True)):
        for path in PATHS[:4]:
            want = decode(config, shell, stacked, path, ids, mask, 4, j, uniform=uniform)
            got = decode(config, shell, parted, path, ids, mask, 4, j, uniform=uniform)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


class Tokenizer:  # token t decodes to a letter; 0 pads, 2 is eos
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + t % 26) for t in ids if not (skip_special_tokens and t < 3))


def lm_objectives(config):
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, config.vocab_size, 3)) for _ in range(4)]
    pairs = [(p, list(rng.integers(3, config.vocab_size, 2))) for p in prompts]
    return [
        make_exact_match_objective("em", pairs, 0, 2),
        make_generation_objective("gen", prompts, ["ab"] * 4, Tokenizer(), 2, "exact_match", 3, (2,)),
    ]


def many_paths(n: int = 40):
    """Paths with shared prefixes (the prefix tree shares them), repeats and padding."""
    rng = np.random.default_rng(5)
    out = rng.integers(-1, M * L, (n, T_MAX)).astype(np.int32)
    out[: n // 2, :2] = [4, 1]
    return out


@pytest.mark.parametrize("strategy,prefix_sharing", [("map", True), ("map", False), ("vmap", False)])
def test_engine_scores_parted_equal_stacked(strategy, prefix_sharing):
    """Every strategy (the prefix tree for teacher-forced objectives, plain chunks for generation), with and
    without junctions: the engine's device outputs and scores over many paths are bitwise those of the stacked
    pool; and `with_model` swaps between the kinds."""
    config, params, stacked, parted = sources("llama")
    shell, objectives = models.shell_of(params[0]), lm_objectives(config)
    paths = many_paths()
    js = {k: np.asarray(v) for k, v in junction(len(paths)).items()}
    kw = dict(strategy=strategy, chunk_size=4, node_chunk_size=8, prefix_sharing=prefix_sharing)
    a = make_engine(config, shell, stacked, objectives, pool_id="stacked", **kw)
    b = make_engine(config, shell, parted, objectives, pool_id="parted", **kw)
    for j in (None, js):
        np.testing.assert_array_equal(b.evaluate(paths, j).scores, a.evaluate(paths, j).scores)
    raw_a, raw_b = a.run_plain((0, 1), paths, None), b.run_plain((0, 1), paths, None)
    for x, y in zip(raw_a, raw_b, strict=True):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    swapped = a.with_model(shell, parted, pool_id="swapped")
    np.testing.assert_array_equal(swapped.evaluate(paths).scores, a.evaluate(paths).scores)


def test_score_params_over_parts_equals_the_stacked_copy(monkeypatch):
    """`score_params` with the threshold lowered scores over the parts `experts + [model]`: the same scores as
    the stacked copy, and through the engine's programs for a parted pool of the sources (no new trace)."""
    config, params, _, _ = sources("llama")
    experts, objectives = params[:2], lm_objectives(config)
    base = params[2]
    stacked_engine = make_engine(
        config, models.shell_of(base), problem_lib.pool_for(experts, base), objectives, strategy="map"
    )
    want = [problem_lib.score_params(stacked_engine, experts, p) for p in params]
    monkeypatch.setattr(problem_lib, "SCORE_POOL_COPY_MAX_BYTES", 0)
    pool = problem_lib.pool_for(experts, base)
    assert models.is_parted(pool) and pool[2] is base["blocks"]
    engine = make_engine(config, models.shell_of(base), pool, objectives, strategy="map")
    got = [problem_lib.score_params(engine, experts, p) for p in params]
    traces = engine.num_traces
    got_again = problem_lib.score_params(engine, experts, params[1])
    assert engine.num_traces == traces  # the parted programs serve every scored model
    np.testing.assert_array_equal(np.stack(got), np.stack(want))
    np.testing.assert_array_equal(got_again, want[1])


def test_a_parted_pool_shares_the_sources_blocks(monkeypatch):
    """The parts are the sources' own arrays (`is`), and building a preference's pool allocates no block buffer:
    the live arrays after `pool_for(experts, merged)` are those before (stacked: one new buffer per leaf)."""
    config, params, _, _ = sources("llama")
    experts, merged = params[:2], params[2]
    n_leaves = len(jax.tree.leaves(merged["blocks"]))

    def new_buffers(build):
        before = {x.unsafe_buffer_pointer() for x in jax.live_arrays()}
        pool = build()
        jax.block_until_ready(pool)
        after = {x.unsafe_buffer_pointer() for x in jax.live_arrays()}
        return pool, after - before

    stacked, fresh = new_buffers(lambda: problem_lib.pool_for(experts, merged))
    assert not models.is_parted(stacked) and len(fresh) == n_leaves
    monkeypatch.setattr(problem_lib, "SCORE_POOL_COPY_MAX_BYTES", 0)
    parted, fresh = new_buffers(lambda: problem_lib.pool_for(experts, merged))
    assert fresh == set()
    assert [p is m["blocks"] for p, m in zip(parted, [*experts, merged], strict=True)] == [True] * 3
    pointers = {x.unsafe_buffer_pointer() for x in jax.tree.leaves([m["blocks"] for m in params])}
    assert {x.unsafe_buffer_pointer() for x in jax.tree.leaves(parted)} == pointers
    assert len({id(x) for x in jax.tree.leaves((params, parted))}) == len(jax.tree.leaves(params))


def test_bad_parted_pools_are_named():
    config, params, _, _ = sources("llama")
    blocks = [p["blocks"] for p in params]
    short = jax.tree.map(lambda x: x[:2], blocks[1])
    with pytest.raises(ValueError, match="blocks 1 holds \\[2\\] blocks, blocks 0 holds \\[3\\]"):
        models.make_parted_pool([blocks[0], short])
    other = {**blocks[2], "extra": blocks[2]["attn_norm"]}
    with pytest.raises(ValueError, match="blocks 2 has a different tree structure"):
        models.make_parted_pool([blocks[0], blocks[1], other])
    wide = jax.tree.map(lambda x: jnp.concatenate([x, x], -1) if x.ndim == 3 else x, blocks[1])
    with pytest.raises(ValueError, match="blocks 1 has per-block shapes differing"):
        models.make_parted_pool([blocks[0], wide])
    with pytest.raises(ValueError, match="blocks 1 holds"):  # a hand-made tuple is checked by the engine
        make_engine(
            config, models.shell_of(params[0]), (blocks[0], short), lm_objectives(config), strategy="map"
        )


def test_descriptors_export_and_leading_blocks_read_parts_as_the_stack():
    config, params, stacked, parted = sources("llama")
    base = params[0]["blocks"]
    np.testing.assert_array_equal(
        np.asarray(descriptors.block_descriptors(parted, base, M)),
        np.asarray(descriptors.block_descriptors(stacked, base, M)),
    )
    shell = models.shell_of(params[0])
    for path in PATHS:
        want, n = export.path_model_params(shell, stacked, path)
        got, n2 = export.path_model_params(shell, parted, path)
        assert n == n2
        jax.tree.map(np.testing.assert_array_equal, got, want)
    assert models.leading_blocks(parted, 2 * L) == parted[:2]
    jax.tree.map(
        np.testing.assert_array_equal,
        models.stacked(models.leading_blocks(parted, 2 * L)),
        models.leading_blocks(stacked, 2 * L),
    )
    with pytest.raises(ValueError, match="whole parts"):
        models.leading_blocks(parted, 4)
    assert models.pool_size(parted) == models.pool_size(stacked) == M * L
    assert models.block_signature(parted) == models.block_signature(stacked)


def test_memory_plan_counts_parts_once(monkeypatch):
    """With parts, a pool of the sources adds no bytes beyond the sources (one device), and the abstract pool
    is the K + 1 parts the run builds."""
    config = CONFIGS["llama"]
    params = program_memory.abstract_params(config, jnp.float32)
    blocks = program_memory.tree_bytes(params["blocks"])
    assert program_memory.pool_copy_bytes(params, 2, sharded=False) == 3 * blocks
    monkeypatch.setattr(problem_lib, "SCORE_POOL_COPY_MAX_BYTES", 0)
    assert program_memory.pool_copy_bytes(params, 2, sharded=False) == 0
    assert program_memory.pool_copy_bytes(params, 2, sharded=True) == 3 * blocks  # placed copies on a mesh
    pool = program_memory.abstract_pool(params, 2)
    assert models.is_parted(pool) and len(pool) == 3 and models.pool_size(pool) == 3 * L
    # a held preference adds its shell and its own L blocks, not K + 1 parts
    run = ml_collections.ConfigDict({"preferences": {"num": 3}, "memory": {"resident_preferences": 2}})
    shell = program_memory.tree_bytes(models.shell_of(params))
    assert program_memory.held_preference_bytes("merge", run, config, 2, jnp.float32) == 2 * (shell + blocks)
    assert (
        program_memory.held_preference_bytes("path_scores/search", run, config, 2, jnp.float32)
        == shell + blocks
    )


_MESH_CHILD = r"""
import json
import jax
import numpy as np
from hm3_jax import distributed, models
from hm3_jax.paths import make_engine
from hm3_jax.paths.engine import place_model
from hm3_jax.tasks.exact_match import make_exact_match_objective

config = models.ModelConfig(family="llama", vocab_size=16, hidden_size=16, intermediate_size=32, num_layers=2,
                            num_heads=4, num_kv_heads=2, max_position_embeddings=64, initializer_range=0.3)
params = [models.init(config, k) for k in jax.random.split(jax.random.key(0), 3)]
blocks = [p["blocks"] for p in params]
shell = models.shell_of(params[0])
rng = np.random.default_rng(0)
pairs = [(list(rng.integers(3, 16, 3)), list(rng.integers(3, 16, 2))) for _ in range(4)]
objectives = [make_exact_match_objective("em", pairs, 0, 4)]
paths = np.array([[0, 1, 2], [3, 2, -1], [5, -1, -1], [4, 3, 0]], np.int32)
mesh = distributed.make_mesh("paths:1,model:2")
out = {}
for kind, pool in (("stacked", models.make_pool(blocks)), ("parted", models.make_parted_pool(blocks))):
    engine = make_engine(config, shell, pool, objectives, strategy="shard", chunk_size=4, prefix_sharing=False,
                         mesh=mesh)
    raw = engine.run_plain((0,), paths, None)[0]
    out[kind] = {"raw": np.asarray(raw).tolist(), "scores": engine.evaluate(paths).scores.tolist()}
placed_shell, placed_pool = place_model(shell, models.make_parted_pool(blocks), mesh)
out["specs"] = sorted({str(x.sharding.spec) for x in jax.tree.leaves(placed_pool)})
print("RESULT " + json.dumps(out))
"""


def test_parts_on_a_model_parallel_mesh_equal_the_stacked_pool():
    """On a "model":2 mesh the parts are placed with the stacked pool's per-leaf specs (matrices split over
    "model") and score as the stacked pool (a child with 2 simulated CPU devices)."""
    out = child_result(_MESH_CHILD, num_devices=2, timeout=600)
    assert out["parted"] == out["stacked"]
    assert any("model" in s for s in out["specs"])


def test_a_preference_on_a_mesh_reuses_the_sources_placed_parts(monkeypatch):
    """`PreferenceModels` on a mesh (one process) places only Theta's own part: the experts' parts of its pool
    are the sources' placed parts (`is`), and it scores as a stacked pool placed whole."""
    monkeypatch.setattr(problem_lib, "SCORE_POOL_COPY_MAX_BYTES", 0)
    config, params, _, _ = sources("llama")
    experts, base = params[:2], params[2]
    merged = models.init(config, jax.random.key(9))
    mesh = distributed.make_mesh(None, devices=jax.devices()[:1])
    objectives = lm_objectives(config)
    kw = dict(strategy="shard", mesh=mesh, chunk_size=4, prefix_sharing=False)
    shell, pool = place_model(models.shell_of(base), problem_lib.pool_for(experts, base), mesh)
    engine = make_engine(config, shell, pool, objectives, **kw)
    problem = problem_lib.Problem(**{**dict.fromkeys(problem_lib.Problem._fields), "experts": experts,
                                     "engines": {"search": engine}})  # fmt: skip

    class Bank(PreferenceModels):
        def merged(self, index):
            return merged

    bank = Bank(problem, [{}], "paper", resident=1)  # Theta is `merged` (no parameter level here)
    held = bank.pools[0]
    assert models.is_parted(held) and held[0] is pool[0] and held[1] is pool[1]
    reference = make_engine(
        config,
        *place_model(
            models.shell_of(merged),
            models.make_pool([*[e["blocks"] for e in experts], merged["blocks"]]),
            mesh,
        ),
        objectives,
        **kw,
    )
    paths = many_paths(12)
    # score_params on the mesh reuses the engine's placed expert parts too: the scores of the stacked pool
    theta = (2 * L + np.arange(L, dtype=np.int32))[None]
    placed_parts = []
    original = engine_module.place_model
    monkeypatch.setattr(
        engine_module, "place_model", lambda s, p, m: placed_parts.append(len(p)) or original(s, p, m)
    )
    np.testing.assert_array_equal(
        problem_lib.score_params(engine, experts, merged), reference.evaluate(theta).scores[0]
    )
    assert placed_parts == [1]  # only the model's own part was placed
    np.testing.assert_array_equal(
        bank.engine(engine, 0, "pref0").evaluate(paths).scores, reference.evaluate(paths).scores
    )


def test_a_parted_engine_lowers_for_memory_plans_with_the_stacked_argument_bytes():
    """The plan lowers the engine's programs with an abstract parted pool (`program_memory.abstract_pool`): the
    same argument bytes as the stacked pool (the parts hold the same blocks), for the plain and tree programs."""
    config, params, stacked, parted = sources("llama")
    shell, objectives = models.shell_of(params[0]), lm_objectives(config)
    abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)  # noqa: E731
    stats = {}
    for kind, pool in (("stacked", stacked), ("parted", parted)):
        engine = make_engine(
            config, abstract(shell), abstract(pool), objectives, strategy="map", pool_id="plan"
        )
        plain = engine.lower_plain(T_MAX).compile().memory_analysis()
        tree = engine.lower_tree(T_MAX).compile().memory_analysis()
        stats[kind] = (plain.argument_size_in_bytes, tree.argument_size_in_bytes)
    assert stats["parted"] == stats["stacked"]
