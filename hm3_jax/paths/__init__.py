"""Path-evaluation engine and junction alignment (see docs/paths.md).

Public entry points: `make_engine` (engine.py, whose docstring walks through `evaluate`) building a
`PathEngine` (path_engine.py); `build_prefix_tree` (prefix_tree.py); `make_aligner` / `native_stats` /
`moment_junctions` / `fit_learned` (alignment.py); FLOP formulas (flops.py). One concept per file: cache keys
and costs (cache.py), what the objectives' device functions read (recording.py), plain evaluation with a
batching strategy (plain.py), prefix-tree evaluation (tree_eval.py), the mesh (sharded.py), host scores and
cost accounting (accounting.py).
"""

from hm3_jax.paths.cache import Cost, EvalResult, canonicalize, tree_fingerprint
from hm3_jax.paths.engine import STRATEGIES, PathEngine, make_engine
from hm3_jax.paths.prefix_tree import PrefixTree, build_prefix_tree

__all__ = [
    "STRATEGIES",
    "Cost",
    "EvalResult",
    "PathEngine",
    "PrefixTree",
    "build_prefix_tree",
    "canonicalize",
    "make_engine",
    "tree_fingerprint",
]
