"""Bad user input, caught before a run starts: the one exception type the CLI turns into a one-line
message instead of a traceback (and `flags_renamed`, which makes it name the command's own flags), and
the argparse types shared by every command: float flags, which refuse what float() accepts but no run
can use (nan, inf), and output directories."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path


class ConfigError(ValueError):
    """Bad user input (flags, presets, files): the message names the offending argument."""


@contextlib.contextmanager
def flags_renamed(names: dict[str, str]) -> Iterator[None]:
    """ConfigErrors raised inside name the caller's flags: `names` maps the flags of the config that
    checks the values (train's `--num-heads`) to those of the command that set them (`bench step
    --heads`), so a command that maps its flags onto another's config still reports its own."""
    try:
        yield
    except ConfigError as error:
        message = re.sub(r"--[a-z0-9][a-z0-9-]*", lambda flag: names.get(flag.group(), flag.group()), str(error))
        raise ConfigError(message) from None


BOUNDS: dict[str, Callable[[float], bool]] = {
    "finite": lambda value: True,
    "positive": lambda value: value > 0,
    "non-negative": lambda value: value >= 0,
}
"""What a float flag may be besides finite; `check_float`'s `bound`."""


def _float_problem(value: float, bound: str) -> str | None:
    """Why `value` is no valid float of `bound`, or None. nan compares false with everything, so a
    `value <= 0` check alone lets it through, and inf passes it: both end in a nan loss or a run
    that never stops, far from the flag."""
    if math.isfinite(value) and BOUNDS[bound](value):
        return None
    return f"must be {'a finite' if bound == 'finite' else f'a finite {bound}'} number, got {value}"


def check_float(value: float, flag: str, bound: str = "finite") -> float:
    """`value` when it is finite and `bound` holds for it; a ConfigError naming `flag` otherwise."""
    problem = _float_problem(value, bound)
    if problem:
        raise ConfigError(f"{flag} {problem}")
    return value


def _float_type(bound: str) -> Callable[[str], float]:
    """An argparse `type=` that parses a float and applies `check_float`; argparse names the flag."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        problem = _float_problem(value, bound)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = f"{bound}_float"
    return parse


finite_float = _float_type("finite")
positive_float = _float_type("positive")
nonnegative_float = _float_type("non-negative")


def directory_problem(path: str) -> str | None:
    """Why no output directory can be made at `path` (it, or a folder above it, is a file; or the nearest
    existing folder is not writable), or None. Checked before a run, not when its results are written."""
    target = Path(path)
    for folder in (target, *target.parents):
        if folder.exists():
            if not folder.is_dir():
                return f"{folder} is a file, not a directory"
            if not os.access(folder, os.W_OK | os.X_OK):
                return f"cannot create or write {path}: {folder} is not writable"
            return None
    return None


def directory(text: str) -> str:
    """An argparse `type=` for output directories (`--out-dir`): refuses what `directory_problem` finds;
    "" (no output, where a command allows it) passes."""
    problem = directory_problem(text) if text else None
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text
