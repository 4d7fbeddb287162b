"""The docs name only what exists: every repo path in README.md and docs/**/*.md is a file or folder here.

Checked, outside and inside code spans and code blocks: relative markdown link targets and their #anchors
(against the target page's headings); paths that start with a top-level folder of the repo
(`ops/flash_attn/tiles.py`, `docs/perf/x.{md,json}`); paths below one that name a file
(`training/data.py`: some file of the repo ends so); lone source file names in code spans (`tiles.py`;
other lone names are mostly files a command writes); modules run with `python -m` from the repo's
packages. Skipped: URLs, globs, placeholders (`OUT_DIR/...`, `NAME.md`, `<dir>`), what follows an
--out flag, and paths under folders that runs create (outputs/, runs/).
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# The repo's top-level folders; the others (outputs/, runs/, .venv/) are made by runs.
TOP = ("cs336_basics", "cs336_systems", "ops", "tests", "docs", "tools", ".ci")
# A path that starts elsewhere and ends so names a file of the repo (`training/data.py`), unless it starts
# where runs write or is absolute or relative to the current directory.
SUFFIXES = (".py", ".md", ".json", ".png", ".sh", ".txt")
MADE_BY_RUNS = ("outputs", "runs", "", "~", ".", "..")
PLACEHOLDER = re.compile(r"[<>$*?{}\[\]…]|\.\.\.|(^|/)[A-Z][A-Z0-9_-]*(\.|/|$)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
SPAN = re.compile(r"`([^`]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
MODULE = re.compile(r"-m\s+((?:cs336_systems|cs336_basics|ops|tools)(?:\.\w+)*)")


@cache
def _repo_files() -> tuple[frozenset[str], frozenset[str]]:
    """Relative paths of the repo's files and folders (under TOP and at the root), and their names."""
    paths, names = {p.name for p in ROOT.iterdir() if p.is_file()}, set()
    for top in TOP:
        for path in (ROOT / top).rglob("*"):
            if "__pycache__" in path.parts:
                continue
            paths.add(str(path.relative_to(ROOT)))
            names.add(path.name)
    return frozenset(paths | set(TOP)), frozenset(names | paths)  # root files: path == name


def _slug(heading: str) -> str:
    text = re.sub(r"[`*]", "", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.+?)\s*$", text, re.M)}


def _exists(rel: str) -> bool:
    rel = rel.rstrip("/")
    if rel.split("/")[0] in TOP:
        return rel in _repo_files()[0]
    return (ROOT / rel).exists() or any(path.endswith("/" + rel) for path in _repo_files()[0])


def _path_tokens(text: str, lone_names: bool) -> list[str]:
    """Tokens of a code span or block that name a repo path."""
    found, tokens = [], text.split()
    for before, token in zip(["", *tokens], tokens):
        if before.startswith("--out"):
            continue  # where a command writes
        token = token.strip("\"'(),;:").split("::")[0]  # a pytest node id names its file
        for path in _expand_braces(token):
            if not path or "://" in path or PLACEHOLDER.search(path) or "=" in path:
                continue
            if "/" in path:
                if path.split("/")[0] in TOP or (path.endswith(SUFFIXES) and path.split("/")[0] not in MADE_BY_RUNS):
                    found.append(path)
            elif lone_names and path.endswith(".py") and not path.startswith("."):
                found.append(path)
    return found


def _expand_braces(token: str) -> list[str]:
    """`a.{md,json}` -> a.md, a.json (one group, as the docs write it); other tokens as they are."""
    match = re.fullmatch(r"([^{}]*)\{([^{}]+,[^{}]+)\}([^{}]*)", token)
    return [match[1] + part + match[3] for part in match[2].split(",")] if match else [token]


def _problems(page: Path) -> list[str]:
    text = page.read_text()
    problems = []
    blocks = FENCE.findall(text)
    prose = FENCE.sub("", text)
    spans = SPAN.findall(prose)
    for target in LINK.findall(SPAN.sub("", prose)):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve()
        if not resolved.exists():
            problems.append(f"link {target}")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            problems.append(f"link {target}: no such heading")
    for span in spans:
        single = len(span.split()) == 1
        for token in _path_tokens(span, lone_names=single):
            if "/" in token and not _exists(token):
                problems.append(f"path {token}")
            elif "/" not in token and token not in _repo_files()[1]:
                problems.append(f"file {token}")
    for block in blocks:
        for token in _path_tokens(block, lone_names=False):
            if not _exists(token):
                problems.append(f"path {token} (code block)")
    for module in MODULE.findall("\n".join(spans + blocks)):
        rel = module.replace(".", "/")
        if not (_exists(rel + ".py") or _exists(rel + "/__init__.py") or _exists(rel + "/__main__.py")):
            problems.append(f"module {module}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_name_existing_paths(page):
    problems = _problems(page)
    assert not problems, f"{page.relative_to(ROOT)} names what is not in the repo: {problems}"


def test_the_check_finds_what_is_missing(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "See `ops/no_such.py`, `tests/ops/test_interpreter.py`, `gone.py`, [x](missing.md), [y](#here),\n"
        "`training/nothing.py`, `python -m ops.flash_attn.gone`, `OUT_DIR/a.json`, `docs/perf/*.json`,\n"
        "`docs/perf/{train_step,nothing}.md` and https://example.com/a.py.\n"
        "```\nbash tools/nothing.sh --out-dir outputs/x\n```\n"
    )
    assert sorted(_problems(page)) == sorted([
        "path ops/no_such.py", "file gone.py", "link missing.md", "path training/nothing.py",
        "module ops.flash_attn.gone", "path docs/perf/nothing.md", "path tools/nothing.sh (code block)",
    ])
