"""Optimizer + LR schedule shared by the stages: AdamW, linear warmup, optional cosine decay."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    decay_steps: int | None = None  # cosine decay to `min_lr_ratio * lr` over this many steps
    min_lr_ratio: float = 0.0
    fused: bool = False  # fused AdamW kernel (CUDA; foreach is the CPU default)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms' gains, embeddings' scalars (1-D parameters)."""
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(cfg: OptimConfig, step: int) -> float:
    """Multiplier on the base LR: linear warmup, then constant or cosine decay."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.decay_steps:
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.decay_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def configure(module: nn.Module, cfg: OptimConfig, params: Iterable[dict[str, Any]] | None = None) -> dict[str, Any]:
    """What `LightningModule.configure_optimizers` returns: AdamW + a per-step LambdaLR."""
    groups = list(params) if params is not None else param_groups(module, cfg.weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=cfg.fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_lambda(cfg, step))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
