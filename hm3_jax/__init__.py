"""hm3_jax: Hierarchical Multi-objective Model Merging (HM3, NeurIPS 2025) in JAX."""

__version__ = "0.1.0"
from hm3_jax.io.checkpoint import Model, load_pretrained, save_pretrained  # noqa: E402, F401
