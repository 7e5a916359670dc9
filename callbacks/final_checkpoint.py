"""Save a checkpoint whenever `fit` ends, whatever ended it.

With `ModelCheckpoint(every_n_train_steps=N)`, a run stopped by `max_time` (or early stopping)
between two multiples of N leaves `last.ckpt` up to N steps stale. Time-budgeted runs (the demo,
CI) name this callback so the next stage always gets the final weights (EMA weights when
`EMAWeightAveraging` is used: it swaps them into the saved `state_dict`).
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


class SaveOnTrainEnd(Callback):
    def __init__(self, dirpath: str, filename: str = "last.ckpt") -> None:
        self.path = Path(dirpath) / filename

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(str(self.path))
