"""The layering rules (docs/architecture.md), checked on the source itself:

- common/ imports neither node nor client;
- client/ imports common only (never node);
- node/ outside node/cli and node/bench imports no client module;
- no import cycle among the project's modules (imports inside functions count; `if TYPE_CHECKING:` ones do not,
  as they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "node", "client")
COMPOSITION_ROOTS = ("node.cli", "node.bench")  # may import everything


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "generated" not in path.parts:
                found[_module_name(path)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(path: Path, module: str) -> set[str]:
    """Every module name an import statement in the file names (at any depth, TYPE_CHECKING blocks excepted),
    with `from a import b` giving both `a` and `a.b`."""
    names: set[str] = set()
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return names


def _graph() -> dict[str, set[str]]:
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        targets = {resolve(name) for name in _imported_names(path, module) if name.split(".")[0] in PACKAGES}
        graph[module] = {target for target in targets if target and target != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
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


def _violations(graph: dict[str, set[str]], importer: str, forbidden: tuple[str, ...],
                allowed: tuple[str, ...] = ()) -> list[str]:
    return sorted(f"{module} -> {target}" for module, targets in graph.items()
                  if module.split(".")[0] == importer and not module.startswith(allowed)
                  for target in targets if target.split(".")[0] in forbidden)


def test_common_imports_neither_node_nor_client():
    assert _violations(_graph(), "common", ("node", "client")) == []


def test_client_imports_no_node_module():
    assert _violations(_graph(), "client", ("node",)) == []


def test_the_runtime_imports_no_client_module():
    assert _violations(_graph(), "node", ("client",), allowed=COMPOSITION_ROOTS) == []


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_checks_see_what_they_check():
    """The walker finds imports inside functions and relative ones, and the cycle finder finds a cycle."""
    graph = _graph()
    assert "common.wire.codec" in graph["client.transport"]
    assert any(target.startswith("node.bench") for target in graph["node.cli.main"])  # imported inside functions
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _violations({"client.x": {"node.y"}}, "client", ("node",)) == ["client.x -> node.y"]
