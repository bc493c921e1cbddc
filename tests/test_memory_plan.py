"""The memory plan (hm3_jax/pipeline/memory_plan.py, experiments/plan.py) and the paper's real-scale configs
(experiments/configs/llama2_7b.py, qwen25_1p5b.py).

Tiny random checkpoints of both settings' families (Qwen2: q/k/v biases, tied embeddings, GQA; Llama-2: three
expert vocabularies of different sizes read with `tokenizer_source: base`) are written with
`hm3_jax.models.init` + `save_pretrained` into the configs' own spec layout (`shape_spec.write_shape_spec`:
char-level tokenizer, JSONL rows of given token lengths). In process (one device) the plan's bytes are checked
against the arrays: the compiled program's argument bytes are the shell's, the pool's and a chunk of paths'
nbytes, its output bytes the nbytes of what running it returns, and its temporaries hold at least the KV caches
of greedy decoding along a path (CPU has no device memory stats, `jax.Device.memory_stats()` is None, so
temporaries are checked against that analytic lower bound and a stated factor, not a measured peak). On 8
simulated devices (one subprocess per config, run together) each config's plan runs through the binary: the
Llama one on `paths:2,model:4` with too little memory exits 1 naming the program and the device, the Qwen one
on `paths:4,data:2` fits and reports the largest batch.
"""

import os
import re

import jax
import numpy as np
import pytest

from hm3_jax.tasks.shape_spec import TaskShape
from tests._subprocess_util import child_result

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
TASKS = {  # one task per objective: a generation, a multiple choice, a chrF generation of another length
    "gsm": TaskShape("exact_match", "math", 20, prompt_tokens=24, target_tokens=4, max_new_tokens=6),
    "xnli": TaskShape("multiple_choice", "chat", 20, prompt_tokens=16, target_tokens=6, choices=3),
    "code": TaskShape("chrf", "code", 12, prompt_tokens=20, target_tokens=8, max_new_tokens=10),
}


def _tiny_setting(root, module, vocab_sizes: dict, **shape_kwargs) -> str:
    """The setting's spec with tiny random checkpoints of its configs' architecture; returns the spec path."""
    from hm3_jax import Model, models, save_pretrained
    from hm3_jax.io import hf_config
    from hm3_jax.tasks.shape_spec import write_shape_spec

    configs = {}
    for name, hf in module.HF_CONFIGS.items():
        configs[name] = {**hf, **TINY, "vocab_size": vocab_sizes[name], "eos_token_id": 2, "bos_token_id": 1}
        configs[name]["num_key_value_heads"] = (
            2 if hf["num_key_value_heads"] < hf["num_attention_heads"] else 4
        )
    path = write_shape_spec(str(root), configs, TASKS, dtype="float32", eval_batch_size=4, **shape_kwargs)
    for i, (name, hf) in enumerate(configs.items()):
        config = hf_config.config_from_hf_dict(hf)
        params = models.init(config, jax.random.PRNGKey(i))
        save_pretrained(Model(config, params, hf), os.path.join(root, name))
    return path


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    from experiments.configs import llama2_7b, qwen25_1p5b

    root = tmp_path_factory.mktemp("settings")
    qwen = _tiny_setting(root / "qwen", qwen25_1p5b, dict.fromkeys(qwen25_1p5b.HF_CONFIGS, 64), add_bos=False)
    llama = _tiny_setting(root / "llama", llama2_7b, {"base": 64, "chat": 64, "math": 65, "code": 80},
                          tokenizer_source="base", add_bos=True)  # fmt: skip
    return {"qwen": qwen, "llama": llama}


