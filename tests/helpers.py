"""Assertions shared across the test folders (tests/ is on sys.path: `from helpers import ...`)."""

import pytest


def assert_cli_error(capsys: pytest.CaptureFixture, *words: str) -> str:
    """The command printed one line to stderr, "error: ...", naming each of `words`; returns it."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"
    return err
