"""Sakana's data-flow-space (DFS) representation of an inference path (Akiba et al. 2024, "Evolutionary
Optimization of Model Merging Recipes", Sec. 3.2), decoded for our block pool.

Candidate sequence: the blocks of all sources laid out in order (every layer of source 0, then every layer of
source 1, ...) and this whole sequence repeated ``r`` times, i.e. ``num_slots = r * S * L`` slots; slot ``i``
names pool index ``i mod (S * L)`` (= m * L + l). A genome is a real vector of

* ``num_slots`` inclusion genes: slot i is kept in the path iff its gene is > 0 (the paper's indicator
  array), and
* ``num_slots`` scale genes (only when ``use_scales``): the junction scale applied to the hidden state
  entering the block of slot i is ``exp(clip(gene, -max_log_scale, max_log_scale))`` (positive, 1 at gene 0).

Decoding: the kept slots, in candidate order, form the path; only the first ``t_max`` kept slots are used
(our paths have at most T_max steps); if no gene is > 0 the single slot with the largest gene is kept, so a
path always has at least one block. Padding is -1 with scale 1.0.

Deviation from the paper (documented): Sakana's scaling is a matrix W[i, j] over (previous layer, next layer)
pairs, parametrised in practice by a small network; we use one scalar per candidate slot (the scale of the
input of that slot's block), which matches the evaluation contract ``junction_scales [N, T_max]`` and keeps
the genome at ``2 * num_slots`` dimensions for CMA-ES.
"""

from statistics import NormalDist
from typing import NamedTuple

import numpy as np

from hm3_jax.baselines.common import PathGeometry


class DFSRepresentation(NamedTuple):
    """Static settings of the DFS genome (see the module docstring)."""

    geometry: PathGeometry
    repeats: int = 2
    use_scales: bool = True
    max_log_scale: float = 1.0

    @property
    def num_slots(self) -> int:
        return self.repeats * self.geometry.pool_size

    @property
    def num_genes(self) -> int:
        return self.num_slots * (2 if self.use_scales else 1)

    def slot_pool_index(self) -> np.ndarray:
        """``[num_slots]`` int32 pool index of every candidate slot."""
        return (np.arange(self.num_slots) % self.geometry.pool_size).astype(np.int32)

    def initial_mean(self, std: float) -> np.ndarray:
        """A start mean whose inclusion genes keep each slot with probability ``min(1, t_max / num_slots)``
        under N(mean, std^2), so a random genome decodes to about ``t_max`` steps without truncation bias;
        scale genes start at 0 (scale 1)."""
        keep = min(0.999, self.geometry.t_max / self.num_slots)
        mean = np.zeros(self.num_genes, np.float32)
        mean[: self.num_slots] = std * NormalDist().inv_cdf(keep)
        return mean


def make_representation(geometry: PathGeometry, repeats: int = 2, use_scales: bool = True, max_log_scale=1.0):
    """Validated ``DFSRepresentation`` (``repeats >= 1``, ``max_log_scale > 0``)."""
    if int(repeats) < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not max_log_scale > 0:
        raise ValueError(f"max_log_scale must be > 0, got {max_log_scale}")
    return DFSRepresentation(geometry, int(repeats), bool(use_scales), float(max_log_scale))


def decode(rep: DFSRepresentation, genomes) -> tuple[np.ndarray, np.ndarray | None]:
    """Decodes genomes into paths and junction scales.

    Args:
      rep: the representation.
      genomes: ``[N, num_genes]`` real vectors.

    Returns:
      ``paths`` int32 ``[N, t_max]`` (-1 padding) and ``junction_scales`` float32 ``[N, t_max]`` (1.0 on
      padding), or None when ``rep.use_scales`` is False.
    """
    genomes = np.asarray(genomes, dtype=np.float64)
    if genomes.ndim != 2 or genomes.shape[1] != rep.num_genes:
        raise ValueError(f"genomes must be [N, {rep.num_genes}], got shape {genomes.shape}")
    n, s, t_max = genomes.shape[0], rep.num_slots, rep.geometry.t_max
    include = genomes[:, :s]
    kept = include > 0
    empty = ~kept.any(axis=1)
    kept[empty, np.argmax(include[empty], axis=1)] = True
    # position of each kept slot in the path; slots past t_max are dropped
    position = np.cumsum(kept, axis=1) - 1
    kept &= position < t_max
    rows, slots = np.nonzero(kept)
    cols = position[rows, slots]
    paths = np.full((n, t_max), -1, np.int32)
    paths[rows, cols] = rep.slot_pool_index()[slots]
    if not rep.use_scales:
        return paths, None
    log_scale = np.clip(genomes[:, s:], -rep.max_log_scale, rep.max_log_scale)
    scales = np.ones((n, t_max), np.float32)
    scales[rows, cols] = np.exp(log_scale[rows, slots])
    return paths, scales
