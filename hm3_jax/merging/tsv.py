"""Task Singular Vectors merging, TSV-M (Gargiulo et al., CVPR 2025): low-rank, decorrelated task matrices.

For every 2-D layer (one block of a stacked leaf at a time), with task matrices `Delta_k = theta_k - base`
(`[m, n]`), K tasks, weights w_k:

1. SVD `Delta_k = U_k diag(s_k) V_k^T` and keep each task's top r = max(1, floor(min(m, n) * rank_fraction))
   singular triplets (rank_fraction defaults to 1/K, the paper's "1/T of the spectrum per task");
2. concatenate `U = [U_1[:, :r], ..., U_K[:, :r]]` `[m, K r]`, `s = [w_1 s_1[:r], ..., w_K s_K[:r]]`,
   `V = [V_1[:, :r], ..., V_K[:, :r]]` `[n, K r]`;
3. decorrelate by the orthogonal Procrustes solution (the nearest matrix with orthonormal columns):
   `U = P S Q^T` (thin SVD) -> `U_perp = P Q^T`, and the same for V;
4. `merged = base + scale * U_perp diag(s) V_perp^T`   (paper Eq. 9 with alpha = `scale`).

Other leaves (biases, norms, 1-D vectors; anything that is not a matrix per block) get the weighted mean task
vector, `base + scale * sum_k w_k Delta_k / K`, as the paper's code averages them. With all w_k = 1 this is
TSV-M; a preference lambda enters as `w_k = K lambda_k` (equal weights = the paper). A task of weight 0 has
its singular vectors masked to 0 before step 3, which gives exactly the merge without it (its columns do not
change the others' polar factor; the columns it gets back are multiplied by s = 0). When K r > min(m, n)
(tiny layers, many tasks) the Procrustes factor cannot have orthonormal columns and the tasks overlap.

`tsv_kernel` has the per-tensor kernel signature of `kernels.py` and is registered as `merge("tsv", base,
models, weights=..., scale=..., rank_fraction=...)` (`api.py`), which applies it per leaf and per block of the
leaves stacked under "blocks" (so every `[L, m, n]` leaf is L matrices), in float32 with the base's dtypes out;
the streaming merge of checkpoints runs it on each Hugging Face tensor whole.

On CPU every SVD runs in numpy through a host callback, one matrix at a time. jaxlib's CPU LAPACK kernels
split a batch of matrices (here: the blocks, under `merge`'s vmap) over XLA's intra-op thread pool from a thread
of that same pool and block until the parts finish; with several such calls in flight (two cores here) every
pool thread ends up waiting and the program never finishes (seen with jaxlib 0.10.2: `LuDecomposition` in
`jax::ParallelBatchMap`, all `tf_XLAEigen` threads parked; batched `jnp.linalg.solve`s hang the same way, see
`regmean.py`). Other backends use `jnp.linalg.svd`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax import host_blas


@host_blas.single_threaded
def _svd_host(x: np.ndarray):
    u, s, vt = np.linalg.svd(np.asarray(x, np.float32), full_matrices=False)
    return u.astype(np.float32), s.astype(np.float32), vt.astype(np.float32)


def _svd(x: jax.Array):
    """Thin SVD `x = U diag(s) V^T` of one `[m, n]` matrix: (U `[m, q]`, s `[q]`, V^T `[q, n]`), q = min(m, n).
    On CPU in numpy, one matrix at a time also under vmap (module docstring); elsewhere `jnp.linalg.svd`."""
    m, n = x.shape
    q = min(m, n)
    shapes = (
        jax.ShapeDtypeStruct((m, q), jnp.float32),
        jax.ShapeDtypeStruct((q,), jnp.float32),
        jax.ShapeDtypeStruct((q, n), jnp.float32),
    )

    def on_cpu(x):
        return jax.pure_callback(_svd_host, shapes, x, vmap_method="sequential")

    def elsewhere(x):
        return tuple(jnp.linalg.svd(x, full_matrices=False))

    return jax.lax.platform_dependent(x.astype(jnp.float32), cpu=on_cpu, default=elsewhere)


def _polar(x: jax.Array) -> jax.Array:
    """`P Q^T` from the thin SVD `x = P S Q^T`: the matrix with orthonormal columns nearest to `x`."""
    p, _, qt = _svd(x)
    return p @ qt


def task_rank(shape: tuple[int, ...], num_models: int, rank_fraction: float | None = None) -> int:
    """r = max(1, floor(min(m, n) * rank_fraction)), rank_fraction default 1/K."""
    fraction = 1.0 / num_models if rank_fraction is None else float(rank_fraction)
    return max(1, int(min(shape[-2:]) * fraction))


def tsv_kernel(key, base, thetas, weights, *, scale: float = 1.0, rank_fraction: float | None = None):
    """TSV-M on one tensor (module docstring): base `[...]`, thetas `[K, ...]`, weights `[K]` -> `[...]`.

    A 2-D tensor `[m, n]` gets the decorrelated low-rank sum; any other shape the weighted mean task vector.
    """
    del key
    num_models = thetas.shape[0]
    deltas = thetas - base
    w = weights.astype(jnp.float32)
    if base.ndim != 2:
        return base + scale * jnp.tensordot(w, deltas, axes=1) / num_models
    r = task_rank(base.shape, num_models, rank_fraction)
    u, s, vt = (jnp.stack(parts) for parts in zip(*(_svd(d) for d in deltas), strict=True))  # [K, m, q] ...
    live = (w != 0).astype(jnp.float32)[:, None, None]
    u_cat = jnp.concatenate(list(u[:, :, :r] * live), axis=1)  # [m, K r]
    v_cat = jnp.concatenate(list(jnp.swapaxes(vt[:, :r, :], 1, 2) * live), axis=1)  # [n, K r]
    s_cat = (s[:, :r] * w[:, None]).reshape(-1)  # [K r]
    u_perp, v_perp = _polar(u_cat), _polar(v_cat)
    return base + scale * (u_perp * s_cat[None, :]) @ v_perp.T
