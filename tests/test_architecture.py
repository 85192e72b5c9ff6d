"""The package's architecture, checked statically from the source (AST; nothing is imported).

What counts as an import: every `import x` and `from x import y` statement, at module level or
inside a function or class, except those under `if TYPE_CHECKING:` (annotations only, never
executed). `from package import name` counts as importing the submodule `package.name` when
that file exists, else the package. `engine/__init__.py`'s lazy `_PUBLIC` table and the
registry's discovery of method modules (`importlib` with computed names) are not imports.

Floors (lowest first). A module may import its own floor and the floors below, never above:

0. `engine.errors`: the error types, imported by everything.
1. `engine.core`: what several concepts share: the result and gallery types, kNN primitives,
   storage, device, threads, jobs, logs.
2. The two leaf concepts, each built on the core alone: `engine.features` (images to vectors:
   backbones, image loading) and `engine.rerank` (vectors to re-ranked lists: the methods and
   their registry). A method sees a gallery only as a `core.types.GalleryContext`, so it never
   needs the search package.
3. The concepts that combine them: `engine.search` (a gallery embeds its images with the
   features' backbone), `engine.asymmetric` (SSP's query model wraps the features' extractor
   and trains its anchors with the search index), `engine.evaluation` (scores and parameter
   sweeps over the registry's methods), `engine.views` (plot data) and `engine.distributed`
   (a folder embedded on a Ray cluster into shards, merged into a features file). They may use one
   another sideways; the no-cycle test keeps those uses one-directional.
4. `engine.explorer`: ties the concepts together for the page.
5. `engine.bench`: command-line benchmarks over the same pieces (nothing in the engine runs
   a benchmark).
6. `engine` itself (`engine/__init__.py`), the public face. Only the page and the launcher
   import it; inside the engine, importing `engine.errors` or a submodule is not importing the
   face (its lazy table imports nothing).

Outside the engine: `app/` and `launch.py` use only `engine` and `engine.errors`; no engine
module imports gradio or `app`; only `engine/rerank/` (and tests) import a method's module or
its private `_*.py` helpers — everyone else goes through the registry.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ENGINE = REPO_ROOT / "engine"

FLOORS: dict[str, int] = {
    "engine.errors": 0,
    "engine.core": 1,
    "engine.features": 2,
    "engine.rerank": 2,
    "engine.search": 3,
    "engine.asymmetric": 3,
    "engine.evaluation": 3,
    "engine.views": 3,
    "engine.distributed": 3,
    "engine.explorer": 4,
    "engine.bench": 5,
    "engine": 6,
}
APP_MAY_IMPORT = {"engine", "engine.errors"}


@dataclass(frozen=True)
class Import:
    """One import statement's target, resolved to a module name."""

    source: str          # the importing module, e.g. "engine.rerank.gnn"
    target: str          # e.g. "engine.core.knn"
    path: Path
    line: int

    def __str__(self) -> str:
        where = self.path.relative_to(REPO_ROOT) if self.path.is_relative_to(REPO_ROOT) \
            else self.path
        return f"{where}:{self.line} imports {self.target}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _exists(module: str) -> bool:
    relative = Path(*module.split("."))
    return ((REPO_ROOT / relative).with_suffix(".py").is_file()
            or (REPO_ROOT / relative / "__init__.py").is_file())


def _statements(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    """Every import statement of a tree, skipping `if TYPE_CHECKING:` bodies (not their else)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imports_of(path: Path, source: str | None = None) -> list[Import]:
    """The imports of one file; `source` names its module (default: from its path)."""
    source = source or module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = source if is_package(path) else source.rpartition(".")[0]
    found = []
    for statement in _statements(tree):
        if isinstance(statement, ast.Import):
            targets = [alias.name for alias in statement.names]
        else:
            if statement.level:
                base_parts = package.split(".")
                base_parts = base_parts[:len(base_parts) - statement.level + 1]
                base = ".".join(base_parts + ([statement.module] if statement.module else []))
            else:
                base = statement.module or ""
            targets = []
            for alias in statement.names:
                candidate = f"{base}.{alias.name}"
                targets.append(candidate if alias.name != "*" and _exists(candidate) else base)
        found.extend(Import(source, target, path, statement.lineno) for target in targets)
    return sorted(found, key=lambda f: f.line)


def python_files(*roots: Path) -> list[Path]:
    files: list[Path] = []
    for root in roots:
        files.extend([root] if root.is_file() else sorted(root.rglob("*.py")))
    return [path for path in files if "__pycache__" not in path.parts]


def engine_imports() -> list[Import]:
    return [found for path in python_files(ENGINE) for found in imports_of(path)]


def floor_of(module: str) -> int | None:
    """The floor of an engine module: its longest prefix in FLOORS (None outside the engine)."""
    parts = module.split(".")
    for size in range(len(parts), 0, -1):
        prefix = ".".join(parts[:size])
        if prefix in FLOORS:
            return FLOORS[prefix]
    return None


def is_engine(module: str) -> bool:
    return module == "engine" or module.startswith("engine.")


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself
    (Tarjan's algorithm, iterative), each sorted; [] when the graph is acyclic."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = 0
    nodes = set(graph) | {target for targets in graph.values() for target in targets}
    for start in sorted(nodes):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    cycles.append(sorted(component))
    return cycles


def registers_a_method(path: Path) -> bool:
    """True when the file defines a class decorated with the registry's `@register`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return any(isinstance(node, ast.ClassDef)
               and any((isinstance(d, ast.Name) and d.id == "register")
                       or (isinstance(d, ast.Attribute) and d.attr == "register")
                       for d in node.decorator_list)
               for node in ast.walk(tree))


