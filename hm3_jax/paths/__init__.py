"""Path-evaluation engine (batching strategy, cache, prefix tree, cost accounting) and junction alignment.

See docs/paths.md. Public entry points: `make_engine` (engine.py), `build_prefix_tree` (prefix_tree.py),
`make_aligner` / `native_stats` / `moment_junctions` / `fit_learned` (alignment.py), FLOP formulas (flops.py).
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
