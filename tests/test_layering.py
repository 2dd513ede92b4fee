"""Layering: the import graph of hiermem/ and analysis/ keeps its directions and has no cycles.

Catches: the model importing the data package, analysis importing the training code, the data
package importing the model, an import cycle between modules, and an underscore name imported
from another module. Read statically (ast), so lazy imports inside functions count for the
direction rules; cycles are checked on module-level imports (what runs at import time).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hiermem", "analysis")

# (importer prefix, forbidden imported prefix, why)
RULES = [
    ("hiermem.model", "hiermem.data", "the model never imports the data package"),
    ("hiermem.memory", "hiermem.data", "the memory never imports the data package"),
    ("hiermem.data", "hiermem.model", "data never imports the model"),
    ("hiermem.data", "hiermem.train", "data never imports training"),
    ("hiermem.data", "hiermem.evaluate", "data never imports evaluation"),
    ("analysis", "hiermem.train", "analysis never imports training"),
    ("analysis", "hiermem.stepper", "analysis never imports training"),
    ("analysis", "hiermem.optim", "analysis never imports training"),
    ("analysis", "hiermem.sweep", "analysis never imports the sweep driver"),
    ("analysis", "hiermem.model", "analysis never imports the model (numpy/pandas only)"),
    ("analysis", "hiermem.evaluate", "analysis never imports evaluation"),
    ("hiermem.rundir", "hiermem.train", "the run directory is below training"),
]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking_blocks(tree: ast.Module) -> set[int]:
    """ids of the nodes under a module-level `if TYPE_CHECKING:` (those imports never run)."""
    return {id(n) for node in tree.body if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}


def imports_of(path: Path, name: str) -> list[tuple[str, list[str], bool]]:
    """(imported module, names imported from it, at module level) for every import that runs."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level, skipped = {id(node) for node in tree.body}, _type_checking_blocks(tree)
    out = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        at_top = id(node) in top_level
        if isinstance(node, ast.Import):
            out += [(alias.name, [], at_top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((target, [a.name for a in node.names], at_top))
    return out


def import_graph(root: Path, packages=PACKAGES) -> dict[str, list[tuple[str, list[str], bool]]]:
    return {module_name(path, root): imports_of(path, module_name(path, root))
            for package in packages for path in sorted((root / package).rglob("*.py"))}


def resolve(target: str, modules: set[str]) -> str | None:
    """The project module an import names (a `from pkg import module` resolves to pkg.module)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def violations(graph) -> list[str]:
    modules = set(graph)
    out = []
    for importer, imports in graph.items():
        for target, names, _ in imports:
            candidates = [target] + [f"{target}.{n}" for n in names]
            for cand in candidates:
                mod = resolve(cand, modules)
                if mod is None:
                    continue
                for src, forbidden, why in RULES:
                    if (importer == src or importer.startswith(src + ".")) and \
                            (mod == forbidden or mod.startswith(forbidden + ".")):
                        out.append(f"{importer} imports {mod}: {why}")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and resolve(target, modules) and resolve(target, modules) != importer:
                out.append(f"{importer} imports underscore names {private} from {target}")
    return sorted(set(out))


def cycles(graph) -> list[list[str]]:
    """Strongly connected components (> 1 module) of the module-level import graph (Tarjan)."""
    modules = set(graph)
    edges = {m: set() for m in modules}
    for importer, imports in graph.items():
        for target, names, at_top in imports:
            if not at_top:
                continue
            for cand in [target] + [f"{target}.{n}" for n in names]:
                mod = resolve(cand, modules)
                # a package's __init__ importing its own submodules is not a back-edge
                if mod and mod != importer and not mod.startswith(importer + "."):
                    edges[importer].add(mod)
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in sorted(modules):
        if m not in index:
            visit(m)
    return out


def test_project_import_directions_hold():
    assert violations(import_graph(ROOT)) == []


def test_project_has_no_import_cycles():
    assert cycles(import_graph(ROOT)) == []


def test_every_module_imports(monkeypatch):
    """Each module imports on its own (a cycle or a missing name fails here, not in a user's notebook)."""
    import importlib
    for name in sorted(import_graph(ROOT)):
        if name.endswith("__main__"):
            continue
        importlib.import_module(name)


@pytest.fixture
def fake_project(tmp_path):
    def make(files: dict[str, str]) -> Path:
        for rel, text in files.items():
            path = tmp_path / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        return tmp_path
    return make


def test_checker_catches_a_back_edge_a_cycle_and_a_private_import(fake_project):
    """The checks are not vacuous: a planted back-edge, a cycle and an underscore import are found."""
    root = fake_project({
        "hiermem/__init__.py": "",
        "hiermem/model.py": "from hiermem.data.packing import document_attention_mask\n",
        "hiermem/data/__init__.py": "",
        "hiermem/data/packing.py": "def document_attention_mask(): ...\n",
        "hiermem/a.py": "from hiermem import b\n",
        "hiermem/b.py": "from hiermem.a import _secret\n",
        "analysis/__init__.py": "",
        "analysis/fit.py": "def f():\n    from hiermem.train import train\n",
        "hiermem/train.py": "",
    })
    graph = import_graph(root)
    found = violations(graph)
    assert "hiermem.model imports hiermem.data.packing: the model never imports the data package" in found
    assert "analysis.fit imports hiermem.train: analysis never imports training" in found
    assert any("underscore names ['_secret']" in v for v in found)
    assert cycles(graph) == [["hiermem.a", "hiermem.b"]]


def test_type_checking_and_lazy_imports_are_not_cycles(fake_project):
    root = fake_project({
        "hiermem/__init__.py": "",
        "hiermem/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from hiermem.b import B\n",
        "hiermem/b.py": "from hiermem import a\n",
        "hiermem/c.py": "def f():\n    from hiermem import d\n",
        "hiermem/d.py": "from hiermem import c\n",
    })
    assert cycles(import_graph(root)) == []
