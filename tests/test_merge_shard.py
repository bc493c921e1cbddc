"""Merged models and scored models on a mesh hold device 0's share only (issue 16, docs/scaling.md "Session 13").

On 8 simulated devices (`paths:2,model:4`, parted pools, sources loaded as host arrays as `run.setup` loads them
on a mesh; the tiny Llama-2-style spec of tests/test_host_sources.py):

* the merges (`merge_genes.tuned_merge`, `merging.traced.dare_ties_traced`; `param_level.paper_merge`,
  `merging.merge`) of host sources return host arrays, bitwise the merges of the same sources on device 0 (a
  one-device Problem), and leave nothing on device 0; while they run, device 0 holds at most one merged tensor
  (recorded after every tensor's program), never the merged model; the plan's `merge` program counts no merged
  model on a mesh;
* a merged model scored through the sharded engine (`problem.score_params`, and the held-out bootstrap's re-run,
  `heldout_bootstrap.example_stats`) scores as on one device (to float
  tolerance: the "model" split changes the order of the sums), and while it is placed, device 0 holds exactly
  what the plan's `model_scores` programs count: their arguments (the model's shell and own part placed with the
  engine's shardings, the experts' placed parts, a chunk of paths) and beside them `model_score_resident` (the
  sources' shell and base part); after scoring nothing of the model is left on device 0.
"""

from tests._subprocess_util import child_result
from tests.test_host_sources import spec_path  # noqa: F401  (the fixture: a tiny Llama-2-style spec)

_CHILD = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from ml_collections import ConfigDict
from hm3_jax import distributed, models
from hm3_jax.merging import traced
from hm3_jax.pipeline import program_memory
from hm3_jax.search import merge_genes, param_level
from hm3_jax.search import problem as problem_lib
from hm3_jax.tasks import spec_zoo

problem_lib.SCORE_POOL_COPY_MAX_BYTES = 0  # parted pools, as at real scale
spec = sys.argv[1]
mesh = distributed.make_mesh("paths:2,model:4")
dev0 = jax.devices()[0]
def on_device0(arrays):  # device-0 bytes of distinct buffers (a shard's `data` is a view: counted once)
    shards = [s.data for x in arrays for s in x.addressable_shards if s.device == dev0]
    return sum({d.unsafe_buffer_pointer(): d.nbytes for d in shards}.values())
def live_device0():
    return on_device0(jax.live_arrays())

out = {}
given = {s: np.zeros((4, 3)) for s in problem_lib.SPLITS}  # no source scoring inside make_problem
pref, key = np.array([0.5, 0.3, 0.2]), np.array(jax.random.PRNGKey(7))  # a host key: nothing on device 0
problem = problem_lib.make_problem(spec_zoo.load(spec, on_host=True), mesh=mesh, source_scores=given)
mesh_level = live_device0()  # the mesh Problem's placed shards
one = problem_lib.make_problem(spec_zoo.load(spec), source_scores=given)  # device sources, one device
one_level = live_device0()  # and the one-device Problem's sources, on device 0 too in this process
config, K, L = problem.config, len(problem.experts), problem.config.num_layers
params = program_memory.abstract_params(config, jnp.float32)
out["whole"] = program_memory.tree_bytes(params)
tensors = [list(x) if jax.tree_util.keystr(p).startswith("['blocks']") else [x]  # what one program merges
           for p, x in jax.tree_util.tree_flatten_with_path(problem.base)[0]]
out["largest_tensor"] = max(t.nbytes for ts in tensors for t in ts)
out["num_tensors"] = sum(len(ts) for ts in tensors)
hp = {"density": 0.7, "drop_rate": 0.2, "scale": 1.1, "block_weights": [1.0, 0.8], "sign_election": True}

# the tuned merge: device 0's live bytes after every tensor's program, and after the merge
base_level = live_device0()
seen, real_leaf = [], traced.dare_ties_leaf
def recording_leaf(*args, **kwargs):
    result = real_leaf(*args, **kwargs)
    seen.append(live_device0() - base_level)
    return result
traced.dare_ties_leaf = recording_leaf
theta = merge_genes.tuned_merge(problem, pref, key, hp)
traced.dare_ties_leaf = real_leaf
out["tuned_max_during"], out["tuned_calls"] = max(seen), len(seen)
out["tuned_after"] = live_device0() - base_level
out["tuned_on_host"] = all(type(x) is np.ndarray for x in jax.tree.leaves(theta))
theta_one = merge_genes.tuned_merge(one, pref, key, hp)
out["tuned_one_on_device"] = all(isinstance(x, jax.Array) for x in jax.tree.leaves(theta_one))
out["tuned_bitwise"] = all(a.dtype == b.dtype and a.tobytes() == np.asarray(b).tobytes()
                           for a, b in zip(jax.tree.leaves(theta), jax.tree.leaves(theta_one), strict=True))
