"""LightningCLI for every stage: YAML experiments with `class_path` / `init_args`."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI


class UnclipCLI(LightningCLI):
    """`unclip fit|validate|test|predict --config experiments/<stage>/<name>.yaml`.

    Any LightningModule / LightningDataModule subclass is accepted by class path; the resolved
    config is saved next to the logs (`config.yaml`) so a run records its lineage.
    """

    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        os.environ.setdefault("WANDB_MODE", "offline")  # never needs a network unless asked
        super().__init__(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            **kwargs,
        )
