"""hm3_jax.host_blas: numpy's BLAS limited to one thread inside, restored after, values unchanged."""

import threading

import numpy as np
from threadpoolctl import threadpool_info

from hm3_jax import host_blas


def blas_threads() -> list[int]:
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_single_threaded_limits_inside_and_restores_after():
    before = blas_threads()
    assert before, "numpy loaded no BLAS library threadpoolctl can see"
    seen = host_blas.single_threaded(blas_threads)()
    assert seen == [1] * len(before)
    assert blas_threads() == before


def test_nested_and_concurrent_sections_restore_the_limit():
    before = blas_threads()
    inner = host_blas.single_threaded(blas_threads)
    assert host_blas.single_threaded(lambda: inner())() == [1] * len(before)  # re-entrant, no deadlock
    results, barrier = [], threading.Barrier(4)

    def work():
        barrier.wait()
        results.append(inner())

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [[1] * len(before)] * 4
    assert blas_threads() == before


def test_values_equal_the_default_thread_count():
    # The routines hm3_jax runs on the host: SVD (TSV-M), eigvalsh (RegMean's check), matmul, lstsq.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 320)).astype(np.float32)
    g = rng.standard_normal((200, 200))
    g = g @ g.T

    def compute():
        u, s, vt = np.linalg.svd(x, full_matrices=False)
        return u, s, vt, np.linalg.eigvalsh(g), x @ x.T, np.linalg.lstsq(g, g[:, :3], rcond=None)[0]

    for a, b in zip(compute(), host_blas.single_threaded(compute)(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_tiny8_probe_fit_runs_on_one_thread_with_the_same_values(monkeypatch):
    """fit_linear_probe's Newton steps (Hessian products, lstsq) run single-threaded; the head is bitwise the
    head of the default thread count (host_blas.ENABLED = False)."""
    from hm3_jax.tasks.tiny8 import train as train_lib

    rng = np.random.default_rng(1)
    labels = np.arange(600) % 5
    feats = (rng.normal(size=(5, 16))[labels] + 2.0 * rng.normal(size=(600, 16))).astype(np.float32)
    lstsq, seen = np.linalg.lstsq, []

    def recording_lstsq(*args, **kwargs):
        seen.append(blas_threads())
        return lstsq(*args, **kwargs)

    monkeypatch.setattr(np.linalg, "lstsq", recording_lstsq)
    head = train_lib.fit_linear_probe(feats, labels, 5, 1e-2)
    assert seen and all(s == [1] * len(blas_threads()) for s in seen)
    monkeypatch.setattr(host_blas, "ENABLED", False)
    seen.clear()
    default = train_lib.fit_linear_probe(feats, labels, 5, 1e-2)
    assert seen and seen[0] == blas_threads()  # the default count inside when disabled
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(head[name], default[name])
