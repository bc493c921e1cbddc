"""Sources held as host arrays on a mesh (issue 16, docs/scaling.md "Session 13").

`load_pretrained(..., on_host=True)` / `spec_zoo.load(..., on_host=True)` keep every tensor a numpy array (a
run on a mesh, `run.setup`), bitwise the tensors the default load places on device 0. On 8 simulated devices
(`paths:2,model:4`, parted pools) a Problem built from host sources leaves on device 0 exactly the shards of the
sources' shell and pool that the memory plan counts (`program_memory.sources_device0_bytes`: live device-0 bytes
measured before and after `make_problem`), scores a source like the one-device Problem over device arrays, and
the plan's `merge` program counts that shard (not the whole sources) as resident.
"""

import os

import jax
import numpy as np
import pytest

from hm3_jax.tasks.shape_spec import TaskShape
from tests._subprocess_util import child_result

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "eos_token_id": 2, "bos_token_id": 1}  # fmt: skip
TASKS = {
    "gsm": TaskShape("exact_match", "math", 12, prompt_tokens=16, target_tokens=4, max_new_tokens=4),
    "xnli": TaskShape("multiple_choice", "chat", 12, prompt_tokens=12, target_tokens=4, choices=3),
    "code": TaskShape("chrf", "code", 12, prompt_tokens=12, target_tokens=6, max_new_tokens=6),
}


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory):
    """A Llama-2-style spec (tiny random checkpoints, expert vocabularies of other sizes read with
    `tokenizer_source: base`)."""
    from experiments.configs import llama2_7b
    from hm3_jax import Model, models, save_pretrained
    from hm3_jax.io import hf_config
    from hm3_jax.tasks.shape_spec import char_tokenizer, write_shape_spec

    root = tmp_path_factory.mktemp("host_sources")
    vocab = {"base": 64, "chat": 64, "math": 65, "code": 80}
    configs = {n: {**hf, **TINY, "vocab_size": vocab[n]} for n, hf in llama2_7b.HF_CONFIGS.items()}
    path = write_shape_spec(str(root), configs, TASKS, dtype="float32", eval_batch_size=4,
                            tokenizer_source="base")  # fmt: skip
    for i, (name, hf) in enumerate(configs.items()):
        config = hf_config.config_from_hf_dict(hf)
        save_pretrained(
            Model(config, models.init(config, jax.random.PRNGKey(i)), hf), os.path.join(root, name)
        )
        char_tokenizer(True).save_pretrained(
            os.path.join(root, name)
        )  # the experts' own (the same characters)
    return path


def test_on_host_load_is_the_device_load_bitwise(spec_path):
    from hm3_jax.io.checkpoint import load_pretrained
    from hm3_jax.tasks import spec_zoo

    directory = os.path.join(os.path.dirname(spec_path), "math")
    for dtype in (jax.numpy.float32, jax.numpy.bfloat16):
        host, dev = load_pretrained(directory, dtype, on_host=True), load_pretrained(directory, dtype)
        assert all(type(x) is np.ndarray for x in jax.tree.leaves(host.params))
        assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(dev.params))
        assert jax.tree.structure(host.params) == jax.tree.structure(dev.params)
        for a, b in zip(jax.tree.leaves(host.params), jax.tree.leaves(dev.params), strict=True):
            assert a.dtype == b.dtype and a.tobytes() == np.asarray(b).tobytes()
    # a spec zoo: the experts' embeddings re-indexed onto the base vocabulary come back to the host too
    host, dev = spec_zoo.load(spec_path, on_host=True), spec_zoo.load(spec_path)
    for name in host.experts:
        leaves = jax.tree.leaves(host.experts[name].params)
        assert all(type(x) is np.ndarray for x in leaves), name
        for a, b in zip(leaves, jax.tree.leaves(dev.experts[name].params), strict=True):
            assert a.tobytes() == np.asarray(b).tobytes()
    assert host.experts["code"].params["embed"]["embedding"].shape == (64, 32)


_CHILD = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from hm3_jax import distributed
from hm3_jax.pipeline import program_memory
from hm3_jax.search import problem as problem_lib
from hm3_jax.tasks import spec_zoo

problem_lib.SCORE_POOL_COPY_MAX_BYTES = 0  # parted pools, as at real scale
spec = sys.argv[1]
mesh = distributed.make_mesh("paths:2,model:4")
dev0 = jax.devices()[0]
def live_device0():
    return sum(s.data.nbytes for x in jax.live_arrays() for s in x.addressable_shards if s.device == dev0)

out = {}
zoo = spec_zoo.load(spec, on_host=True)
given = {s: np.zeros((4, 3)) for s in problem_lib.SPLITS}  # no source scoring inside make_problem
before = live_device0()
problem = problem_lib.make_problem(zoo, mesh=mesh, source_scores=given)
out["problem_device0"] = live_device0() - before
config, K = zoo.base.config, len(zoo.tasks)
params = program_memory.abstract_params(config, jnp.float32)
out["planned"] = program_memory.sources_device0_bytes(params, K, mesh)
out["whole"] = program_memory.tree_bytes(params)
out["parted"] = all(len(e.pool) == K + 1 for e in problem.engines.values())
# beside a preference's path program (one held): the sources' placed shell and base part (its expert parts are
# the preference pool's own, `PreferenceModels`)
from ml_collections import ConfigDict
run = ConfigDict({"preferences": {"num": 3}, "memory": {"resident_preferences": 1}})
out["held_planned"] = program_memory.held_preference_bytes("path_scores/search", run, config, K, jnp.float32, mesh)
engine = problem.engines["search"]
out["held_measured"] = sum(s.data.nbytes for x in jax.tree.leaves((engine.shell, engine.pool[K:]))
                           for s in x.addressable_shards if s.device == dev0)
mesh_scores = problem_lib.score_params(problem.engines["search"], problem.experts, problem.base)
merge = program_memory.merge_program(config, K, jnp.float32, mesh)
out["merge_resident"], out["merge_resident_one"] = merge.resident_bytes, program_memory.merge_program(
    config, K, jnp.float32).resident_bytes
one_zoo = spec_zoo.load(spec)
one = problem_lib.make_problem(one_zoo, source_scores=given)
one_scores = problem_lib.score_params(one.engines["search"], one.experts, one.base)
out["scores"] = {"mesh": np.asarray(mesh_scores).tolist(), "one": np.asarray(one_scores).tolist()}
print("RESULT " + json.dumps(out))
"""


def test_a_mesh_problem_over_host_sources_places_only_shards(spec_path):
    out = child_result(_CHILD, spec_path)
    assert out["parted"]
    sources, pool = out["planned"]
    # device 0 holds the placed shards of the sources' shell and parted pool, what the plan counts, and no source
    assert sources == 0 and out["problem_device0"] == pool
    assert pool < 4 * out["whole"] * 0.4  # about a quarter of the K + 1 sources (norms replicated)
    np.testing.assert_allclose(out["scores"]["mesh"], out["scores"]["one"], atol=1e-6)
    assert max(out["scores"]["one"]) > 0  # not a comparison of zeros
    assert out["held_planned"] == out["held_measured"] < pool / 2
    # the merge on device 0 keeps that shard resident, not the K + 1 sources nor the merged model (its tensors go
    # to the host as they are made: tests/test_merge_shard.py)
    assert out["merge_resident"] == pool
    assert out["merge_resident_one"] > out["merge_resident"]  # one device: the sources as loaded
