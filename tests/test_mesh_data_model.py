"""The path engine on a mesh that splits "paths", "data" and "model" at once (issue 16) scores as one device.

On ``paths:2,data:2,model:2`` the head's logits are split over "data" (examples) and "model" (vocabulary), and
XLA's partitioner aborted the process (``spmd_partitioner_util.cc:497``, SIGABRT) at the objectives'
``take_along_axis`` inside the engine's partially manual ``shard_map``; the engine now gathers the vocabulary
of the logits on such a mesh (`hm3_jax.paths.sharded.gather_vocabulary`). A child process with 8 simulated CPU
devices (`subprocess_env(8)`; the abort would kill it) scores a tiny random Llama pool with the three real
objective kinds, teacher-forced exact match (argmax on device), multiple choice (summed log-probabilities) and
greedy generation, on one device and on that mesh. Exact-match flags, generated tokens and scores must be equal,
log-likelihoods within float32 rounding of a reduction split over "model" (measured 1.9e-6).
"""

import json

import numpy as np
import pytest

from hm3_jax.paths import sharded
from tests._subprocess_util import child_result

MESH = "paths:2,data:2,model:2"

_CHILD = r"""
import json, sys
import jax
import numpy as np
from hm3_jax import distributed, models
from hm3_jax.paths import make_engine
from hm3_jax.tasks.exact_match import make_exact_match_objective
from hm3_jax.tasks.generation import make_generation_objective
from hm3_jax.tasks.multiple_choice import make_multiple_choice_objective


class Tokenizer:  # token t decodes to a letter; 0 pads, 2 is eos
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + t % 26) for t in ids if not (skip_special_tokens and t < 3))


# vocabulary 16 and 4 heads (2 KV heads): the embedding, head, attention and MLP all split over model:2
config = models.ModelConfig(family="llama", vocab_size=16, hidden_size=16, intermediate_size=32, num_layers=2,
                            num_heads=4, num_kv_heads=2, max_position_embeddings=64, initializer_range=0.3)
params = [models.init(config, k) for k in jax.random.split(jax.random.key(0), 2)]
shell = jax.tree.map(np.asarray, models.shell_of(params[0]))
pool = jax.tree.map(np.asarray, models.make_pool([p["blocks"] for p in params]))
paths = np.array([[0, 1, 2], [3, 2, -1], [1, -1, -1], [2, 3, 0]], np.int32)
rng = np.random.default_rng(0)
prompts = [list(rng.integers(3, 16, 3)) for _ in range(8)]
# exact-match targets: the first two greedy tokens of path i % 4, so some flags are true (random targets never
# match a random model's argmax)
decode = jax.jit(models.greedy_decode, static_argnums=(0, 6))
ids = np.asarray(prompts, np.int32)
greedy = [np.asarray(decode(config, shell, pool, p, ids, np.ones_like(ids), 2)) for p in paths]
pairs = [(prompts[i], [int(t) for t in greedy[i % 4][i]]) for i in range(8)]
choices = [[list(rng.integers(3, 16, rng.integers(1, 3))) for _ in range(2)] for _ in range(4)]
objectives = [
    make_exact_match_objective("em", pairs, 0, 4),
    make_multiple_choice_objective("mc", prompts[:4], choices, [0, 1, 0, 1], 0, 4),
    make_generation_objective("gen", prompts, ["x"] * 8, Tokenizer(), 4, "exact_match", 3, (2,)),
]
out = {}
for spec in ("one", sys.argv[1]):
    mesh = distributed.make_mesh(None, devices=jax.devices()[:1]) if spec == "one" else distributed.make_mesh(spec)
    engine = make_engine(config, shell, pool, objectives, strategy="shard", chunk_size=4, prefix_sharing=False,
                         mesh=mesh)
    raw = engine.run_plain((0, 1, 2), paths, None)
    out[spec] = {
        "mesh": {k: int(v) for k, v in dict(mesh.shape).items()},
        "raw": {o.name: np.asarray(r).tolist() for o, r in zip(objectives, raw)},
        "scores": engine.evaluate(paths).scores.tolist(),
        "split": [str(s.spec) for s in jax.tree.leaves(distributed.model_sharding(shell, pool, mesh)[0])],
    }
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def child():
    # timeout: a hang bound (XLA:CPU collectives deadlock rather than fail)
    return child_result(_CHILD, MESH, num_devices=8, timeout=600)


def test_the_mesh_splits_every_axis_and_the_vocabulary(child):
    assert child[MESH]["mesh"] == {"paths": 2, "data": 2, "model": 2}
    # the embedding [V, D] and the untied head [D, V] split over the vocabulary: the logits are split over "model"
    assert {"P('model', None)", "P(None, 'model')"} <= set(child[MESH]["split"])
    assert child["one"]["mesh"] == {"paths": 1, "data": 1, "model": 1}


def test_exact_match_and_generation_equal_one_device(child):
    one, mesh = child["one"]["raw"], child[MESH]["raw"]
    assert np.asarray(one["em"]).any() and not np.asarray(one["em"]).all()  # the flags discriminate
    assert mesh["em"] == one["em"]
    assert len({json.dumps(t) for t in one["gen"]}) == 4  # every path generates other tokens
    assert mesh["gen"] == one["gen"]


def test_multiple_choice_log_likelihoods_equal_one_device(child):
    one, mesh = (np.asarray(child[s]["raw"]["mc"], np.float64) for s in ("one", MESH))
    assert np.ptp(one) > 1  # paths and rows differ
    np.testing.assert_allclose(mesh, one, rtol=0, atol=5e-6)


def test_scores_equal_one_device(child):
    np.testing.assert_array_equal(child[MESH]["scores"], child["one"]["scores"])


class _Mesh:  # needs_whole_vocabulary reads only mesh.shape
    def __init__(self, **shape):
        self.shape = shape


@pytest.mark.parametrize(
    "strategy, shape, expected",
    [
        ("shard", {"paths": 2, "data": 2, "model": 2}, True),
        ("shard", {"paths": 1, "data": 4, "model": 2}, False),  # a trivial manual axis: no abort, bits kept
        ("shard", {"paths": 4, "data": 1, "model": 2}, False),
        ("shard", {"paths": 2, "data": 4, "model": 1}, False),
        ("map", {"paths": 2, "data": 2, "model": 2}, False),
    ],
)
def test_the_vocabulary_is_gathered_only_where_the_partitioner_aborts(strategy, shape, expected):
    assert sharded.needs_whole_vocabulary(strategy, _Mesh(**shape)) is expected


def test_gather_vocabulary_leaves_a_replicated_batch_alone():
    logits = np.zeros((3, 5, 16), np.float32)  # 3 examples: not divisible by data=2, replicated
    assert sharded.gather_vocabulary(logits, 2) is logits
    assert sharded.gather_vocabulary(logits, 1) is logits
