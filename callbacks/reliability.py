"""Training that survives bad numbers, bad data and pre-emption.

- `NonFiniteGuard`: a step whose loss or gradients are not finite is skipped (no parameter or
  optimizer-moment update), counted, and training stops with one clear message after
  `max_consecutive` such steps in a row.
- `DataHealth`: sums the `batch["skipped"]` counts the data pipeline attaches to every batch
  (`datamodules.steps.SkipCounter`) by reason, over all ranks, and logs/prints a summary at the
  end of every training epoch (and at the end of a run stopped mid-epoch by `max_steps`).
- `PreemptionCheckpoint`: on SIGTERM (cluster pre-emption, `scancel`, `kill`) saves `last.ckpt`
  before the process exits. Lightning's own signal connector catches SIGTERM, forwards it to the
  other ranks and raises `SIGTERMException` at the next batch boundary on every rank; this
  callback's `on_exception` then writes the checkpoint that `--ckpt_path last` resumes from.

`unclip fit` adds all three (and `RNGState`) to any trainer that does not configure them.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.callbacks.weight_averaging import WeightAveraging
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from modules.core.errors import RunStopped

log = logging.getLogger("unclip.reliability")


class NonFiniteLossError(RunStopped):
    """Training produced non-finite losses/gradients too many steps in a row."""


def grads_finite(module: torch.nn.Module) -> bool:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True


class NonFiniteGuard(Callback):
    """Skip optimizer steps with a non-finite loss or gradient; stop after `max_consecutive`.

    Runs in `on_before_optimizer_step` (after backward; under DDP the gradients are already
    all-reduced, and the decision is OR-reduced over ranks so sharded strategies agree): the
    gradients are set to None, so AdamW leaves parameters, moments and its step count untouched.
    The LR schedule still advances (as with AMP's skipped steps). `train/nonfinite_skipped`
    logs the running total.
    """

    def __init__(self, max_consecutive: int = 5) -> None:
        if max_consecutive < 1:
            raise ValueError("max_consecutive must be >= 1")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped = 0
        self._loss: torch.Tensor | None = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._loss = loss.detach()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        loss_ok = self._loss is None or bool(torch.isfinite(self._loss).all())
        bad = not (loss_ok and grads_finite(pl_module))
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            self.consecutive = 0
            return
        for p in pl_module.parameters():
            p.grad = None
        self.consecutive += 1
        self.skipped += 1
        loss = float(self._loss.float().mean()) if self._loss is not None else float("nan")
        rank_zero_warn(f"step {trainer.global_step}: non-finite loss/gradient (loss={loss}); step skipped "
                       f"({self.consecutive} in a row, {self.skipped} in total)")
        pl_module.log("train/nonfinite_skipped", float(self.skipped), on_step=True, on_epoch=False)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"stopped at step {trainer.global_step}: {self.consecutive} consecutive non-finite losses/gradients "
                f"(last loss={loss}); lower the learning rate, enable gradient clipping or check the data"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive": self.consecutive, "skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consecutive, self.skipped = int(state_dict["consecutive"]), int(state_dict["skipped"])


# ---------------------------------------------------------------------------------------------
# Data health
# ---------------------------------------------------------------------------------------------
def _sum_over_ranks(counts: Counter[str]) -> Counter[str]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Counter(counts)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, dict(counts))
    total: Counter[str] = Counter()
    for part in parts:
        total.update(part)
    return total


def format_counts(counts: Counter[str]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items())) or "none"


class DataHealth(Callback):
    """Counts skipped samples by reason (from `batch["skipped"]`) and summarises every epoch.

    `samples` counts the samples trained on (`len(batch["key"])`). The summary is summed over
    ranks; it is printed (logger `unclip.data`, rank 0) and logged as `data/skipped_<reason>`,
    `data/skipped`, `data/samples`. Checkpoints carry the global counts of the epoch in progress,
    so a resumed run reports the same totals as an uninterrupted one.
    """

    SAMPLES = "__samples__"

    def __init__(self) -> None:
        self.epoch_counts: Counter[str] = Counter()
        self.totals: Counter[str] = Counter()
        self.last_summary: dict[str, int] = {}
        self._pending: dict[str, Any] | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if not isinstance(batch, dict):
            return
        for reason, n in (batch.get("skipped") or {}).items():
            self.epoch_counts[str(reason)] += int(n)
        if "key" in batch:
            self.epoch_counts[self.SAMPLES] += len(batch["key"])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._summarise(trainer, pl_module, f"epoch {trainer.current_epoch}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.epoch_counts:  # stopped mid-epoch (max_steps / max_time)
            self._summarise(trainer, None, f"epoch {trainer.current_epoch} (partial)")

    def _summarise(self, trainer: pl.Trainer, pl_module: pl.LightningModule | None, label: str) -> None:
        counts = _sum_over_ranks(self.epoch_counts)
        self.epoch_counts = Counter()
        samples = counts.pop(self.SAMPLES, 0)
        self.totals.update(counts)
        self.totals[self.SAMPLES] += samples
        self.last_summary = {"samples": samples, **counts}
        skipped = sum(counts.values())
        if trainer.is_global_zero:
            level = logging.WARNING if skipped else logging.INFO
            log.log(level, "data health, %s: %d samples trained, %d skipped (%s); run total skipped %d",
                    label, samples, skipped, format_counts(counts), sum(v for k, v in self.totals.items() if k != self.SAMPLES))
        if pl_module is not None:
            metrics = {f"data/skipped_{re.sub(r'[^A-Za-z0-9_]+', '_', k).strip('_')}": float(v) for k, v in counts.items()}
            metrics.update({"data/skipped": float(skipped), "data/samples": float(samples)})
            pl_module.log_dict(metrics, sync_dist=True)  # already summed over ranks: equal everywhere

    def state_dict(self) -> dict[str, Any]:
        # Collective: Lightning dumps checkpoints on every rank at the same point.
        return {"epoch_counts": dict(_sum_over_ranks(self.epoch_counts)), "totals": dict(self.totals)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None:  # global counts: kept by rank 0 only, so rank sums stay right
            self.totals = Counter(self._pending["totals"])
            self.epoch_counts = Counter(self._pending["epoch_counts"]) if trainer.is_global_zero else Counter()
            self._pending = None


# ---------------------------------------------------------------------------------------------
# Pre-emption
# ---------------------------------------------------------------------------------------------
def checkpoint_dir(trainer: pl.Trainer) -> Path:
    """The first `ModelCheckpoint`'s folder (where `--ckpt_path last` looks), else
    `<default_root_dir>/checkpoints`."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            return Path(cb.dirpath)
    return Path(trainer.default_root_dir) / "checkpoints"


class PreemptionCheckpoint(Callback):
    """Save `<checkpoint dir>/<filename>.ckpt` when SIGTERM or Ctrl-C stops `fit`, then let
    Lightning exit.

    SIGTERM is Lightning's: a flag checked at the next batch boundary, then `SIGTERMException`.
    A first Ctrl-C (SIGINT) in the main process takes the same path instead of raising
    `KeyboardInterrupt` wherever the interpreter happens to be (possibly between two parameter
    updates of one optimizer step); a second Ctrl-C aborts at once, as usual. If the signal
    arrives during validation, weight-averaging callbacks hold the averaged weights in the model;
    they are swapped back first so the checkpoint has the usual layout.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last") -> None:
        self.dirpath, self.filename = dirpath, filename
        self.saved_path: Path | None = None
        self._previous_sigint: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after Lightning registered its own handlers (it restores what it found at teardown)
        if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            return  # not the main thread, or SIGINT deliberately ignored (nohup, background jobs): leave it so

        def graceful(signum: int, frame: Any) -> None:
            if trainer.received_sigterm:  # the second Ctrl-C: abort now
                raise KeyboardInterrupt
            rank_zero_info("Ctrl-C: stopping after this step and saving last.ckpt (press Ctrl-C again to abort)")
            trainer._signal_connector.received_sigterm = True  # Lightning's SIGTERM path from here on

        self._previous_sigint = signal.signal(signal.SIGINT, graceful)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_sigint()

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        if trainer.validating:
            for cb in trainer.callbacks:
                if isinstance(cb, WeightAveraging):
                    cb.on_validation_epoch_end(trainer, pl_module)
        path = (Path(self.dirpath) if self.dirpath else checkpoint_dir(trainer)) / f"{self.filename}.ckpt"
        trainer.save_checkpoint(path)
        self.saved_path = path
        rank_zero_info(f"SIGTERM / Ctrl-C: saved {path} at step {trainer.global_step}; resume with --ckpt_path last")
