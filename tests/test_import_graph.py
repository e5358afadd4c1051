"""The module-level import graph of ``src/d3s2``: no circles, and no floor imports a higher one (issue 23).

Every ``.py`` under ``src/d3s2`` is parsed (nothing is imported). An edge ``a -> b`` is a ``d3s2.*`` import that runs
when ``a`` is imported: ``import`` / ``from ... import`` statements at module level, also inside ``if`` / ``try`` /
``with`` blocks and class bodies, relative imports resolved. Not edges: imports inside functions (deferred: they run
when the function is called, after every module involved is fully imported), imports under ``if TYPE_CHECKING:``
(never run), and the implicit import of a target's parent packages (Python initialises a package before its
submodules; a circle through a package's ``__init__`` shows as an explicit ``from d3s2.pkg import name`` edge).
``from d3s2 import Name`` of a name that ``d3s2/__init__.py`` loads lazily (its ``_LAZY`` table) is an edge to the
module that defines it, since that is what the import runs.

The deferred imports (inside functions and methods, at any depth; not under ``if TYPE_CHECKING:``) form a second
graph, walked the same way: they cannot make an import circle fail, but one that goes up a floor still makes the lower
floor depend on the higher one, so they obey the floors too (``ALLOWED_UPWARD`` lists the exceptions, each with its
reason). Not seen by either walk: names resolved at run time from strings (``importlib.import_module``, e.g.
``d3s2.config.MODEL_REGISTRY``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "d3s2"

# Floors, low to high. A module may import (at module level) modules of its own floor or of lower floors only.
# Entries are package prefixes ("d3s2.sparse" covers d3s2.sparse and every module under it), except the root package
# "d3s2" itself, which matches only d3s2/__init__.py (version string and the lazy public names, no imports).
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("d3s2", "d3s2.errors", "d3s2.config", "d3s2.fileio", "d3s2.hub_settings", "d3s2.triton_support")),
    ("sparse", ("d3s2.sparse",)),
    ("ops", ("d3s2.ops",)),
    ("nn", ("d3s2.nn",)),
    ("models", ("d3s2.models",)),
    ("flow", ("d3s2.flow",)),
    ("geometry", ("d3s2.geometry",)),
    ("data", ("d3s2.data",)),
    ("pipelines", ("d3s2.pipelines",)),
    ("train", ("d3s2.train",)),
    ("serve", ("d3s2.serve",)),
    # the commands: `d3s2` (cli, __main__) and `d3s2 selfcheck`, which only the CLI reaches
    ("cli", ("d3s2.cli", "d3s2.__main__", "d3s2.selfcheck")),
]


def find_modules(src: Path = SRC, package: str = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is_package) for every .py under ``src/package``."""
    modules = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        modules[".".join(parts)] = (path, is_package)
    return modules


# Deferred imports that go up a floor and stay, each with its reason: (importer, imported) -> why.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {
    ("d3s2.config", "d3s2.flow.rectified"): (
        "the model file format read by d3s2.config.load_model_config has `flow:` and `sampler:` sections typed by the "
        "flow floor's FlowConfig / SamplerConfig; moving the reader up a floor would move load_model_config out of "
        "d3s2.config for its users in pipelines, train, tests and bench (a change of its own, not done here)"
    ),
    ("d3s2.config", "d3s2.flow.sampler"): "as d3s2.config -> d3s2.flow.rectified (the `sampler:` section)",
}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def module_level_imports(body: list[ast.stmt]):
    """The import statements that run when the module is imported (function bodies and TYPE_CHECKING skipped)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from module_level_imports(node.body)
            yield from module_level_imports(node.orelse)
        elif isinstance(node, ast.ClassDef):
            yield from module_level_imports(node.body)
        elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
            yield from module_level_imports(node.body)
            for handler in node.handlers:
                yield from module_level_imports(handler.body)
            yield from module_level_imports(node.orelse)
            yield from module_level_imports(node.finalbody)
        elif isinstance(node, (ast.With, ast.AsyncWith, ast.For, ast.AsyncFor, ast.While)):
            yield from module_level_imports(node.body)
            yield from module_level_imports(getattr(node, "orelse", []))


def deferred_imports(body: list[ast.stmt], in_function: bool = False):
    """The import statements inside function and method bodies, at any depth (``if TYPE_CHECKING:`` skipped)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if in_function:
                yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from deferred_imports(node.body, True)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from deferred_imports(node.orelse, in_function)
        else:  # class bodies, if / try / with / for / while / match blocks: the statements they hold
            for name in ("body", "orelse", "finalbody"):
                yield from deferred_imports(getattr(node, name, []), in_function)
            for handler in getattr(node, "handlers", []):
                yield from deferred_imports(handler.body, in_function)
            for case in getattr(node, "cases", []):
                yield from deferred_imports(case.body, in_function)


