"""Optimizer + LR schedule shared by the stages: AdamW, linear warmup, optional cosine decay."""

from __future__ import annotations

import math
import warnings
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
    fused: bool = False  # fused AdamW kernel (CUDA and CPU; unset, torch loops over tensors on CPU: benchmarks/cpu_optimizer.py)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]


def original_ndims(module: nn.Module) -> dict[str, int]:
    """Each of `module.named_parameters()`'s names -> the number of dims its parameter had before
    any sharding, which is what the weight-decay rule (decay iff ndim >= 2) has to look at.

    - Unwrapped, DDP or DeepSpeed ZeRO-1/2: the parameter is whole, `p.ndim`.
    - FSDP1 (`FullyShardedDataParallel`, `use_orig_params=True`, Lightning's default): each original
      parameter is a 1-D view of this rank's part of its unit's FlatParameter (size 0 when none of
      it is local), so `p.ndim` is 1 for every weight. Each FSDP unit's `_handle.flat_param` keeps
      `_param_infos` (param_name, module, module_name) and `_shapes`, in the same order, and the
      view is `getattr(module, param_name)` (torch/distributed/fsdp/_flat_param.py). Only units
      inside `module` are seen: a parameter of a unit wrapping `module` from outside (Lightning's
      root unit is the whole LightningModule) keeps its 1-D `p.ndim`, with a warning; making the
      network an FSDP unit of its own (auto-wrap policy) puts its parameters back in sight.
    - FSDP2 (`fully_shard`): the registered parameter is a DTensor built on a spec whose
      `tensor_meta` is the unsharded size (`FSDPParam._init_sharding_spec_plain`), so `p.ndim` is
      already the logical one (on 2 processes a Linear(8, 6)'s weight is a (6, 8) DTensor holding
      a (3, 8) local shard).
    - FSDP1 with `use_orig_params=False` registers the FlatParameter itself: weights and biases
      share one 1-D tensor and no per-parameter rule applies; it counts as 1-D.
    """
    original: dict[int, int] = {}  # id(view parameter) -> ndim of the original
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FullyShardedDataParallel

        for unit in module.modules():
            handle = unit._handle if isinstance(unit, FullyShardedDataParallel) else None
            if handle is not None and handle._use_orig_params:
                flat = handle.flat_param
                for (name, owner, _), shape in zip(flat._param_infos, flat._shapes):
                    original[id(getattr(owner, name))] = len(shape)
    named = dict(module.named_parameters())
    # FSDP1 marks the original parameters it flattens
    unseen = [name for name, p in named.items() if getattr(p, "_fsdp_flattened", False) and id(p) not in original]
    if unseen:
        warnings.warn(f"{len(unseen)} parameters (e.g. {unseen[0]}) belong to FSDP units outside the module given to "
                      "the optimizer: sharded, their weights count as 1-D and get no weight decay", stacklevel=2)
    return {name: original.get(id(p), p.ndim) for name, p in named.items()}


def param_groups(module: nn.Module, weight_decay: float, exempt_names: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """No weight decay on biases, norms' gains, embeddings' scalars: parameters of fewer than 2
    dims before any sharding (`original_ndims`), and any whose name contains one of `exempt_names`."""
    ndims = original_ndims(module)
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            exempt = ndims[name] < 2 or any(part in name for part in exempt_names)
            (no_decay if exempt else decay).append(p)
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
