"""hm3_jax.distributed: mesh specs, placement, and the path engine's same per-path scores on every mesh and
process count (experiments/distributed_demo.py).

Multi-device runs happen in subprocesses (XLA_FLAGS must be set before jax is imported there); every
subprocess is bounded by a timeout. The reference scores are computed here with a plain Python loop over
``hm3_jax.models.apply_path`` and numpy scoring, independent of the sharding code.
"""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags

from experiments import distributed_demo as demo
from hm3_jax import distributed, models
from tests._subprocess_util import REPO, free_port, subprocess_env

TIMEOUT = 240


def _env(num_devices: int) -> dict:
    # CPU, simulated devices, XLA's fast-compile flags (tests/_subprocess_util)
    return subprocess_env(num_devices)


@pytest.fixture(scope="module")
def reference():
    """Scores per path from apply_path (with the attention mask) on the full batch, scored in numpy (float64)."""
    config, shell, pool, paths, data = demo.toy_problem()
    apply_fn = jax.jit(
        lambda p: models.apply_path(config, shell, pool, p, data["input_ids"], None, data["attention_mask"])
    )
    out = {name: [] for name in demo.SCORES}
    targets, mask = data["input_ids"][:, 1:], data["loss_mask"][:, 1:].astype(bool)
    for path in paths:
        logits = np.asarray(apply_fn(path), np.float64)[:, :-1]
        logp = logits - logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        ll = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
        hit = logits.argmax(-1) == targets
        exact = [bool(np.all(h[m])) for h, m in zip(hit, mask, strict=True) if m.any()]
        out["likelihood"].append(100 * np.exp(ll[mask].sum() / mask.sum()))
        out["token_accuracy"].append(100 * hit[mask].sum() / mask.sum())
        out["exact_match"].append(100 * sum(exact) / len(exact))
    # The toy problem must make paths distinguishable, or "same scores on every mesh" would prove little.
    assert np.ptp(out["likelihood"]) > 1 and max(out["token_accuracy"]) > 0
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def _check(result: dict, reference: dict) -> None:
    for name, want in reference.items():
        got = np.asarray(result["scores"][name], np.float64)
        np.testing.assert_allclose(
            got, want, rtol=2e-5, atol=1e-3, err_msg=f"{name} on mesh {result['mesh']}"
        )


# ------------------------------------------------------------------------------------------------ mesh specs


def test_parse_mesh_spec_sizes_and_defaults():
    assert distributed.parse_mesh_spec(None, 8) == {"paths": 8, "data": 1, "model": 1}
    assert distributed.parse_mesh_spec("data:2,paths:4", 8) == {"paths": 4, "data": 2, "model": 1}
    assert distributed.parse_mesh_spec("paths:-1,model:2", 8) == {"paths": 4, "data": 1, "model": 2}
    assert distributed.parse_mesh_spec(" paths : 2 , data:2,model:2", 8) == {
        "paths": 2,
        "data": 2,
        "model": 2,
    }


@pytest.mark.parametrize(
    "spec, match",
    [
        ("paths:3", r"'paths:3' has 3 devices .* but there are 8 devices"),
        ("paths:4,batch:2", "unknown axis 'batch'"),
        ("paths:4,paths:2", "given twice"),
        ("paths=8", "cannot parse"),
        ("paths:0,data:8", "size 0"),
        ("paths:-1,data:-1", "only one axis may be -1"),
        ("paths:-1,data:3", "not divisible by 3"),
    ],
)
def test_parse_mesh_spec_errors_name_the_problem(spec, match):
    with pytest.raises(ValueError, match=match):
        distributed.parse_mesh_spec(spec, 8)


def test_make_mesh_on_local_devices():
    mesh = distributed.make_mesh(None)
    assert mesh.axis_names == ("paths", "data", "model")
    assert dict(mesh.shape) == {"paths": jax.device_count(), "data": 1, "model": 1}
    with pytest.raises(ValueError, match=f"there are {jax.device_count()} devices"):
        distributed.make_mesh(f"paths:{jax.device_count()},data:2")


# ------------------------------------------------------------------------------------------------ placement


def test_pad_to_multiple():
    x = np.arange(6).reshape(3, 2)
    np.testing.assert_array_equal(distributed.pad_to_multiple(x, 4, -1)[3], [-1, -1])
    assert distributed.pad_to_multiple(x, 4, -1).shape == (4, 2)
    assert distributed.pad_to_multiple(x, 3, -1) is not None and distributed.pad_to_multiple(
        x, 3, -1
    ).shape == (3, 2)


def test_shard_paths_and_batch_validate():
    mesh = distributed.make_mesh(None)
    placed, n = distributed.shard_paths(np.array([[0, 1, -1]]), mesh)
    assert n == 1 and placed.dtype == np.int32 and placed.shape[0] % mesh.shape["paths"] == 0
    with pytest.raises(ValueError, match="integer array"):
        distributed.shard_paths(np.zeros((2, 3), np.float32), mesh)
    with pytest.raises(ValueError, match="empty"):
        distributed.shard_paths(np.zeros((0, 3), np.int32), mesh)
    with pytest.raises(ValueError, match=r"\['x'\] has shape \(\)"):
        distributed.shard_batch({"x": np.float32(1.0)}, mesh)


