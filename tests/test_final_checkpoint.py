"""SaveOnTrainEnd: the checkpoint holds the last step even when the run ends between saves."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from callbacks.final_checkpoint import SaveOnTrainEnd


def _fit(tmp_path: Path, extra: list) -> int:
    ckpts = tmp_path / "ckpt"
    trainer = pl.Trainer(max_steps=7, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ModelCheckpoint(dirpath=ckpts, save_last=True, every_n_train_steps=5), *extra])
    trainer.fit(BoringModel())
    return torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"]


def test_last_checkpoint_is_final_step(tmp_path: Path):
    assert _fit(tmp_path / "a", []) == 5  # Lightning alone: stale by two steps
    assert _fit(tmp_path / "b", [SaveOnTrainEnd(str(tmp_path / "b" / "ckpt"))]) == 7
