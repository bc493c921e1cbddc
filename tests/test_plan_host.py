"""The memory plan's host bytes on a mesh: the K + 1 sources and the merged models held as host arrays (issue 16).

On a mesh the sources are host arrays and every merge returns host arrays (`merging.host_leaves`); in one process
`PreferenceModels` places each preference's shards and drops its host Theta, so the host holds one merged model
at a time (the one being merged and scored). Measured on a one-device mesh over the tiny Llama-2-style spec of
`tests/test_host_sources.py` with parted pools, as at real scale (weak references to every merged model's host
leaves), and the plan's host bytes checked against the loaded arrays' bytes. On the CPU backend
`jax.device_put` of an aligned numpy array makes a device array over the numpy buffer (zero copy), which keeps the
host array alive as the device array: the test places copies, as an accelerator does (its device memory is not
the host's), so that a host Theta alive is one the run holds.
"""

import weakref

import jax
import numpy as np

from hm3_jax import distributed
from hm3_jax.pipeline import memory_plan, program_memory
from hm3_jax.pipeline.preference_models import PreferenceModels
from hm3_jax.search import param_level
from hm3_jax.search import problem as problem_lib
from hm3_jax.tasks import spec_zoo
from tests.test_host_sources import spec_path  # noqa: F401  (the fixture: a tiny Llama-2-style spec)


def _config(spec):
    from experiments.configs import llama2_7b

    return llama2_7b.get_config(f"{spec},smoke")


def test_a_mesh_run_holds_one_merged_model_on_the_host(spec_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(problem_lib, "SCORE_POOL_COPY_MAX_BYTES", 0)  # parted pools, as at real scale
    put = jax.device_put  # placements copy, as on an accelerator (see the module docstring)
    monkeypatch.setattr(
        jax, "device_put", lambda x, *a, **k: put(np.array(x) if isinstance(x, np.ndarray) else x, *a, **k)
    )
    mesh = distributed.make_mesh("paths:1")
    zoo = spec_zoo.load(spec_path, on_host=True)
    K = len(zoo.tasks)
    given = {s: np.zeros((K + 1, K)) for s in problem_lib.SPLITS}  # no source scoring
    problem = problem_lib.make_problem(zoo, mesh=mesh, source_scores=given)
    made = []
    merged_for = param_level.merged_for

    def spy(*args):
        out = merged_for(*args)
        assert all(type(x) is np.ndarray for x in jax.tree.leaves(out))  # host arrays
        made.append([weakref.ref(x) for x in jax.tree.leaves(out)])
        return out

    monkeypatch.setattr(param_level, "merged_for", spy)
    alive = lambda: sum(any(r() is not None for r in refs) for refs in made)  # noqa: E731
    key = np.asarray(jax.random.key_data(jax.random.PRNGKey(0))).tolist()
    entries = [
        {"preference": p, "merge_key": key, "paper": {"hparams": {"density": 0.7, "drop_rate": 0.3}}}
        for p in ([0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8])
    ]
    bank = PreferenceModels(problem, entries, "paper", resident=2)
    for i in (0, 1, 2, 0):
        assert bank.pools[i] is not None
        assert alive() == 0, i  # placed: the held preferences are device shards, no host Theta
    assert bank.builds == 4  # preference 0 was dropped (resident 2) and merged again
    # scoring a merged model on the mesh: the caller's host Theta, one
    theta = bank.merged(1)
    problem_lib.score_params(problem.engines["search"], problem.experts, theta)
    assert alive() == 1
    del theta
    assert alive() == 0

    # the plan: the K + 1 sources and that one merged model, in bytes of the loaded arrays
    config = _config(spec_path)
    model = sum(x.nbytes for x in jax.tree.leaves(zoo.base.params))
    kw = {"programs": ("merge",), "search_batch": False}
    on_mesh = memory_plan.plan_run(config, mesh, **kw)
    assert on_mesh.model_bytes == model and on_mesh.host_merged == 1
    assert on_mesh.host_bytes == (K + 1 + 1) * model
    assert "and 1 merged model(s) on the host" in memory_plan.format_plan(on_mesh)
    one_device = memory_plan.plan_run(config, None, **kw)  # merges on device 0, counted there
    assert one_device.host_bytes == (K + 1) * model and one_device.host_merged == 0


def test_several_processes_hold_the_held_preferences_on_the_host(spec_path, monkeypatch):  # noqa: F811
    """Their preference pools stay host arrays (alignment and export read them locally): the held ones, built
    while all are held, and the one being merged."""
    config = _config(spec_path)
    mesh = distributed.make_mesh("paths:1")
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    config.preferences.num, config.memory.resident_preferences = 5, 2
    assert program_memory.host_merged_models(config, mesh) == 2 + 1
    config.memory.resident_preferences = 0  # every preference held
    assert program_memory.host_merged_models(config, mesh) == 5 + 1
    assert program_memory.host_merged_models(config, None) == 0
