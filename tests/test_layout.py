"""The layout is the design: imports point down only, no module imports itself round a circle, and no
file grows past 500 lines.

bench → training → parallel → distributed; ops and cs336_basics below all of them (docs/architecture.md).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# package -> packages it must never import
FORBIDDEN = {
    "cs336_systems.distributed": ("cs336_systems.parallel", "cs336_systems.training", "cs336_systems.bench"),
    "cs336_systems.parallel": ("cs336_systems.training", "cs336_systems.bench"),
    "cs336_systems.training": ("cs336_systems.bench",),
    "ops": ("cs336_systems", "cs336_basics"),
    "cs336_basics": ("cs336_systems",),
}
MAX_LINES = 500


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _sources() -> list[Path]:
    return sorted(p for package in ("cs336_systems", "ops", "cs336_basics") for p in (ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", list(FORBIDDEN))
def test_imports_point_down(package):
    offenders = []
    for path in _sources():
        module = _module_name(path)
        if module != package and not module.startswith(package + "."):
            continue
        for name in _imports(path):
            if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[package]):
                offenders.append(f"{module} imports {name}")
    assert not offenders, offenders


def _modules() -> dict[str, Path]:
    return {_module_name(p).removesuffix(".__init__"): p for p in _sources()}


def _graph() -> dict[str, set[str]]:
    """module -> our modules it imports, anywhere in it (module level, functions, TYPE_CHECKING blocks)."""
    modules = _modules()

    def ours(name: str) -> str | None:  # the module `name` is, or the one it is an attribute of
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package of `module`
                    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
                    package = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                    base = f"{package}.{base}".rstrip(".")
                targets.update(f"{base}.{alias.name}" for alias in node.names)  # a submodule, or a name in base
        graph[module] = {target for name in targets if (target := ours(name)) not in (None, module)}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = stack[stack.index(node):]
            del stack[stack.index(node):]
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle():
    """No module reaches itself through imports, even ones inside functions: each layer is usable alone."""
    assert not _cycles(_graph())


def test_a_circle_is_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_cli_is_on_top():
    """The entry point imports every command (a module with a top-level `main`) and nothing imports it
    but `python -m cs336_systems`."""
    graph, cli = _graph(), "cs336_systems.cli"
    commands = {module for module, path in _modules().items() if module != cli and any(
        isinstance(node, ast.FunctionDef) and node.name == "main" for node in ast.parse(path.read_text()).body)}
    assert commands and commands <= graph[cli], commands - graph[cli]
    assert {module for module, imported in graph.items() if cli in imported} == {"cs336_systems.__main__"}


def test_no_file_over_500_lines():
    paths = _sources() + sorted((ROOT / "tests").rglob("*.py"))
    long = [f"{p.relative_to(ROOT)}: {n}" for p in paths if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, long
