"""The package's layering (issue 21, docs/DESIGN.md "Layers"), read from the source with `ast`.

Every `import` of every hm3_jax module counts, also those inside functions: a library module never imports
`experiments`, `benchmarks` or `tests`; an import goes to the same layer or below (`LAYERS`); modules import no
cycle; no module uses another's private (`_x`) name; no library file is longer than `MAX_LINES`. Each rule is
also run on a small package written to break it, so none of them passes by finding nothing to read.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hm3_jax")
# hm3_jax's subpackages (and top-level modules) by layer, bottom first; imports go down or sideways only.
LAYERS = {
    "models": 0,
    "io": 0,
    "logs": 0,
    "host_blas": 0,
    "merging": 1,
    "moo": 1,
    "paths": 1,
    "arch": 1,
    "tasks": 1,
    "distributed": 1,
    "search": 2,
    "baselines": 2,
    "pipeline": 3,
    "evaluation": 4,  # the lm-eval adapter: serves a finished run's models
    "": 5,  # hm3_jax/__init__.py: the package face
}
MAX_LINES = 400


def modules(root: str) -> dict[str, str]:
    """{dotted module name: file} of every .py file under `root` (a package's __init__ is the package)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, os.path.dirname(root))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def statement_imports(mods, module, path, node) -> list[tuple[int, str, str | None]]:
    """[(line, imported module, imported name or None)], one per alias of the import statement `node`."""
    if isinstance(node, ast.Import):
        return [(node.lineno, a.name, None) for a in node.names]
    if node.level:  # relative: from the module's package (its own, for a package's __init__)
        parts = module.split(".")
        if not path.endswith("__init__.py"):
            parts = parts[:-1]
        parts = parts[: len(parts) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    out = []
    for a in node.names:
        full = f"{base}.{a.name}"
        out.append((node.lineno, full, None) if full in mods else (node.lineno, base, a.name))
    return out


def import_nodes(path: str):
    """Every import statement of a file, also those inside functions."""
    tree = ast.parse(open(path).read(), path)
    return tree, [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def owner(mods, target: str) -> str | None:
    """The module of `mods` a dotted import target lives in (its longest known prefix)."""
    while target and target not in mods:
        target = target.rpartition(".")[0]
    return target or None


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else ""]


def upward_imports(mods) -> list[str]:
    bad = []
    for module, path in mods.items():
        for node in import_nodes(path)[1]:
            for line, target, _ in statement_imports(mods, module, path, node):
                if target.split(".")[0] in ("experiments", "benchmarks", "tests"):
                    bad.append(f"{path}:{line} imports {target} (a binary, benchmark or test)")
                found = owner(mods, target)
                if (
                    found
                    and "." in found
                    and _known(found)
                    and _known(module)
                    and layer(found) > layer(module)
                ):
                    bad.append(f"{path}:{line} imports {found}, a layer above")
    return bad


def _known(module: str) -> bool:
    parts = module.split(".")
    return (parts[1] if len(parts) > 1 else "") in LAYERS


def import_cycles(mods) -> list[str]:
    edges = {m: set() for m in mods}
    for module, path in mods.items():
        for node in import_nodes(path)[1]:
            for _, target, _ in statement_imports(mods, module, path, node):
                found = owner(mods, target)
                # a package's face importing its own children (or a child its package) is not a cycle
                if (
                    found
                    and found != module
                    and not found.startswith(module + ".")
                    and not module.startswith(found + ".")
                ):
                    edges[module].add(found)
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(edges[m]):
            if state.get(n) == "open":
                cycles.append(" -> ".join(stack[stack.index(n) :] + [n]))
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(mods):
        if m not in state:
            visit(m, [m])
    return cycles


def private_uses(mods) -> list[str]:
    bad = []
    for module, path in mods.items():
        tree, nodes = import_nodes(path)
        aliases = {}  # local name -> the module it is bound to
        for node in nodes:
            for alias, (line, target, name) in zip(
                node.names, statement_imports(mods, module, path, node), strict=True
            ):
                found = owner(mods, target)
                if found is None or found == module:
                    continue
                if name and name.startswith("_") and not name.startswith("__"):
                    bad.append(f"{path}:{line} imports private {found}.{name}")
                if name is None and (isinstance(node, ast.ImportFrom) or alias.asname):
                    aliases[alias.asname or alias.name] = target
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                bad.append(f"{path}:{node.lineno} uses private {aliases[node.value.id]}.{node.attr}")
    return bad


MODULES = modules(ROOT)


def test_every_library_package_has_a_layer():
    unknown = sorted({m.split(".")[1] for m in MODULES if "." in m} - set(LAYERS))
    assert not unknown, (
        f"add these hm3_jax packages to LAYERS (tests/test_layout.py) and DESIGN.md: {unknown}"
    )


def test_every_folder_is_a_regular_package():
    """setup.py ships what `setuptools.find_packages` finds, i.e. folders with an __init__.py: a folder of
    modules without one works from a checkout (`pip install -e`) but is missing from `pip install .`."""
    import setuptools

    found = set(setuptools.find_packages(os.path.dirname(ROOT), include=["hm3_jax", "hm3_jax.*"]))
    with_code = {
        os.path.relpath(d, os.path.dirname(ROOT)).replace(os.sep, ".")
        for d, _, files in os.walk(ROOT)
        if any(f.endswith(".py") for f in files)
    }
    assert with_code <= found, f"add an __init__.py to: {sorted(with_code - found)}"


def test_imports_go_down_or_sideways_only():
    assert not upward_imports(MODULES), "\n".join(upward_imports(MODULES))


def test_no_import_cycles():
    assert not import_cycles(MODULES), "import cycles:\n" + "\n".join(import_cycles(MODULES))


def test_no_private_names_across_modules():
    assert not private_uses(MODULES), "\n".join(private_uses(MODULES))


def test_each_rule_finds_what_breaks_it(tmp_path):
    """A package written to break every rule once: each checker names exactly the offending line."""
    pkg = tmp_path / "hm3_jax"
    for d in ("search", "pipeline", "moo"):
        (pkg / d).mkdir(parents=True)
        (pkg / d / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "pipeline" / "run.py").write_text("X = 1\n_hidden = 2\n")
    (pkg / "search" / "level.py").write_text(
        "import os\n\ndef f():\n    from hm3_jax.pipeline import run\n    return run.X\n"
    )
    (pkg / "moo" / "a.py").write_text("from hm3_jax.moo import b\nimport benchmarks.memory\n")
    (pkg / "moo" / "b.py").write_text(
        "from hm3_jax.pipeline.run import _hidden\nfrom hm3_jax.pipeline import run as r\n\ndef g():\n"
        "    from hm3_jax.moo import a\n    return r._hidden\n"
    )
    mods = modules(str(pkg))
    up = upward_imports(mods)
    assert any("search/level.py:4 imports hm3_jax.pipeline.run, a layer above" in u for u in up), up
    assert any("moo/a.py:2 imports benchmarks.memory" in u for u in up), up
    assert any("moo/b.py:1 imports hm3_jax.pipeline.run" in u for u in up), up
    assert import_cycles(mods) == ["hm3_jax.moo.a -> hm3_jax.moo.b -> hm3_jax.moo.a"]
    priv = private_uses(mods)
    assert len(priv) == 2 and "b.py:1 imports private" in priv[0] and "b.py:6 uses private" in priv[1], priv


@pytest.mark.parametrize("module", sorted(MODULES))
def test_files_hold_one_concept(module):
    with open(MODULES[module]) as f:
        n = sum(1 for _ in f)
    assert n <= MAX_LINES, f"{MODULES[module]} has {n} lines (> {MAX_LINES}): split it by concept"