def _lazy_names(modules: dict[str, tuple[Path, bool]], package: str) -> dict[str, str]:
    """The root package's ``_LAZY = {name: module}`` table (empty when there is none)."""
    if package not in modules:
        return {}
    tree = ast.parse(modules[package][0].read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets):
            return dict(ast.literal_eval(node.value))
    return {}


def import_graph(src: Path = SRC, package: str = PACKAGE, imports=module_level_imports) -> dict[str, set[str]]:
    """Module -> the package's modules it imports at module level (``imports=deferred_imports``: inside functions)."""
    modules = find_modules(src, package)
    lazy = _lazy_names(modules, package)

    def owner(name: str) -> str | None:  # the longest existing module that ``name`` starts with
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        targets: set[str | None] = set()
        for node in imports(tree.body):
            if isinstance(node, ast.Import):
                targets.update(owner(a.name) for a in node.names if a.name.split(".")[0] == package)
                continue
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != package:
                continue
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:  # a submodule
                    targets.add(f"{source}.{alias.name}")
                elif source == package and alias.name in lazy:
                    targets.add(owner(lazy[alias.name]))
                else:
                    targets.add(owner(source))
        targets.discard(None)
        targets.discard(name)
        graph[name] = targets  # type: ignore[assignment]
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (a -> ... -> a, listed with its first module repeated at the end) per strongly connected component
    of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return [_circle_in(graph, set(c), c[0]) for c in components]