del theta_one
# the paper's merge (merging.merge), also with the block-by-block path of large stacked leaves
from hm3_jax.merging import api
paper_level = live_device0()
for blockwise in (api.BLOCKWISE_MERGE_BYTES, 0):
    api.BLOCKWISE_MERGE_BYTES = blockwise
    paper = param_level.paper_merge(problem, pref, key, 0.6, 0.1)
    paper_one = param_level.paper_merge(one, pref, key, 0.6, 0.1)
    out[f"paper_on_host_{blockwise}"] = all(type(x) is np.ndarray for x in jax.tree.leaves(paper))
    out[f"paper_bitwise_{blockwise}"] = all(a.tobytes() == np.asarray(b).tobytes()
        for a, b in zip(jax.tree.leaves(paper), jax.tree.leaves(paper_one), strict=True))
    del paper_one
out["paper_after"] = live_device0() - paper_level

# the plan's merge on the mesh: the sources' placed shards only, no merged model
merge = program_memory.merge_program(config, K, jnp.float32, mesh)
out["merge_resident"] = merge.resident_bytes
out["sources_shards"] = program_memory.sources_device0_bytes(params, K, mesh)[1]

# scoring through the sharded engine: what device 0 holds while the model is placed, against the plan
run = ConfigDict({"engine": {"strategy": "map", "chunk_size": 8, "prefix_sharing": True}})
programs = program_memory.model_score_programs(config, K, jnp.float32, problem.objectives["heldout"], run, mesh)
out["programs"] = [p._asdict() for p in programs]
out["planned_resident"] = program_memory.model_score_resident(params, K, mesh)
engine = problem.engines["heldout"]
shell, pool = problem_lib.place_own_part(engine, models.shell_of(theta), problem_lib.pool_for(problem, theta), K)
chunk = engine.chunk_size
out["measured_arguments"] = on_device0(jax.tree.leaves((shell, pool))) + chunk // 2 * L * 4  # + the paths
out["measured_resident"] = live_device0() - (one_level - mesh_level) - on_device0(jax.tree.leaves((shell, pool)))
out["own_placed"] = on_device0(jax.tree.leaves((shell, pool[K:])))  # the model's shell and own part
out["paths_bytes"] = chunk // 2 * L * 4  # device 0's half of a chunk of int32 paths
del shell, pool
# the held-out bootstrap's re-run of a model (a resumed run): it places the model's own part only, like score_params
from hm3_jax.paths import path_engine
from hm3_jax.search import heldout_bootstrap
placed, real_place = [], path_engine.place_model
def recording_place(*args):
    result = real_place(*args)
    placed.append(live_device0() - base_level)
    return result
path_engine.place_model = recording_place
spec_mesh = heldout_bootstrap.params_spec(problem, theta)._replace(model_id="rerun")  # not the cached stats
_, boot_mesh = heldout_bootstrap.example_stats(problem, spec_mesh)
path_engine.place_model = real_place
out["bootstrap_placed"] = placed
out["bootstrap_after"] = live_device0() - base_level
# the no-parameter-level ablation's and the path baselines' model: placed once, its engines add nothing
from hm3_jax.search import arch_level
np_shell, np_pool = arch_level.no_param_level_model(problem)
np_level = live_device0()
engines = [problem.engines[s].with_model(np_shell, np_pool, pool_id=f"np{i}") for i, s in enumerate(["search", "heldout"] * 2)]
for e in engines:
    e._placed()