def test_pool_partition_specs_column_and_row_parallel():
    from jax.sharding import PartitionSpec as P

    mesh = distributed.make_mesh(None)
    pool = {
        "q": {"kernel": np.zeros((6, 8, 16)), "bias": np.zeros((6, 16))},
        "o": {"kernel": np.zeros((6, 16, 8))},
        "down": {"kernel": np.zeros((6, 32, 8))},
        "gate": {"kernel": np.zeros((6, 8, 3))},  # 3 is not divisible by 2: replicated
        "attn_norm": {"scale": np.zeros((6, 8))},
    }

    class FakeMesh:  # pool_partition_specs reads only mesh.shape
        shape = {"paths": 1, "data": 1, "model": 2}

    specs = distributed.pool_partition_specs(pool, FakeMesh())
    assert specs["q"]["kernel"] == P(None, None, "model")
    assert specs["q"]["bias"] == P()
    assert specs["o"]["kernel"] == P(None, "model", None)
    assert specs["down"]["kernel"] == P(None, "model", None)
    assert specs["gate"]["kernel"] == P()
    assert specs["attn_norm"]["scale"] == P()
    assert all(s == P() for s in jax.tree.leaves(distributed.pool_partition_specs(pool, mesh)))


# ------------------------------------------------------------------------------------------------ host side


def test_main_process_only_and_flags():
    calls = []
    assert distributed.main_process_only(lambda x: calls.append(x) or "ran")(3) == "ran"
    assert calls == [3] and distributed.is_main_process()
    fv = flags.FlagValues()
    distributed.define_flags(fv)
    distributed.define_flags(fv)  # idempotent
    fv(["prog", "--mesh=paths:1", "--multihost=off"])
    assert fv.mesh == "paths:1" and distributed.initialize_from_flags(fv) is False


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"coordinator_address": "127.0.0.1:1234"}, r"missing \['num_processes', 'process_id'\]"),
        ({"coordinator_address": "nohost", "num_processes": 2, "process_id": 0}, "host:port"),
        ({"coordinator_address": "a:1", "num_processes": 2, "process_id": 2}, "process_id=2"),
        ({"mode": "sometimes"}, "multihost mode"),
    ],
)
def test_initialize_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        distributed.initialize(**kwargs)


def test_initialize_single_process_is_a_no_op():
    assert distributed.initialize(mode="auto") is False
    assert distributed.initialize("127.0.0.1:1", 1, 0, mode="auto") is False


# ------------------------------------------------------------------------------------------------ same scores


def test_engine_scores_on_one_device_match_reference(reference):
    result = demo.run("one", num_paths=6, batch=8, seq=12, hidden=32, repeats=0)
    assert result["mesh"] == {"paths": 1, "data": 1, "model": 1}
    _check(result, reference)


def test_same_scores_on_8_simulated_devices(tmp_path, reference):
    out = tmp_path / "scores.json"
    cmd = [
        sys.executable,
        "-m",
        "experiments.distributed_demo",
        "--meshes=paths:8;paths:4,data:2;paths:2,data:2,model:2",
    ]
    subprocess.run(
        cmd + [f"--out_json={out}"], env=_env(8), cwd=REPO, check=True, timeout=TIMEOUT, capture_output=True
    )
    results = json.loads(out.read_text())
    assert [r["mesh"] for r in results] == [
        {"paths": 8, "data": 1, "model": 1},
        {"paths": 4, "data": 2, "model": 1},
        {"paths": 2, "data": 2, "model": 2},
    ]
    for result in results:
        assert result["num_devices"] == 8
        _check(result, reference)
    # The model axis really splits the pool's matrices: each device holds about half of the pool.
    assert results[2]["pool_bytes_per_device"] < 0.6 * results[2]["pool_bytes"]
    assert results[0]["pool_bytes_per_device"] == results[0]["pool_bytes"]


def test_same_scores_in_two_processes(tmp_path, reference):
    port = free_port()
    outs = [tmp_path / f"p{i}.json" for i in range(2)]
    procs = []
    for i in range(2):
        cmd = [
            sys.executable,
            "-m",
            "experiments.distributed_demo",
            "--meshes=paths:2,data:2,model:2",  # every axis spans both processes' devices
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
            "--distributed_timeout=60",
            f"--out_json={outs[i]}",
        ]
        log = open(tmp_path / f"p{i}.log", "w")  # noqa: SIM115 (closed below)
        procs.append(
            (subprocess.Popen(cmd, env=_env(4), cwd=REPO, stdout=log, stderr=subprocess.STDOUT), log)
        )
    try:
        codes = [p.wait(timeout=TIMEOUT) for p, _ in procs]
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    logs = "\n".join((tmp_path / f"p{i}.log").read_text()[-2000:] for i in range(2))
    assert codes == [0, 0], logs
    assert outs[0].exists() and not outs[1].exists(), "only process 0 writes the report"
    results = json.loads(outs[0].read_text())
    for result in results:
        assert result["num_processes"] == 2 and result["num_devices"] == 8
        _check(result, reference)
