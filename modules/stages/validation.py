"""Validation shared by the diffusion stages: the loss at fixed timesteps with fixed noise.

A random-t validation loss is dominated by which timesteps were drawn; fixing t and the noise
makes curves comparable between runs and checkpoints.
"""

from __future__ import annotations

from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor

from modules.diffusion import GaussianDiffusion
from modules.diffusion.config import noise


def log_fixed_timestep_losses(
    module: pl.LightningModule, diffusion: GaussianDiffusion, model: Any, x0: Tensor, model_kwargs: dict[str, Any],
    timesteps: Sequence[int], generator: torch.Generator,
) -> Tensor:
    """Log `val/loss_t{t}` for each t and their mean as `val/loss`; returns the mean."""
    eps = noise(x0.shape, generator, x0.device)  # the same noise at every t
    total = x0.new_zeros(())
    for step in timesteps:
        t = torch.full((x0.shape[0],), step, device=x0.device, dtype=torch.long)
        loss = diffusion.training_losses(model, x0, t, model_kwargs=model_kwargs, noise=eps)["loss"].mean()
        module.log(f"val/loss_t{step}", loss, batch_size=x0.shape[0])
        total = total + loss
    mean = total / len(timesteps)
    module.log("val/loss", mean, prog_bar=True, batch_size=x0.shape[0])
    return mean