# The 8-device part, one child process (its start-up and imports are most of a plan's cost here): the binary's
# main for the Llama setting (paths:2,model:4, too little memory; its SystemExit is what the process would exit
# with), then the Qwen setting's plan (paths:4,data:2) and its path engine's per-device bytes measured on arrays.
_CHILD = r"""
import contextlib, io, json, sys
import jax, jax.numpy as jnp, numpy as np
from absl import app
from experiments import cli_errors, plan as plan_bin
from experiments.configs import qwen25_1p5b
from hm3_jax import distributed, models
from hm3_jax.pipeline import memory_plan, program_memory
from hm3_jax.search.problem import make_engines
from hm3_jax.tasks import spec_zoo

llama, qwen = sys.argv[1:3]
out = {}
sys.argv = ["plan", f"--config=experiments/configs/llama2_7b.py:{llama},smoke", "--mesh=paths:2,model:4",
            "--device_memory_gb=0.0001", "--programs=path_scores", "--splits=search", "--largest_batch=false"]
printed = io.StringIO()  # the binary's table
try:
    with contextlib.redirect_stdout(printed):
        app.run(plan_bin.main, flags_parser=cli_errors.make_flags_parser(plan_bin._CONFIG))
except SystemExit as e:
    out["llama_exit"] = e.code
out["llama_stdout"] = printed.getvalue()
config = qwen25_1p5b.get_config(qwen + ",smoke")
one = memory_plan.plan_run(config, None, 1 << 30, programs=("path_scores",), splits=("search",), search_batch=False)
out["one_device"] = {"fits": one.fits, "host_bytes": one.host_bytes, "model_bytes": one.model_bytes,
                     "programs": [p._asdict() for p in one.programs]}
mesh = distributed.make_mesh("paths:4,data:2")
plan = memory_plan.plan_run(config, mesh, 16 << 30, programs=("path_scores",), splits=("search",))
out["qwen_plan"] = memory_plan.format_plan(plan)
out["qwen"] = {"fits": plan.fits, "largest_batch": plan.largest_batch, "programs": [p._asdict() for p in plan.programs]}
zoo = spec_zoo.load(config.spec)
params = [zoo.experts[t].params for t in zoo.tasks] + [zoo.base.params]
shell, pool = models.shell_of(zoo.base.params), models.make_pool([p["blocks"] for p in params])
engine = make_engines(zoo.base.config, shell, pool, {"search": list(zoo.objectives["search"].values())},
                      chunk_size=config.engine.chunk_size, mesh=mesh, pool_id="measured")["search"]
t_max = config.arch.rl.t_max
compiled = engine.lower_plain(t_max).compile()
paths = np.tile(np.arange(t_max, dtype=np.int32) % 4, (engine.chunk_size, 1))
shell_d, pool_d = jax.tree.map(distributed.place, (shell, pool), engine.model_shardings())
paths_d = distributed.place(paths, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("paths")))
outputs = compiled(shell_d, pool_d, paths_d)
dev0 = lambda tree: sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device.id == 0)
out["measured"] = {"arguments": dev0((shell_d, pool_d, paths_d)), "outputs": dev0(outputs),
                   "num_outputs": len(jax.tree.leaves(outputs)), "chunk": engine.chunk_size}
# The same scores on one device, on paths:4,data:2 and with the model split over "model" (paths:2,model:4)
test_paths = np.array([[0, 1, -1, -1], [6, 7, -1, -1], [0, 5, 2, 7], [3, 3, 4, -1], [1, -1, -1, -1],
                       [7, 6, 5, 4]], np.int32)[:, :t_max]
objs = {"search": list(zoo.objectives["search"].values())}
tp = make_engines(zoo.base.config, shell, pool, objs, chunk_size=4, mesh=distributed.make_mesh("paths:2,model:4"),
                  pool_id="tp")["search"]
one = make_engines(zoo.base.config, shell, pool, objs, chunk_size=4, mesh=None, pool_id="one")["search"]
out["scores"] = {"one": one.evaluate(test_paths).scores.tolist(), "paths4_data2": engine.evaluate(test_paths).scores.tolist(),
                 "paths2_model4": tp.evaluate(test_paths).scores.tolist()}
out["tp_pool_bytes_device0"] = dev0(tp._placed()[1])
out["tp_embedding_shard"] = list(tp._placed()[0]["embed"]["embedding"].addressable_shards[0].data.shape)
# A Problem on that mesh places its pool once: every split's engine reads the same placed arrays
from hm3_jax.search import problem as problem_lib
tp_mesh = distributed.make_mesh("paths:2,model:4")
given = {s: np.zeros((len(zoo.tasks) + 1, len(zoo.tasks))) for s in problem_lib.SPLITS}  # no source scoring
prob = problem_lib.make_problem(zoo, mesh=tp_mesh, source_scores=given)
placed = [e._placed()[1] for e in prob.engines.values()]
out["splits"] = len(placed)
out["shared_placement"] = all(a is b for p in placed[1:] for a, b in zip(jax.tree.leaves(placed[0]), jax.tree.leaves(p)))
out["problem_pool_device0"] = dev0(placed[0])
out["problem_pool_planned"] = program_memory.placed_bytes({}, placed[0], tp_mesh)
out["problem_pool_whole"] = sum(x.nbytes for x in jax.tree.leaves(placed[0]))
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def child(settings):
    """The child's results (see _CHILD; the Llama plan binary's printed table in "llama_stdout")."""
    # timeout: a hang bound (323 s seen at load ~5)
    return child_result(_CHILD, settings["llama"], settings["qwen"], timeout=900)


def test_paper_configs_build():
    """The budget of the paper (15 preferences, 1000 episodes per preference, t_max = 2 L) on the real shapes
    (`:shapes` writes the config.json files of the checkpoints, no weights); `,smoke` keeps checkpoints.py's."""
    from experiments.configs import llama2_7b, qwen25_1p5b

    for module, num_layers in ((llama2_7b, 32), (qwen25_1p5b, 28)):
        config = module.get_config("shapes")
        assert config.preferences.num == 15 and config.arch.rl.t_max == 2 * num_layers
        assert config.arch.rl.num_envs * config.arch.rl.num_iterations >= 15 * 1000
        with pytest.raises(ValueError, match=f"{module.__name__.rsplit('.', 1)[1]}.py needs the spec file"):
            module.get_config()
        assert os.path.isfile(config.spec) and not any(f.endswith(".safetensors") for f in os.listdir(
            os.path.join(os.path.dirname(config.spec), "base")))  # fmt: skip


