"""The layout is the design: imports point down only, and no file grows past 500 lines.

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


def test_no_file_over_500_lines():
    paths = _sources() + sorted((ROOT / "tests").rglob("*.py"))
    long = [f"{p.relative_to(ROOT)}: {n}" for p in paths if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, long
