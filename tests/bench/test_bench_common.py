"""The provenance every benchmark report carries: which commit its numbers come from."""

import subprocess

import pytest

from cs336_systems.bench.common import git_revision


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.delenv("CS336_GIT_REVISION", raising=False)
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    return tmp_path


def test_head_then_dirty_then_the_override(repo, monkeypatch):
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert git_revision(repo) == head
    (repo / "untracked.txt").write_text("not a change to HEAD's files\n")
    assert git_revision(repo) == head
    (repo / "a.txt").write_text("two\n")  # a tracked file differs: a copied tree over a stale checkout
    assert git_revision(repo) == f"{head}-dirty"
    monkeypatch.setenv("CS336_GIT_REVISION", "abc1234")
    assert git_revision(repo) == "abc1234"


def test_outside_a_checkout_it_is_unknown(tmp_path, monkeypatch):
    monkeypatch.delenv("CS336_GIT_REVISION", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert git_revision(tmp_path) == "unknown"
