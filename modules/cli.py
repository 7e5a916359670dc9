"""The `unclip` console script.

`unclip fit|validate|test|predict --config FILE ...` is LightningCLI (any stage's LightningModule
and LightningDataModule by `class_path`); the project's own subcommands (`unclip data ...`, ...)
are plain argparse programs registered in `COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from typing import Callable

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
# Project subcommand -> the module that registers it (`register(name, fn)` at import). Only the
# chosen command's module is imported, so `unclip --help` and `unclip data` start fast.
COMMAND_MODULES = {
    "data": "modules.cli",
    "embed": "modules.commands",
    "evaluate": "modules.evaluate",
    "evaluate-shapes": "modules.compositional_eval",
    "pipeline": "modules.pipeline_commands",
    "generate": "modules.pipeline_commands",
    "vary": "modules.pipeline_commands",
    "interpolate": "modules.pipeline_commands",
    "textdiff": "modules.pipeline_commands",
    "demo": "modules.demo",
    "bench": "benchmarks.commands",
}


class UserError(Exception):
    """An error caused by the user's input: reported as one line, no traceback."""


def _data_command(argv: list[str]) -> int:
    from datamodules import shapes

    parser = argparse.ArgumentParser(prog="unclip data", description="Write built-in datasets as WebDataset shards.")
    sub = parser.add_subparsers(dest="dataset", required=True)
    shapes.add_shapes_arguments(sub.add_parser("shapes", help="the compositional shapes dataset"))
    args = parser.parse_args(argv)
    shapes.run_shapes(args)
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {"data": _data_command}


def register(name: str, fn: Callable[[list[str]], int]) -> None:
    COMMANDS[name] = fn


def _lightning_cli(argv: list[str]) -> int:
    """LightningCLI with parse errors raised (not printed with the whole usage) so that `main`
    reports them as one line naming the key."""
    from modules.lightning_cli import UnclipCLI, parse_error

    try:
        UnclipCLI(args=argv, parser_kwargs={"exit_on_error": False})
    except argparse.ArgumentError as exc:
        raise parse_error(exc) from None
    return 0


def _usage() -> str:
    names = ", ".join([*LIGHTNING_COMMANDS, *COMMAND_MODULES])
    return f"usage: unclip {{{names}}} ... (unclip COMMAND --help for details)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Before torch loads OpenMP: idle threads sleep instead of spinning. On a busy small machine
    # spinning made a 2-thread decoder step 12x slower (15.9 s vs 1.36 s; benchmarks note).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command in LIGHTNING_COMMANDS:
            return _lightning_cli(argv)
        if command in COMMAND_MODULES:
            importlib.import_module(COMMAND_MODULES[command])
            return COMMANDS[command](rest)
        raise UserError(f"unknown command {command!r}; {_usage()}")
    except SystemExit as exc:
        return _on_exit(command, exc)
    except Exception as exc:
        if _is_training_stop(exc):
            print(f"unclip {command}: error: {exc}", file=sys.stderr)
            return 1
        if not _is_user_error(exc):
            raise
        print(f"unclip {command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 500 else text[:497] + "..."


def _on_exit(command: str, exc: SystemExit) -> int:
    """Lightning raises `SIGTERMException` (a SystemExit) after a SIGTERM stopped training; report
    the conventional 128 + SIGTERM status so schedulers see a pre-empted, not a finished, job."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if isinstance(exc, SIGTERMException):
        print(f"unclip {command}: stopped by SIGTERM (checkpoint saved; resume with --ckpt_path last)", file=sys.stderr)
        return 128 + signal.SIGTERM
    raise exc


def _is_training_stop(exc: BaseException) -> bool:
    if "callbacks.reliability" not in sys.modules:
        return False
    from callbacks.reliability import NonFiniteLossError

    return isinstance(exc, NonFiniteLossError)


def _is_user_error(exc: BaseException) -> bool:
    from datamodules.stages import ShardPatternError

    user = (UserError, ShardPatternError, FileNotFoundError)
    if "callbacks.checkpointing" in sys.modules:
        from callbacks.checkpointing import CheckpointReadError

        user += (CheckpointReadError,)
    return isinstance(exc, user)


if __name__ == "__main__":
    # `python -m modules.cli`: dispatch through the importable module, whose COMMANDS the
    # plugin modules register into (this file runs as `__main__`, a second copy).
    from modules.cli import main as _main

    sys.exit(_main())
