"""The package's import graph: no cycles, and the layers depend on each other one way only.

Layers, top to bottom: the CLI (``cli.py``, ``commands/``), recipes, components, then config
and the plugin host (``registry.py``, ``plugin_host.py``, ``hookspecs.py``). An import cycle, even
one through an import inside a function, means two modules cannot be read, tested or replaced
apart; an upward import drags a layer's dependencies (launcher code, the CLI) into one that
must not need them.

The graph is read from the source with ``ast``, not by importing anything:

* every module of the installed package: each directory of ``package-dir`` in pyproject.toml
  (``recipes/`` installs as ``automodel_cli.recipes``, ``plugins/`` as ``automodel_cli.plugins``),
  counting only directories that are packages (the asset generator scripts are not modules);
* imports at any level: module top, inside functions and methods, in ``try`` blocks; all except
  those under ``if TYPE_CHECKING:``, which never run;
* relative imports are resolved; ``from pkg import name`` is an edge to ``pkg.name`` when that is
  a module, else to ``pkg``, except that a name a package re-exports lazily (its ``_EXPORTS``
  table, PEP 562) is an edge to the module that defines it;
* importing ``a.b.c`` is an edge to ``a.b.c`` only: the parent packages it also runs are not
  counted (every package would otherwise form a cycle with each of its modules);
* ``importlib.import_module`` with a computed name (the registry's entry points) is not an edge.

The layer rules are checked on everything a module reaches, not only its own imports, and a
failure prints the chain of imports (``module:line``) to cut.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "automodel_cli"


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int

    def __str__(self) -> str:
        return f"{self.source}:{self.line} -> {self.target}"


def package_dirs() -> dict[str, Path]:
    """``package-dir`` of pyproject.toml: package name -> its directory in the checkout."""
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    return {name: ROOT / directory for name, directory in setuptools["package-dir"].items()}


@cache
def modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module the package installs."""
    roots = package_dirs()
    claimed = set(roots.values())
    found: dict[str, Path] = {}
    for package, directory in roots.items():
        for path in sorted(directory.rglob("*.py")):
            parts = list(path.relative_to(directory).with_suffix("").parts)
            folders = [directory.joinpath(*parts[:i]) for i in range(1, len(parts))]
            if any(folder in claimed or not (folder / "__init__.py").is_file() for folder in folders):
                continue  # another package's directory, or not a package (scripts beside data)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def lazy_exports(tree: ast.Module, package: str) -> dict[str, str]:
    """A package's ``_EXPORTS = {name: module}`` table (module relative to it, or absolute)."""
    known = modules()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if isinstance(getattr(node, "value", None), ast.Dict) and \
                any(getattr(target, "id", None) == "_EXPORTS" for target in targets):
            table = {}
            for key, value in zip(node.value.keys, node.value.values):
                if isinstance(key, ast.Constant) and isinstance(value, ast.Constant):
                    module = f"{package}.{value.value}"
                    table[key.value] = module if module in known else value.value
            return table
    return {}


