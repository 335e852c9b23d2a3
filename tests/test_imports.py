"""The import graph of hf_paged has no cycle (every `import` statement counts, lazy ones too).

Modules are read with `ast`, never imported. An edge A -> B means A's source imports B (or a name
from B). Edges to a package a module sits in are left out: Python imports those first anyway,
and `from . import sibling` imports the sibling, not the package's contents.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "hf_paged"


def module_files(package: pathlib.Path) -> dict[str, tuple[pathlib.Path, bool]]:
    """Dotted module name -> (file, is a package __init__)."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def import_graph(package: pathlib.Path = PACKAGE) -> dict[str, set[str]]:
    modules = module_files(package)
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        here = name.split(".") if is_package else name.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                submodules = {f"{module}.{alias.name}" for alias in node.names} & modules.keys()
                targets |= submodules
                if len(submodules) < len(node.names):  # some names come from `module` itself
                    targets.add(module)
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
        graph[name] = {t for t in targets & modules.keys() if t != name and not name.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_hf_paged_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 20 and "hf_paged.attention.ops" in graph  # the whole package was read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_prefix_is_a_leaf_of_the_attention_package():
    """attention/prefix.py, shared by both executors' cascades, imports no executor."""
    imported = {t for t in import_graph()["hf_paged.attention.prefix"] if t.startswith("hf_paged.attention.")}
    assert imported <= {"hf_paged.attention.params", "hf_paged.attention.metadata"}


# The layers, highest first: a module imports only from its own layer or the ones below it. The
# root modules (_compat, config, errors, model_state) are the bottom; hf_paged/__init__.py,
# the public API, imports from any layer.
LAYERS = ["evaluation", "integration", "cache", "attention", "distributed", "memory"]


def layer_rank(module: str) -> int:
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in LAYERS:
        return len(LAYERS) - LAYERS.index(parts[1])
    return 0  # a root module


def test_no_layer_imports_a_higher_one():
    graph = import_graph()
    upward = sorted(
        f"{source} -> {target}"
        for source, targets in graph.items()
        if source != "hf_paged"
        for target in targets
        if layer_rank(target) > layer_rank(source)
    )
    assert upward == []


def test_every_layer_folder_says_what_it_may_import():
    for layer in LAYERS[1:]:
        doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text())) or ""
        assert "May import" in doc, layer


@pytest.mark.parametrize(
    "files, cycle",
    [
        ({"a.py": "from . import b", "b.py": "from .a import x"}, ["pkg.a", "pkg.b", "pkg.a"]),
        ({"a.py": "def f():\n    from .sub import c", "sub/__init__.py": "", "sub/c.py": "from ..a import f"},
         ["pkg.a", "pkg.sub.c", "pkg.a"]),  # a lazy import inside a function counts
        ({"a.py": "from . import b", "b.py": "import os", "sub/__init__.py": "from .c import y",
          "sub/c.py": "from .. import a"}, None),  # a submodule importing its package's sibling: no cycle
    ],
)
def test_the_check_finds_cycles(tmp_path, files, cycle):
    for name, source in {"__init__.py": "", **files}.items():
        (tmp_path / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / name).write_text(source)
    assert find_cycle(import_graph(tmp_path / "pkg")) == cycle
