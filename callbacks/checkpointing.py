"""Crash-safe checkpoints and exact resume: atomic writes, safe loading, RNG streams.

- `AtomicCheckpointIO` (a Trainer plugin): a checkpoint file is either the previous complete one
  or the new complete one, never a torn write. Lightning 2.6.6's `TorchCheckpointIO` is not that:
  its `_atomic_save` writes through an fsspec transaction whose temporary file comes from
  `tempfile.mkstemp()` in $TMPDIR and is then `shutil.move`d -- a plain copy (not atomic) when
  $TMPDIR and the checkpoint folder are on different filesystems (the usual cluster layout: local
  /tmp, shared checkpoint storage), never fsynced, and the temporary file leaks when the process
  is killed. Here the temporary file lives in the target folder, is fsynced, then `os.replace`d
  (atomic on POSIX), and the folder entry is fsynced. Loading is `torch.load(weights_only=True)`
  always: a checkpoint given to `--ckpt_path` cannot run code.
- `RNGState` (a callback): saves the Python / NumPy / torch (CPU and CUDA) generator states in the
  checkpoint and restores them right before the first training batch after a resume, so the
  resumed run draws the same timesteps, noise and dropout masks as an uninterrupted one.
  Validation is made RNG-neutral (its draws do not shift the training stream), which is what
  makes "the state at the checkpoint" equal "the state of the next training step".

The data position is restored by `datamodules.image_text.EpochLoader` (a Lightning-stateful
loader); Lightning restores the loops, optimizer, LR schedulers and (through
`EMAWeightAveraging`) the EMA weights itself.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback

from modules.core.errors import UnsafeCheckpointError
from modules.core.safe_load import safe_torch_load


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def fsync_dir(directory: Path) -> None:
    """Persist a folder's entries (the rename) on POSIX; a no-op where folders cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save` to `path` through `.{name}.*.tmp` in the same folder + fsync + `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` with atomic, durable local writes and `weights_only=True` loads.

    Use it as `trainer.plugins: [callbacks.checkpointing.AtomicCheckpointIO]` (`unclip fit` adds
    it when no plugin is configured). Remote URLs (`s3://...`) fall back to Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or _is_remote(str(path)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            raise UnsafeCheckpointError(f"refusing weights_only=False for {path}: checkpoints load as plain tensors only")
        if _is_remote(str(path)):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        return safe_torch_load(path, map_location=map_location or "cpu")


# ---------------------------------------------------------------------------------------------
# RNG streams
# ---------------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """Every generator this process draws from, as plain types / tensors (weights_only-loadable)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RNGState(Callback):
    """Checkpoints the RNG streams and restores them at the first training batch after resume.

    Under DDP the checkpoint (written by rank 0) carries rank 0's streams and every rank restores
    them: Lightning's `seed_everything` seeds all ranks identically and equal-shaped steps keep
    them equal, so this is exact for the stages here.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._outside_validation: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return capture_rng()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            restore_rng(self._pending)
            self._pending = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.training or trainer.state.fn == "fit":
            self._outside_validation = capture_rng()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._outside_validation is not None:
            restore_rng(self._outside_validation)
            self._outside_validation = None
