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
- `RNGState` (a callback): keys the training draws (timesteps, noise, CFG drop masks, upsampler
  crops and corruption) by (seed, batch number) for the global batch, each rank keeping its rows
  (`modules.core.draws`), and seeds Python / NumPy / torch (CPU and CUDA) at every training batch
  from (seed, rank, batch number) for anything else. Ranks draw different values, a W-rank run
  draws what a 1-process run at the same global batch draws, and a resumed run draws what an
  uninterrupted one did (the batch number is Lightning's checkpointed progress). Validation
  cannot shift the training streams.

The data position is restored by `datamodules.image_text.EpochLoader` (a Lightning-stateful
loader); Lightning restores the loops, optimizer, LR schedulers and (through
`EMAWeightAveraging`) the EMA weights itself.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback

from modules.core import draws
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
def batch_seed(seed: int, rank: int, batch: int) -> int:
    """The seed of training batch `batch` (counted over the whole run) on data-parallel `rank`."""
    return draws.key_seed(seed, rank, batch)


def seed_batch(seed: int, rank: int, batch: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) for one training batch."""
    value = batch_seed(seed, rank, batch)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


def data_parallel_rank(trainer: pl.Trainer) -> tuple[int, int]:
    """(rank, number of ranks) among the processes that read different batches."""
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    return int(kwargs.get("rank", 0)), int(kwargs.get("num_replicas", 1))


class RNGState(Callback):
    """Training randomness keyed by the run's batch number n:

    - the per-sample draws of a step (timesteps, noise, CFG dropout masks, upsampler crops and
      corruption, prior noise) go through `modules.core.draws`: the k-th draw of batch n comes
      from a generator keyed by (seed, n, k), drawn for the global batch, and each data-parallel
      rank keeps its own rows. So ranks draw different values, and a 2-rank run draws exactly what
      a 1-process run with a batch twice as large draws;
    - Python / NumPy / torch are also seeded with `batch_seed(seed, global_rank, n)`, for draws
      not routed through `draws` (`nn.Dropout`): different per rank, not rank-count invariant.

    Lightning's `seed_everything` seeds every rank identically, which made every rank draw the
    same t and ε for different images. Model initialisation stays equal (it happens before the
    first batch), and a resumed run draws exactly what the uninterrupted run did: n is
    Lightning's batch progress, which the checkpoint restores, so no generator state is saved.
    Validation and sampling draw from their own generators and cannot shift the training
    streams. `seed` defaults to the run's `seed_everything` value (`PL_GLOBAL_SEED`).
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        n = trainer.fit_loop.epoch_loop.batch_progress.total.ready
        seed_batch(seed, trainer.global_rank, n)
        draws.begin_step(seed, n, *data_parallel_rank(trainer))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        draws.end_step()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        draws.end_step()  # also after a batch that skipped on_train_batch_end (`on_train_batch_start` returned -1)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        draws.end_step()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        draws.end_step()