def _circle_in(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """A shortest path start -> ... -> start inside one strongly connected component (breadth first)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child not in component:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child not in parent:
                    parent[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"{start} is in a component without a circle back to it")


def floor_of(module: str) -> int:
    best, best_len = None, -1
    for level, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            exact_only = prefix == PACKAGE
            if module == prefix or (not exact_only and module.startswith(prefix + ".")):
                if len(prefix) > best_len:
                    best, best_len = level, len(prefix)
    if best is None:
        raise KeyError(module)
    return best


# ---------------------------------------------------------------------------------------------------------------------
# the walker itself, on a made-up package


def _write_package(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return tmp_path


def test_walker_resolves_relative_imports_and_skips_deferred_ones(tmp_path):
    src = _write_package(tmp_path, {
        "__init__.py": "_LAZY = {'Thing': 'pkg.sub.b'}\n",
        "sub/__init__.py": "from . import a\nfrom .b import B\n",
        "sub/a.py": (
            "from __future__ import annotations\nfrom typing import TYPE_CHECKING\nimport os\n"
            "from ..top import T\n"
            "if TYPE_CHECKING:\n    from pkg.late import L\n"
            "try:\n    import pkg.sub.b as bee\nexcept ImportError:\n    bee = None\n"
            "class K:\n    from pkg import other\n"
            "def f():\n    from pkg.late import L\n    return L\n"
        ),
        "sub/b.py": "from pkg import Thing\n",
        "top.py": "", "late.py": "", "other.py": "",
    })
    graph = import_graph(src, "pkg")
    assert graph["pkg.sub"] == {"pkg.sub.a", "pkg.sub.b"}
    assert graph["pkg.sub.a"] == {"pkg.top", "pkg.sub.b", "pkg.other"}  # not pkg.late: TYPE_CHECKING, function
    assert graph["pkg.sub.b"] == set()  # the lazy name resolves to pkg.sub.b itself
    assert graph["pkg"] == set()


def test_deferred_walk_finds_imports_in_functions_only(tmp_path):
    src = _write_package(tmp_path, {
        "__init__.py": "",
        "a.py": (
            "from typing import TYPE_CHECKING\nimport pkg.top\n"
            "if TYPE_CHECKING:\n    from pkg import hidden\n"
            "def f():\n    from . import late\n    if TYPE_CHECKING:\n        from pkg import hidden\n"
            "    def g():\n        import pkg.nested\n"
            "    try:\n        from pkg.tried import X\n    except ImportError:\n        pass\n"
            "class K:\n    def m(self):\n        from pkg.method import M\n"
        ),
        "top.py": "", "late.py": "", "hidden.py": "", "nested.py": "", "tried.py": "", "method.py": "",
    })
    assert import_graph(src, "pkg")["pkg.a"] == {"pkg.top"}
    assert import_graph(src, "pkg", deferred_imports)["pkg.a"] == {"pkg.late", "pkg.nested", "pkg.tried", "pkg.method"}


def test_cycles_are_found_and_named():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


# ---------------------------------------------------------------------------------------------------------------------
# the real package


@pytest.fixture(scope="module")
def graph():
    g = import_graph()
    # the walk saw the package (a few edges that are known to be module-level)
    assert "d3s2.sparse" in g["d3s2.models.ss_vae"] and "d3s2.ops.ssa" in g["d3s2.nn.ssa"], "import walk is broken"
    return g


def test_no_module_level_import_cycle(graph):
    cycles = find_cycles(graph)
    assert not cycles, "module-level import circles in src/d3s2:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_every_module_has_a_floor(graph):
    unplaced = []
    for module in sorted(graph):
        try:
            floor_of(module)
        except KeyError:
            unplaced.append(module)
    assert not unplaced, f"place these modules on a floor in tests/test_import_graph.py FLOORS: {unplaced}"


def test_lower_floors_never_import_higher_ones(graph):
    names = [name for name, _ in FLOORS]
    upward = [
        f"{module} ({names[floor_of(module)]}) imports {target} ({names[floor_of(target)]})"
        for module in sorted(graph)
        for target in sorted(graph[module])
        if floor_of(target) > floor_of(module)
    ]
    assert not upward, "module-level imports that go up a floor:\n" + "\n".join(upward)


@pytest.fixture(scope="module")
def deferred_graph():
    g = import_graph(imports=deferred_imports)
    # the walk saw the package (a deferred import that is known to stay: trimesh-free import of the data pipeline)
    assert "d3s2.data.sdf" in g["d3s2.data.prepare_item"], "deferred import walk is broken"
    return g


def test_no_import_cycle_counting_deferred_imports(graph, deferred_graph):
    """Deferring an import hides a circle from Python, not from the design: none either way."""
    both = {m: graph[m] | deferred_graph.get(m, set()) for m in graph}
    cycles = find_cycles(both)
    assert not cycles, "import circles in src/d3s2 (module-level and deferred imports):\n" + "\n".join(
        " -> ".join(c) for c in cycles
    )


def test_deferred_imports_never_go_up_a_floor(deferred_graph):
    names = [name for name, _ in FLOORS]
    edges = {(m, t) for m in deferred_graph for t in deferred_graph[m] if floor_of(t) > floor_of(m)}
    upward = [
        f"{m} ({names[floor_of(m)]}) imports {t} ({names[floor_of(t)]}) inside a function"
        for m, t in sorted(edges - set(ALLOWED_UPWARD))
    ]
    assert not upward, "deferred imports that go up a floor:\n" + "\n".join(upward)
    stale = sorted(set(ALLOWED_UPWARD) - edges)
    assert not stale, f"ALLOWED_UPWARD lists imports that no longer go up a floor (drop them): {stale}"
