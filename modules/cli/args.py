"""Command-line arguments checked where they enter: one line naming the flag, before any work.

`Parser` is an `argparse.ArgumentParser` whose errors raise `UserError` (so `unclip` prints one
`unclip COMMAND: error: argument --steps: ...` line instead of argparse's usage block), and
`count`, `real` and `output_dir` are argparse types/checks with explicit ranges.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NoReturn

from modules.core.errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse with errors as `UserError` (one line, exit 2) instead of usage + exit."""

    def error(self, message: str) -> NoReturn:
        raise UserError(message)


def _ranged(convert: Callable[[str], float], kind: str, low: float, high: float) -> Callable[[str], float]:
    """An argparse type: `convert(text)`, finite and in [low, high]."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not in [{low}, {high}]")
        return value

    parse.__name__ = kind.split()[-1]
    return parse


def count(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high]."""
    return _ranged(int, "an integer", low, high)  # type: ignore[return-value]


def real(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high]."""
    return _ranged(float, "a number", low, high)


def output_dir(path: str | Path, flag: str = "--out") -> Path:
    """Check that `path` can become an output folder, without creating anything: it is a folder or
    does not exist yet, and its nearest existing ancestor is a writable folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: exists and is not a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {existing} is not writable")
    return path


@contextmanager
def new_output(path: str | Path, keep_finished_files: bool = False) -> Iterator[Path]:
    """A command's output folder that a failure does not leave behind.

    If `path` did not exist when the command started and the command fails (any exception,
    Ctrl-C included), the folder is removed -- with whatever the command wrote, or, with
    `keep_finished_files` (resumable commands such as `embed`, whose finished shards are complete
    files worth keeping), only when it is empty. A folder that existed before is never touched."""
    path = Path(path)
    existed = path.exists()
    try:
        yield path
    except BaseException:
        if not existed and path.is_dir():
            if not keep_finished_files:
                shutil.rmtree(path, ignore_errors=True)
            elif not any(path.iterdir()):
                path.rmdir()
        raise
