"""`SampleGrid`: fixed-condition, fixed-seed sample grids from any stage's `log_images`.

Image helpers live in `modules.core.images`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from torch import Tensor

from modules.core.images import save_png, tile, to_uint8

log = logging.getLogger(__name__)


def image_sets(out: dict[str, Any]) -> dict[str, Tensor]:
    """The (B, 3, H, W) image tensors of a `log_images` result ("samples" first)."""
    sets = {k: v for k, v in out.items() if isinstance(v, Tensor) and v.dim() == 4 and v.shape[1] in (1, 3)}
    return dict(sorted(sets.items(), key=lambda kv: kv[0] != "samples"))


def grid_of(out: dict[str, Any], nrow: int | None = None) -> Tensor:
    """One grid: a block of rows per image set (samples, then real, ...), same width."""
    sets = image_sets(out)
    n = max(v.shape[0] for v in sets.values())
    nrow = nrow or n
    size = max(v.shape[-1] for v in sets.values())
    resized = [torch.nn.functional.interpolate(v.float().cpu(), size=(size, size), mode="nearest") for v in sets.values()]
    blocks = [tile(v.expand(-1, 3, -1, -1), nrow) for v in resized]
    return torch.cat(blocks, dim=1)


def log_to_logger(logger: Logger, key: str, images: Sequence[np.ndarray], captions: Sequence[str] | None, step: int) -> None:
    """W&B: a list of captioned images; TensorBoard: the images; other loggers: nothing (PNG on disk)."""
    if isinstance(logger, WandbLogger):
        kwargs = {"caption": list(captions)} if captions else {}
        logger.log_image(key=key, images=list(images), step=step, **kwargs)
    elif isinstance(logger, TensorBoardLogger):
        for i, img in enumerate(images):
            logger.experiment.add_image(f"{key}/{i}", img, global_step=step, dataformats="HWC")


class SampleGrid(Callback):
    """Calls `pl_module.log_images(batch, n, generator)` with fixed conditions and a fixed seed.

    The conditions are the first `n` items of the first batch this callback sees (the sanity-check
    validation batch by default, else the first training batch) and never change; the generator is
    reseeded with `seed` every time, so successive grids differ only by the weights. Runs on rank
    zero under `torch.no_grad()`: at the first validation batch (the weights validation uses, e.g.
    EMA) and, with `every_n_steps`, during training (live weights). Saves
    `{dirpath}/{split}_step{global_step:07d}.png` (default dirpath: `<trainer.log_dir>/samples`) and
    logs `samples/{split}` (captioned samples) and `samples/{split}_grid` to every logger.
    """

    def __init__(
        self,
        n: int = 8,
        every_n_steps: int | None = None,
        on_validation: bool = True,
        seed: int = 0,
        dirpath: str | None = None,
        nrow: int | None = None,
        skip_sanity_check: bool = True,
    ) -> None:
        self.n, self.every_n_steps, self.on_validation, self.seed = n, every_n_steps, on_validation, seed
        self.dirpath, self.nrow, self.skip_sanity_check = dirpath, nrow, skip_sanity_check
        self.batch: dict[str, Any] | None = None
        self.saved: list[Path] = []

    # -- hooks ---------------------------------------------------------------------------------
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx != 0 or dataloader_idx != 0:
            return
        self._remember(batch)
        if self.on_validation and not (trainer.sanity_checking and self.skip_sanity_check):
            self.log_samples(trainer, pl_module, "val")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._remember(batch)
            self.log_samples(trainer, pl_module, "train")

    # -- work ------------------------------------------------------------------------------------
    def _remember(self, batch: Any) -> None:
        if self.batch is None and isinstance(batch, dict):
            self.batch = {k: (v[: self.n].detach().cpu() if isinstance(v, Tensor) else v[: self.n]) for k, v in batch.items() if isinstance(v, (Tensor, list))}

    def log_samples(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> Path | None:
        if not trainer.is_global_zero or self.batch is None:
            return None
        batch = {k: (v.to(pl_module.device) if isinstance(v, Tensor) else v) for k, v in self.batch.items()}
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                gen = torch.Generator(device="cpu").manual_seed(self.seed)
                out = pl_module.log_images(batch, n=self.n, generator=gen)
        finally:
            pl_module.train(was_training)
        if not image_sets(out):  # a stage whose `log_images` returns no images (e.g. embeddings only)
            return None
        step = trainer.global_step
        grid = grid_of(out, self.nrow)
        path = save_png(grid, self._dir(trainer) / f"{split}_step{step:07d}.png")
        self.saved.append(path)
        captions = out.get("captions") or None
        samples = image_sets(out).get("samples")
        for logger in trainer.loggers:
            if samples is not None:
                log_to_logger(logger, f"samples/{split}", list(to_uint8(samples)), captions, step)
            log_to_logger(logger, f"samples/{split}_grid", [to_uint8(grid[None])[0]], ["; ".join(captions)] if captions else None, step)
        return path

    def _dir(self, trainer: pl.Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "samples"
