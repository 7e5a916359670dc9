"""The `unclip` console script: one table maps each command to the function that runs it.

`unclip fit|validate|test|predict --config FILE ...` is LightningCLI (`modules.cli.lightning`);
every other command is a small argparse program in this package whose heavy imports happen inside
the function, so `unclip --help` and `unclip data` start fast. Any `UserError` (config, checkpoint,
data, pipeline) is printed as one line with exit status 2, a `RunStopped` with exit status 1.
Nothing imports this module: it is the top of the tree.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import warnings
from typing import Callable

from modules.cli import bench, data, demo, embed, evaluate, pipeline
from modules.core.errors import RunStopped, UserError

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def lightning(argv: list[str]) -> int:
    """LightningCLI with parse errors raised (not printed with the whole usage) so that `main`
    reports them as one line naming the key."""
    from modules.cli.lightning import UnclipCLI, check_config_files, parse_error

    check_config_files(argv)
    # `unclip` hands LightningCLI its own argv (the console script's sys.argv[1:], or a caller's list);
    # Lightning warns whenever both are set, which here is every run.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    try:
        UnclipCLI(args=argv, parser_kwargs={"exit_on_error": False})
    except argparse.ArgumentError as exc:
        raise parse_error(exc) from None
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "data": data.main,
    "embed": embed.main,
    "pipeline": pipeline.assemble,
    "generate": pipeline.generate,
    "vary": pipeline.vary,
    "interpolate": pipeline.interpolate,
    "textdiff": pipeline.textdiff,
    "evaluate": evaluate.evaluate,
    "evaluate-shapes": evaluate.evaluate_shapes,
    "demo": demo.main,
    "bench": bench.main,
}


def _usage() -> str:
    names = ", ".join([*LIGHTNING_COMMANDS, *COMMANDS])
    return f"usage: unclip {{{names}}} ... (unclip COMMAND --help for details)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # OpenMP's wait policy is libgomp's default (idle threads spin briefly, then sleep): on idle cores the
    # demo decoder's fit took 349 against 391 ms per step with OMP_WAIT_POLICY=PASSIVE (python -m benchmarks.omp_wait_policy).
    # On a machine shared with other work, export OMP_WAIT_POLICY=PASSIVE (README).
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command in LIGHTNING_COMMANDS:
            return lightning(argv)
        if command in COMMANDS:
            return COMMANDS[command](rest)
        raise UserError(f"unknown command {command!r}; {_usage()}")
    except SystemExit as exc:
        return _on_exit(command, exc)
    except RunStopped as exc:
        _say(f"unclip {command}: error: {exc}")
        return 1
    except (UserError, FileNotFoundError) as exc:
        _say(f"unclip {command}: error: {_one_line(exc)}")
        return 2


def _say(line: str) -> None:
    """Write one line to stderr in a single write. `print` writes the text and the newline
    separately, so under torchrun two ranks' lines interleaved into one ("...sizeunclip fit: ...");
    one write of under PIPE_BUF bytes to a pipe is atomic, so each rank's line stays whole."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 500 else text[:497] + "..."


def _on_exit(command: str, exc: SystemExit) -> int:
    """Lightning raises `SIGTERMException` (a SystemExit) after a SIGTERM stopped training; report
    the conventional 128 + SIGTERM status so schedulers see a pre-empted, not a finished, job."""
    if command not in LIGHTNING_COMMANDS:
        raise exc
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if isinstance(exc, SIGTERMException):
        _say(f"unclip {command}: stopped by SIGTERM or Ctrl-C (checkpoint saved; resume with --ckpt_path last)")
        return 128 + signal.SIGTERM
    raise exc