@cache
def exports_of(package: str) -> dict[str, str]:
    path = modules().get(package)
    if path is None or path.name != "__init__.py":
        return {}
    return lazy_exports(ast.parse(path.read_text(encoding="utf-8")), package)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom node, at any depth, outside ``if TYPE_CHECKING:`` bodies."""
    pending = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node):
            pending.extend(node.orelse)
            continue
        pending.extend(ast.iter_child_nodes(node))


def _owning_module(name: str) -> str | None:
    """``name`` if it is a module of the package, else its nearest enclosing one (None outside)."""
    known = modules()
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> list[Edge]:
    path = modules()[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    known = modules()
    edges: dict[str, Edge] = {}
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = []
            for alias in node.names:
                lazy = exports_of(base).get(alias.name)
                child = f"{base}.{alias.name}"
                targets.append(lazy if lazy in known else child if child in known else base)
        for target in targets:
            owner = _owning_module(target)
            if owner and owner != module and (owner not in edges or node.lineno < edges[owner].line):
                edges[owner] = Edge(module, owner, node.lineno)
    return sorted(edges.values(), key=lambda edge: edge.line)


@cache
def graph() -> dict[str, list[Edge]]:
    return {module: imports_of(module) for module in modules()}


def strongly_connected_components(edges: dict[str, list[Edge]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the components of more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(edges[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for edge in children:
                if edge.target not in index:
                    index[edge.target] = low[edge.target] = len(index)
                    stack.append(edge.target)
                    on_stack.add(edge.target)
                    work.append((edge.target, iter(edges[edge.target])))
                    break
                if edge.target in on_stack:
                    low[node] = min(low[node], index[edge.target])
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
                        found.append(sorted(component))
    return found


def shortest_path(edges: dict[str, list[Edge]], start: str, goal, within: set[str] | None = None) -> list[Edge]:
    """The shortest chain of edges from ``start`` to a module for which ``goal(module)`` holds
    (a cycle back to ``start`` when ``goal`` matches it), staying ``within`` a set of modules."""
    parents: dict[str, Edge | None] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for edge in edges[node]:
            if within is not None and edge.target not in within:
                continue
            if goal(edge.target):
                chain = [edge]
                while chain[0].source != start:
                    chain.insert(0, parents[chain[0].source])
                return chain
            if edge.target not in parents and edge.target != start:
                parents[edge.target] = edge
                queue.append(edge.target)
    return []


def describe_cycle(edges: dict[str, list[Edge]], component: list[str]) -> str:
    members = set(component)
    cycle = shortest_path(edges, component[0], lambda module: module == component[0], within=members)
    return (f"{len(component)} modules import each other: {', '.join(component)}\n"
            f"    e.g. " + "\n         ".join(str(edge) for edge in cycle))


def test_the_walk_sees_every_part_of_the_package():
    names = modules()
    for module in ("automodel_cli.cli", "automodel_cli.config.assemble", "automodel_cli.recipes.finetune",
                   "automodel_cli.plugins.models", "automodel_cli.components.distributed.parallelize"):
        assert module in names
    assert not any(".assets." in module for module in names)  # generator scripts, not modules
    targets = {edge.target for edge in graph()["automodel_cli.cli"]}
    assert "automodel_cli.commands.launch" in targets  # module-level import
    assert "automodel_cli.components.launch.torchrun" in targets  # import inside a function
    hookspecs = {edge.target for edge in graph()["automodel_cli.hookspecs"]}
    assert hookspecs == {"automodel_cli"}  # its registry imports are under `if TYPE_CHECKING:`
    kit = {edge.target for edge in graph()["automodel_cli.training.loop"]}
    assert "automodel_cli.components.checkpoint.save" in kit  # lazily re-exported start_checkpoint


def test_no_import_cycles():
    edges = graph()
    cycles = [describe_cycle(edges, component) for component in strongly_connected_components(edges)]
    assert not cycles, "Import cycles (cut one import of each; see this module's docstring):\n  " + \
        "\n  ".join(cycles)


def test_cycle_report_names_the_imports_to_cut():
    edges = {"a": [Edge("a", "b", 3)], "b": [Edge("b", "c", 5)], "c": [Edge("c", "a", 7), Edge("c", "d", 8)],
             "d": []}
    (component,) = strongly_connected_components(edges)
    assert component == ["a", "b", "c"]
    assert describe_cycle(edges, component).endswith("a:3 -> b\n         b:5 -> c\n         c:7 -> a")


def in_package(prefix: str):
    return lambda module: module == prefix or module.startswith(prefix + ".")


#: (rule, modules it applies to, modules they must never reach)
LAYER_RULES = [
    ("config resolution never imports launcher code",
     in_package("automodel_cli.config"), in_package("automodel_cli.components.launch")),
    ("components never import the CLI",
     in_package("automodel_cli.components"),
     lambda m: m == "automodel_cli.cli" or in_package("automodel_cli.commands")(m)),
    ("the plugin host imports no components",
     lambda m: m in ("automodel_cli.registry", "automodel_cli.plugin_host", "automodel_cli.hookspecs"),
     in_package("automodel_cli.components")),
]


@pytest.mark.parametrize("rule, applies, forbidden", LAYER_RULES, ids=[rule[0] for rule in LAYER_RULES])
def test_layers_import_downwards_only(rule, applies, forbidden):
    edges = graph()
    broken = [shortest_path(edges, module, forbidden) for module in sorted(edges) if applies(module)]
    broken = [" -> ".join([f"{edge.source}:{edge.line}" for edge in chain] + [chain[-1].target])
              for chain in broken if chain]
    assert not broken, f"{rule}, but:\n  " + "\n  ".join(broken)
