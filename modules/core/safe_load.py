"""Loading checkpoints without arbitrary unpickling: `torch.load(weights_only=True)` only.

Every loader in the project (Lightning resume, CLIP weights, stage checkpoints, pipelines,
evaluation) goes through `safe_torch_load`, so a crafted pickle that would run code is refused
in one place with one clear line.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from modules.core.errors import CheckpointReadError, UnsafeCheckpointError



def safe_torch_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """`torch.load(weights_only=True)`; a file that needs arbitrary pickle, or is not a readable
    torch file, raises one clear line naming it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UnsafeCheckpointError(f"refusing to load {path}: it needs arbitrary pickle, not weights_only=True ({reason})") from None
    except (RuntimeError, EOFError, OSError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointReadError(f"cannot read checkpoint {path}: {reason}") from None


def read_lightning_checkpoint(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """A Lightning checkpoint through `safe_torch_load`; a missing file, an unreadable one or one
    without a `state_dict` raises `CheckpointReadError` naming it (`what`: e.g. "decoder checkpoint")."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointReadError(f"{what} not found: {path}")
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointReadError(f"{path} is not a Lightning checkpoint (no state_dict)")
    return ckpt
