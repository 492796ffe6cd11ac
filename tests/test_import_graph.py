"""The import graph of evalpipe/ and runtime/ has no circles, runtime/ never imports evalpipe, and the runtime's
serving core never imports its offline tools (runtime/tools, runtime/testing).

The graph is read from the source with `ast`, not by importing. Every import counts wherever it is written:
at module level, inside a function (a lazy import still runs, and still ties the two modules together), under
`if TYPE_CHECKING:` (the annotation still names the other module's types), and `importlib.import_module` with a
literal name. `from pkg import name` is an edge to the module `pkg.name` when that module exists, else to
`pkg`; a package's `__init__.py` is the module `pkg`. Importing a submodule is not counted as an edge to its
parent package (Python runs the parent's `__init__` first, but that is how packages work, not a design circle).
Imports of anything outside the two packages are ignored.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("evalpipe", "runtime")


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Module name -> source file for every .py file of the packages."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _imported_names(tree: ast.AST, module: str, is_package: bool, modules: dict[str, Path]):
    """(name, line) of everything `tree` imports; `from pkg import x` gives pkg.x when that is a module."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                yield (submodule if submodule in modules else base), node.lineno
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield node.args[0].value, node.lineno


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, dict[str, int]]:
    """module -> {imported module of the packages: first line importing it}."""
    modules = module_files(root, packages)
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges: dict[str, int] = {}
        tree = ast.parse(path.read_text(), filename=str(path))
        for name, line in _imported_names(tree, module, path.name == "__init__.py", modules):
            while name and name not in modules:  # `import a.b.f` where f is not a module: the edge is to a.b
                name = name.rpartition(".")[0]
            if name and name != module:
                edges.setdefault(name, line)
        graph[module] = edges
    return graph


def import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (first module repeated at the end) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(start: str) -> None:  # Tarjan's algorithm, iterative so deep graphs cannot hit the recursion limit
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, set(component), component[0]) for component in components]


def _cycle_in(graph: dict[str, dict[str, int]], component: set[str], start: str) -> list[str]:
    """A shortest path from start back to start inside one strongly connected component (breadth first)."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(graph[node]):
                if succ not in component:
                    continue
                if succ == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if succ not in parents:
                    parents[succ] = node
                    following.append(succ)
        frontier = following
    raise AssertionError(f"{start} is in a strongly connected component but on no cycle")


def _describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    return import_graph(ROOT)


def test_no_import_circles(graph):
    cycles = import_cycles(graph)
    assert not cycles, "import circles:\n" + "\n".join(_describe(graph, c) for c in cycles)


def test_runtime_never_imports_evalpipe(graph):
    offending = [f"{module} line {line} imports {target}"
                 for module, edges in sorted(graph.items()) if module.split(".")[0] == "runtime"
                 for target, line in sorted(edges.items()) if target.split(".")[0] == "evalpipe"]
    assert not offending, "runtime/ must not import evalpipe:\n" + "\n".join(offending)


def test_runtime_serving_core_never_imports_its_tools(graph):
    """runtime/tools (offline: quantizer, demo model, ...) and runtime/testing use the core, never the reverse."""
    outside_core = ("runtime.tools", "runtime.testing")
    offending = [f"{module} line {line} imports {target}"
                 for module, edges in sorted(graph.items())
                 if module.split(".")[0] == "runtime" and not module.startswith(outside_core)
                 for target, line in sorted(edges.items()) if target.startswith(outside_core)]
    assert not offending, "the serving core imports an offline tool:\n" + "\n".join(offending)


def test_the_walk_finds_every_kind_of_import(tmp_path):
    """The checks above can fail: a small tree with a circle through each kind of import the walk reads."""
    files = {
        "a/__init__.py": "",
        "a/one.py": "from a import two\n",                      # `from pkg import submodule`: edge to a.two
        "a/two.py": "def f():\n    from .three import g\n",     # relative import inside a function
        "a/three.py": "import importlib\nimportlib.import_module('a.one')\ndef g(): ...\n",
        "a/four.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a.five\nimport os\n",
        "a/five.py": "from a.four import x\nimport b.util\n",   # `from module import name`: edge to a.four
        "b/__init__.py": "from b.util import helper\n",
        "b/util.py": "def helper(): ...\n",                     # no edge back to b: no circle
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    tiny = import_graph(tmp_path, ("a", "b"))
    assert tiny["a.one"] == {"a.two": 1} and tiny["a.two"] == {"a.three": 2} and tiny["a.three"] == {"a.one": 2}
    assert tiny["a.four"] == {"a.five": 3} and tiny["a.five"] == {"a.four": 1, "b.util": 2}
    assert tiny["b"] == {"b.util": 1} and tiny["b.util"] == {}
    assert import_cycles(tiny) == [["a.five", "a.four", "a.five"], ["a.one", "a.two", "a.three", "a.one"]]