def test_plan_bytes_agree_with_the_arrays(settings, child):
    """One device (no mesh, planned in the child): the engine's program and the prefix tree's; arguments = the
    loaded arrays' bytes."""
    from experiments.configs import qwen25_1p5b
    from hm3_jax import models
    from hm3_jax.tasks import spec_zoo

    one = child["one_device"]
    planned = {p["name"]: p for p in one["programs"]}
    # multiple choice runs as a tree; the path baseline (EA) passes junction rows, programs of their own
    assert set(planned) == {"path_scores/search" + s for s in ("", "/tree", "/junction", "/tree/junction")}
    assert one["fits"] and one["host_bytes"] == 4 * one["model_bytes"]

    config = qwen25_1p5b.get_config(settings["qwen"] + ",smoke")
    zoo = spec_zoo.load(config.spec)
    params = [zoo.experts[t].params for t in zoo.tasks] + [zoo.base.params]
    shell, pool = models.shell_of(zoo.base.params), models.make_pool([p["blocks"] for p in params])
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    t_max, chunk = config.arch.rl.t_max, config.engine.chunk_size
    p = planned["path_scores/search"]
    assert p["argument_bytes"] == nbytes((shell, pool)) + chunk * t_max * 4  # + a chunk of int32 paths
    # + the chunk's junction rows: scale and shift [chunk, t_max, D] float32
    junction = 2 * chunk * t_max * zoo.base.config.hidden_size * 4
    assert planned["path_scores/search/junction"]["argument_bytes"] == p["argument_bytes"] + junction
    assert one["model_bytes"] == nbytes(zoo.base.params)
    # the sources, the sources' pool (the split engine's: during the search the argument is a preference's pool)
    # and the other preferences' merged models (shell + pool each; all N held: memory.resident_preferences = 0)
    held = config.preferences.num - 1
    assert config.memory.resident_preferences == 0
    assert p["resident_bytes"] == 4 * one["model_bytes"] + nbytes(pool) + held * nbytes((shell, pool))
    # Temporaries hold at least greedy decoding's (k, v) cache of every path step, [B, KV, prompt + new, hd]
    # float32 each; the stated factor bounds the rest (logits, activations; 7-9x here).
    cfg = zoo.base.config
    caches = max(
        2 * t_max * o.batch_size * cfg.num_kv_heads * (cfg.hidden_size // cfg.num_heads) * 4
        * sum(o.arrays.tree[k].shape[-1] for k in ("prompt_ids", "new_tokens"))
        for o in zoo.objectives["search"].values() if "prompt_ids" in o.arrays.tree
    )  # fmt: skip
    assert caches <= p["temp_bytes"] <= 20 * caches, (caches, p["temp_bytes"])
    tree = planned["path_scores/search/tree"]  # donates its hidden-state buffers [T_max + 1, n, B, S, D]
    assert tree["alias_bytes"] > 0 and tree["alias_bytes"] % ((t_max + 1) * cfg.hidden_size * 4) == 0


def test_tensor_parallel_engine_scores_equal_one_device(child):
    """Issue 16: on `paths:2,model:4` the engine holds the pool's matrices split over "model" (Megatron: each
    device a quarter of every kernel, the embedding split over the vocabulary) and scores like one device and
    like `paths:4,data:2` (generation with exact match, chrF, multiple choice)."""
    out = child
    scores = {k: np.asarray(v) for k, v in out["scores"].items()}
    assert scores["one"].shape == (6, 3) and np.ptp(scores["one"]) > 0  # paths score differently
    np.testing.assert_allclose(scores["paths4_data2"], scores["one"], atol=1e-6)
    np.testing.assert_allclose(scores["paths2_model4"], scores["one"], atol=1e-6)
    pool_bytes = out["measured"]["arguments"]  # replicated shell + pool + paths on paths:4,data:2
    assert out["tp_pool_bytes_device0"] < 0.4 * pool_bytes  # about 1/4 of the matrices, norms replicated
    assert out["tp_embedding_shard"] == [64 // 4, 32]
    # a Problem's engines (one per split) share one placement of its pool: a quarter of the matrices on device
    # 0, what the plan counts (`placed_bytes`); each engine placed its own copy before
    assert out["splits"] >= 2 and out["shared_placement"]
    assert out["problem_pool_device0"] == out["problem_pool_planned"] < 0.4 * out["problem_pool_whole"]


def test_run_refuses_a_run_that_does_not_fit_before_loading(settings):
    """`run.setup`'s memory check (config.memory): with a device memory given, a run that does not fit is a
    PlanError naming the program and the device, before any checkpoint is loaded; check_fits=False skips it."""
    from experiments.configs import qwen25_1p5b
    from hm3_jax.pipeline import memory_plan
    from hm3_jax.pipeline import run as run_lib

    config = qwen25_1p5b.get_config(settings["qwen"] + ",smoke")
    config.memory.device_memory_gb = 1e-4
    with pytest.raises(memory_plan.PlanError, match=r"program \S+ needs .* on device 0"):
        run_lib.check_memory(config, None, config.spec)
    config.memory.check_fits = False
    assert run_lib.check_memory(config, None, config.spec) is None


def test_a_run_that_does_not_fit_exits_1_naming_program_and_device(child):
    out = child
    stdout = out["llama_stdout"]
    code = out["llama_exit"]  # sys.exit's message: Python prints it to stderr and exits 1
    assert isinstance(code, str) and re.match(
        r"error: the run does not fit: program path_scores/search(/junction)? needs ", code
    ), code
    assert "on device 0 of mesh paths:2,data:1,model:4 (cpu;" in code
    assert re.search(r"\npath_scores/search +8 +paths:2,data:1,model:4 ", stdout) and "DOES NOT FIT" in stdout


def test_a_run_that_fits_reports_its_largest_batch_and_measured_bytes(child):
    out = child
    qwen, measured = out["qwen"], out["measured"]
    assert qwen["fits"] and "paths:4,data:2,model:1" in out["qwen_plan"], out["qwen_plan"]
    assert qwen["largest_batch"] >= 4 and qwen["largest_batch"] % 2 == 0  # a multiple of the data axis
    (program,) = [p for p in qwen["programs"] if p["name"] == "path_scores/search"]
    assert program["devices"] == 8
    # per device: the replicated shell and pool and this device's share of the chunk's paths
    assert program["argument_bytes"] == measured["arguments"]
    # outputs: this device's share of the results, plus XLA's tuple of pointers to them (8 bytes each)
    assert program["output_bytes"] == measured["outputs"] + 8 * measured["num_outputs"]


def test_plan_error_names_the_program():
    from hm3_jax.pipeline import memory_plan, program_memory

    program = program_memory.ProgramMemory(
        "path_scores/search", 8, "paths:8,data:1,model:1", 100, 10, 50, 0, 40, 0.0
    )
    plan = memory_plan.Plan((program,), 400, 100, 199, "TPU v4", 16, None)
    assert plan.fits is False and plan.failures() == [program]
    assert plan.error_message().startswith("the run does not fit: program path_scores/search needs ")
    assert "on device 0 of mesh paths:8,data:1,model:1 (TPU v4" in plan.error_message()
    assert plan._replace(usable_bytes=200).fits and plan._replace(usable_bytes=None).fits


def test_plans_trace_bf16_dots_as_an_accelerator():
    """`layers.accelerator_dots` (what `program_memory.compile_memory` lowers under): a bf16 dense compiles to a
    bf16 x bf16 -> f32 dot with no f32 copy of the kernel in its temporaries; outside it (and after it) XLA:CPU's
    widened dot, the kernel converted to f32 (4 MiB here), is what runs."""
    import jax.numpy as jnp

    from hm3_jax.models import layers

    kernel = jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16)
    x = jax.ShapeDtypeStruct((4, 1024), jnp.bfloat16)

    def compiled():
        return jax.jit(lambda k, x: layers.dense({"kernel": k}, x)).lower(kernel, x).compile()

    with layers.accelerator_dots():
        native = compiled()
    widened = compiled()  # outside again: XLA:CPU's widened dot
    assert "f32[1024,1024]" not in native.as_text() and "f32[1024,1024]" in widened.as_text()
    native_temp = native.memory_analysis().temp_size_in_bytes
    assert widened.memory_analysis().temp_size_in_bytes >= 1024 * 1024 * 4 > native_temp
