"""The one base class for mistakes a user can fix, and the training stop the CLI reports plainly.

`unclip` prints any `UserError` as one line (`unclip COMMAND: error: ...`, exit status 2) and a
`RunStopped` as one line with exit status 1, whichever module raised it. Every loader's error
(config, checkpoint, shard pattern, pipeline folder, embedding join) derives from `UserError`, so
the CLI needs no knowledge of which modules happen to be imported.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input: reported as one line naming the file/key, no traceback."""


class ConfigError(UserError, ValueError):
    """A configuration value that cannot work (one line naming the key)."""


class CheckpointReadError(UserError, ValueError):
    """A checkpoint file that cannot be read (missing, truncated, not a torch file)."""


class UnsafeCheckpointError(CheckpointReadError):
    """A checkpoint that `torch.load(weights_only=True)` refuses (it would need arbitrary pickle)."""


class DataError(UserError, ValueError):
    """Training data that cannot be used as given (a shard pattern, a broken embedding export)."""


class PipelineError(UserError, ValueError):
    """A pipeline directory that cannot be loaded (one line naming the file and field)."""


class RunStopped(RuntimeError):
    """A run stopped on purpose by a guard (e.g. too many non-finite losses): one line, exit 1."""