out["np_added_by_engines"] = live_device0() - np_level
out["np_placed"] = np_level - base_level
out["np_own"] = on_device0(jax.tree.leaves((np_shell, np_pool[K:])))
out["np_experts_reused"] = all(a is b for a, b in zip(jax.tree.leaves(np_pool[:K]), jax.tree.leaves(engine.pool[:K])))
del engines, e, np_shell, np_pool
scores = problem_lib.score_params(engine, problem.experts, theta)
out["score_after"] = live_device0() - base_level
one_scores = problem_lib.score_params(one.engines["heldout"], one.experts, merge_genes.tuned_merge(one, pref, key, hp))
out["scores"] = {"mesh": np.asarray(scores).tolist(), "one": np.asarray(one_scores).tolist()}
theta_one = merge_genes.tuned_merge(one, pref, key, hp)
_, boot_one = heldout_bootstrap.example_stats(one, heldout_bootstrap.params_spec(one, theta_one)._replace(model_id="rerun"))
out["bootstrap"] = {"mesh": list(map(float, boot_mesh)), "one": list(map(float, boot_one))}
del theta_one
one_programs = program_memory.model_score_programs(config, K, jnp.float32, one.objectives["heldout"], run)
out["one_programs"] = [p._asdict() for p in one_programs]
out["one_planned_resident"] = program_memory.model_score_resident(params, K)
out["one_arguments"] = program_memory.tree_bytes((models.shell_of(params), (params["blocks"],) * (K + 1)))
# one device: beside the scored model's shell and pool, device 0 holds the sources as loaded (the pool's expert
# parts are theirs); the mesh Problem's shards are not part of a one-device run
theta_one = merge_genes.tuned_merge(one, pref, key, hp)
shell_one, pool_one = models.shell_of(theta_one), problem_lib.pool_for(one, theta_one)
out["one_measured_resident"] = live_device0() - mesh_level - on_device0(jax.tree.leaves((shell_one, pool_one)))
out["chunk"] = chunk
print("RESULT " + json.dumps(out))
"""


def test_merges_and_scoring_on_a_mesh_hold_shards_only(spec_path):  # noqa: F811
    out = child_result(_CHILD, spec_path)
    # merges of host sources: host arrays, bitwise the one-device merges, nothing left on device 0
    assert out["tuned_on_host"] and out["tuned_one_on_device"] and out["tuned_bitwise"]
    for blockwise in ("0", str(2**28)):
        assert out[f"paper_on_host_{blockwise}"] and out[f"paper_bitwise_{blockwise}"], blockwise
    assert out["tuned_after"] == 0 and out["paper_after"] == 0
    # while merging: at most one merged tensor (plus a few scalars: keys, hyperparameters) on device 0
    assert out["tuned_calls"] == out["num_tensors"] > 10  # shell leaves, and every block of a stacked leaf
    assert out["largest_tensor"] <= out["tuned_max_during"] <= out["largest_tensor"] + 1024
    assert out["tuned_max_during"] < out["whole"] / 8
    # the plan's merge on a mesh: the sources' placed shards, no merged model
    assert out["merge_resident"] == out["sources_shards"]
    # scoring through the sharded engine: the values of one device, and device 0's bytes are the plan's
    assert max(out["scores"]["one"]) > 0
    assert all(abs(a - b) <= 1e-6 for a, b in zip(out["scores"]["mesh"], out["scores"]["one"], strict=True))
    assert {p["name"] for p in out["programs"]} == {
        "model_scores/gsm",
        "model_scores/xnli",
        "model_scores/code",
    }
    for p in out["programs"]:
        assert p["devices"] == 8 and p["mesh"] == "paths:2,data:1,model:4", p
        assert p["argument_bytes"] == out["measured_arguments"], p
        assert p["resident_bytes"] == out["planned_resident"] == out["measured_resident"], p
    assert out["measured_arguments"] < 0.5 * 4 * out["whole"]  # the pool and the shell split over "model"
    assert out["score_after"] == 0  # the placed model is dropped with the engine that scored it
    # the bootstrap's re-run: the same per-task scores, placing only the model's shell and own part, then dropped
    # (when the engine places its model, the chunk's paths are placed already)
    assert out["bootstrap_placed"] and max(out["bootstrap_placed"]) == out["own_placed"] + out["paths_bytes"]
    assert all(
        abs(a - b) <= 1e-6 for a, b in zip(out["bootstrap"]["mesh"], out["bootstrap"]["one"], strict=True)
    )
    assert out["bootstrap_after"] == 0
    # the ablation's model: its shell and own part placed once, the experts' placed parts reused, no engine copies
    # (on CPU a replicated leaf placed from the same host array as the sources' placed part may share its buffer:
    # expert 0's norm scales, 256 bytes; an accelerator copies)
    assert out["np_experts_reused"] and out["np_own"] - 1024 <= out["np_placed"] <= out["np_own"]
    assert out["np_own"] == out["own_placed"] and out["np_added_by_engines"] == 0
    # one device: the decode programs' arguments are the shell, the K + 1 parts and a chunk of paths
    decode = [p for p in out["one_programs"] if p["name"] in ("model_scores/gsm", "model_scores/code")]
    assert len(decode) == 2 and all(p["argument_bytes"] == out["one_arguments"] + out["chunk"] * 2 * 4
                                    for p in decode)  # fmt: skip
    assert out["one_planned_resident"] == out["one_measured_resident"] > 0
