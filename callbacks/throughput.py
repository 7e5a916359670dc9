"""Speed and memory: Lightning's `ThroughputMonitor` plus FLOPs counting and memory logging.

ThroughputMonitor logs `train|validate/samples_per_sec`, `batches_per_sec` and, when the module
has `flops_per_batch`, `flops_per_sec` and `mfu` (model FLOPs utilisation = achieved / peak FLOPs;
peak known for recent NVIDIA GPUs and TPUs, not for CPUs). `Throughput` fills `flops_per_batch`
by counting one training step (forward + backward) with torch's FlopCounterMode and logs memory.
The learning rate is Lightning's `LearningRateMonitor`, added in the YAML.
"""

from __future__ import annotations

import logging
import resource
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch.callbacks import ThroughputMonitor
from torch import Tensor

log = logging.getLogger(__name__)
MB = 2**20


def batch_size(batch: Any) -> int:
    """Leading size of the first tensor of a batch (dict / list / tuple / tensor); module-level so
    the callback pickles for `ddp_spawn`."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, dict) else batch
    for value in values:
        if isinstance(value, Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError("no tensor in batch to count samples")


def memory_stats(device: torch.device) -> dict[str, float]:
    """Process resident memory (current, peak) and, on CUDA, allocated / peak / reserved memory, in MB."""
    stats = {"cpu_rss_mb": _rss_bytes() / MB, "cpu_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        stats["gpu_allocated_mb"] = torch.cuda.memory_allocated(device) / MB
        stats["gpu_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / MB
        stats["gpu_reserved_mb"] = torch.cuda.memory_reserved(device) / MB
    return stats


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:  # not Linux: peak only
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def count_training_flops(pl_module: pl.LightningModule, batch: Any, backward: bool = True) -> int:
    """FLOPs of one `training_step` on `batch`: forward + backward counted, or (`backward=False`)
    3 x the forward FLOPs, the usual estimate, which runs no backward (safe under DDP, whose
    gradient hooks must not fire outside a step). RNG state and grads are restored, `self.log` muted."""
    devices = [pl_module.device] if pl_module.device.type == "cuda" else []
    pl_module.log = lambda *a, **k: None  # type: ignore[method-assign]
    step = lambda: pl_module.training_step(batch, 0)  # noqa: E731
    try:
        with torch.random.fork_rng(devices=devices):
            if backward:
                flops = measure_flops(pl_module, step, loss_fn=lambda loss: loss)
            else:
                with torch.no_grad():
                    flops = 3 * measure_flops(pl_module, step)
    finally:
        del pl_module.log  # the class method again
        for p in pl_module.parameters():
            p.grad = None
    return int(flops)


class Throughput(ThroughputMonitor):
    """`ThroughputMonitor` with a default `batch_size_fn`, FLOPs counted once, and memory logs.

    Args:
        count_flops: count the FLOPs of the first training step and set `pl_module.flops_per_batch`
            (when the module does not define it), enabling `flops_per_sec` / `mfu`; forward +
            backward on one process, 3 x forward under DDP.
        log_memory: every `trainer.log_every_n_steps` steps log `system/cpu_rss_mb`,
            `system/cpu_peak_rss_mb` and on CUDA `system/gpu_*_mb` (max over ranks).
        window_size: batches averaged by the monitor.
    """

    def __init__(self, count_flops: bool = True, log_memory: bool = True, window_size: int = 20, **kwargs: Any) -> None:
        super().__init__(batch_size_fn=batch_size, window_size=window_size, **kwargs)
        self.count_flops, self.log_memory = count_flops, log_memory

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.count_flops and not hasattr(pl_module, "flops_per_batch"):
            self.count_flops = False
            try:
                flops = count_training_flops(pl_module, batch, backward=trainer.world_size == 1)
            except Exception as exc:  # a stage whose step cannot be traced: throughput without FLOPs
                log.warning("Throughput: could not count FLOPs (%s: %s)", type(exc).__name__, exc)
                return
            pl_module.flops_per_batch = flops  # type: ignore[attr-defined]
            log.info("Throughput: %.3g FLOPs per training batch of %d", flops, batch_size(batch))

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        # `flops_per_batch` counts a training step: no FLOPs figures for validation batches.
        has_flops, self._module_has_flops = self._module_has_flops, False
        try:
            super().on_validation_batch_end(trainer, pl_module, *args, **kwargs)
        finally:
            self._module_has_flops = has_flops

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.log_memory and trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            stats = {f"system/{k}": v for k, v in memory_stats(pl_module.device).items()}
            pl_module.log_dict(stats, on_step=True, on_epoch=False, sync_dist=True, reduce_fx="max")