def method_modules() -> set[str]:
    """The registered methods' modules and the private `_*.py` helpers of engine/rerank/."""
    files = python_files(ENGINE / "rerank")
    return {module_name(path) for path in files
            if path.name != "__init__.py" and (path.name.startswith("_")
                                               or registers_a_method(path))}


# -- tests ---------------------------------------------------------------------------------------
def test_the_scan_sees_the_engine():
    files = python_files(ENGINE)
    found = engine_imports()
    assert len(files) > 40, [str(path) for path in files]
    assert len([f for f in found if is_engine(f.target)]) > 100
    modules = {module_name(path) for path in files}
    assert {"engine", "engine.errors", "engine.core.types", "engine.rerank.base",
            "engine.explorer"} <= modules
    # every engine module sits on a floor
    assert not [module for module in modules if floor_of(module) is None]


def test_engine_imports_neither_gradio_nor_app():
    found = engine_imports()
    assert len(found) > 200
    offending = sorted({str(f) for f in found
                        if f.target.split(".")[0] in ("gradio", "gradio_client", "app")})
    assert not offending, "\n".join(offending)


def test_only_rerank_imports_method_modules():
    """Outside engine/rerank/ (and tests), methods are reached through the registry."""
    methods = method_modules()
    assert {"engine.rerank.k_reciprocal", "engine.rerank.gnn", "engine.rerank.icfrr",
            "engine.rerank.sgrr", "engine.rerank.ssr", "engine.rerank._gnn"} <= methods
    assert "engine.rerank.base" not in methods
    scanned = [f for path in python_files(ENGINE, REPO_ROOT / "app", REPO_ROOT / "launch.py",
                                          REPO_ROOT / "scripts")
               for f in imports_of(path)
               if not f.source.startswith("engine.rerank")]
    assert len(scanned) > 200
    offending = sorted({str(f) for f in scanned if f.target in methods})
    assert not offending, "\n".join(offending)


def test_no_import_cycles_in_the_engine():
    graph: dict[str, set[str]] = {}
    edges = 0
    for found in engine_imports():
        if is_engine(found.target):
            graph.setdefault(found.source, set()).add(found.target)
            edges += 1
    assert len(graph) > 40 and edges > 100
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_detector_finds_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"x": {"x"}}) == [["x"]]
    two = find_cycles({"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"c"}})
    assert sorted(two) == [["a", "b"], ["c", "d"]]


def test_the_scanner_reads_every_kind_of_import(tmp_path):
    """Function-level and relative imports count; `if TYPE_CHECKING:` bodies do not."""
    path = tmp_path / "gnn.py"
    path.write_text(
        "from typing import TYPE_CHECKING\n"
        "import numpy as np\n"
        "from engine.core import knn\n"
        "from . import base\n"
        "from ._gnn import sparse_rows\n"
        "if TYPE_CHECKING:\n"
        "    from engine.explorer import Explorer\n"
        "else:\n"
        "    from engine.errors import InvalidInputError\n"
        "def late():\n"
        "    import gradio\n", encoding="utf-8")
    targets = [f.target for f in imports_of(path, "engine.rerank.gnn")]
    assert targets == ["typing", "numpy", "engine.core.knn", "engine.rerank.base",
                       "engine.rerank._gnn", "engine.errors", "gradio"]
    assert floor_of("engine.rerank._gnn") == 2 and floor_of("engine.explorer.session") == 4
    assert floor_of("engine") == 6 and floor_of("numpy") is None


def test_nothing_imports_upward():
    checked = 0
    offending = set()
    for found in engine_imports():
        if not is_engine(found.target):
            continue
        source_floor, target_floor = floor_of(found.source), floor_of(found.target)
        assert source_floor is not None and target_floor is not None, str(found)
        checked += 1
        if target_floor > source_floor:
            offending.add(f"{found} (floor {source_floor} -> {target_floor})")
    assert checked > 100
    assert not offending, "\n".join(sorted(offending))


def test_app_and_launcher_use_only_the_public_face():
    scanned = [f for path in python_files(REPO_ROOT / "app", REPO_ROOT / "launch.py")
               for f in imports_of(path)]
    assert len(scanned) > 20
    offending = sorted({str(f) for f in scanned
                        if is_engine(f.target) and f.target not in APP_MAY_IMPORT})
    assert not offending, "\n".join(offending)
