"""Callbacks and loggers: the real tiny decoder YAML, shrunk, logs to an offline W&B run."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from callbacks.feature_extractors import FeatureConfig
from callbacks.generation_metrics import GenerationMetrics
from callbacks.loggers import LoggerSaveConfigCallback, read_offline_run
from callbacks.sample_grid import SampleGrid
from callbacks.throughput import batch_size, count_training_flops, memory_stats

ROOT = Path(__file__).resolve().parents[1]


def shrink_tiny_yaml(tmp_path: Path, shards: str) -> Path:
    """experiments/decoder/tiny.yaml with tiny sizes, a few steps and every path under tmp_path."""
    cfg = yaml.safe_load((ROOT / "experiments/decoder/tiny.yaml").read_text())
    tr = cfg["trainer"]
    tr.update(max_steps=4, max_time=None, val_check_interval=2, limit_val_batches=2, log_every_n_steps=1,
              num_sanity_val_steps=1, enable_progress_bar=False, default_root_dir=str(tmp_path))  # fmt: skip
    for cb in tr["callbacks"]:
        args = cb.setdefault("init_args", {})
        if cb["class_path"].endswith("ModelCheckpoint"):
            args["dirpath"] = str(tmp_path / "checkpoints")
        if cb["class_path"].endswith("GenerationMetrics"):
            args.update(num_samples=6, every_n_validations=3, kid_subset_size=4, isc_splits=2, progress=False)
        if cb["class_path"].endswith("SampleGrid"):
            args["n"] = 4
        if cb["class_path"].endswith("Throughput"):
            args["window_size"] = 2
    model = cfg["model"]["init_args"]
    model["unet"] = dict(image_size=16, model_channels=16, channel_mult=[1, 2], num_res_blocks=1,
                         attention_resolutions=[8], num_head_channels=16, num_groups=8)  # fmt: skip
    model["diffusion"]["timesteps"] = 100
    model["sampling"]["steps"] = 4
    model["val_timesteps"] = [10, 50]
    model["optimizer"]["warmup_steps"] = 1
    cfg["data"]["init_args"].update(train_shards=shards, val_shards=shards, image_size=16, loader={"batch_size": 4, "num_workers": 0},
                                    resampled=False, epoch_samples=None, val_samples=8)  # fmt: skip
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_tiny_fit_writes_offline_wandb_run(tmp_path, tiny_shards):
    import wandb

    from modules.cli.lightning import UnclipCLI, run_name

    pattern, _ = tiny_shards
    config = shrink_tiny_yaml(tmp_path, pattern)
    try:
        cli = UnclipCLI(args=["fit", "--config", str(config)], save_config_callback=LoggerSaveConfigCallback)
    finally:
        wandb.finish()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run = read_offline_run(runs[0], wait_s=30)
    assert run.finished
    scalars = run.scalars()
    for key in ("train/loss", "val/loss", "val/fid", "val/kid", "val/inception_score", "val/clip_score",
                "val/clip_score_real", "lr-AdamW/pg1", "train/device/samples_per_sec", "train/device/flops_per_sec", "system/cpu_rss_mb"):  # fmt: skip
        assert key in scalars, f"{key} missing from {sorted(scalars)}"
    assert "validate/device/flops_per_sec" not in scalars  # training FLOPs are not validation FLOPs
    # Validations at steps 2 and 4; with every_n_validations=3 only the last one of the fit computes metrics.
    assert len(scalars["val/loss"]) == 2 and len(scalars["val/fid"]) == 1 and scalars["val/fid"][0] >= 0
    assert scalars["val/num_generated"] == [6.0]
    lr = yaml.safe_load(config.read_text())["model"]["init_args"]["optimizer"]["lr"]
    assert scalars["lr-AdamW/pg1"][0] == pytest.approx(lr)  # warmup of 1 step: the configured LR from step 0
    # Captioned sample images (4 per validation) and one grid per validation, stored in the run.
    rows = [r for r in run.history if "samples/val" in r]
    assert len(rows) == 2 and rows[0]["samples/val"]["count"] == 4 and len(rows[0]["samples/val"]["captions"]) == 4
    names = [p.name for p in run.images]
    assert sum(n.startswith("val_grid") for n in names) == 2 and sum(n.startswith("val_") for n in names) == 10
    # The resolved CLI config is saved with the run; run named and grouped by experiment and stage.
    assert run.config["cli"]["model"]["class_path"] == "modules.stages.decoder.DecoderModule"
    assert (runs[0] / "files" / "config.yaml").is_file()
    assert "FID_CLIP" in run.config["generation_metrics/features"]  # which features the FID used
    assert run.meta["name"] == run_name(str(tmp_path)) and run.meta["group"] == "decoder" and run.meta["job_type"] == "fit"
    # SampleGrid PNGs on disk; FLOPs counted once.
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["val_step0000002.png", "val_step0000004.png"]
    assert cli.model.flops_per_batch > 0


class Echo(pl.LightningModule):
    """`log_images` returns the real images plus `noise` x N(0, 1) from the given generator."""

    def __init__(self, noise: float = 0.0) -> None:
        super().__init__()
        self.layer, self.noise = nn.Linear(3, 1), noise

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        return None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.log("train/loss", 0.0)
        torch.rand(1)  # consumes RNG
        return self.layer(batch["x"]).sum()

    def log_images(self, batch: dict, n: int = 8, generator: torch.Generator | None = None) -> dict:
        real = (batch["image"][:n] + 1) / 2
        eps = torch.randn(real.shape, generator=generator)
        return {"samples": (real + self.noise * eps).clamp(0, 1), "real": real, "captions": list(batch["caption"][:n])}


def batches(n_batches: int = 3, size: int = 4, offset: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(offset)
    data = [
        {"image": torch.rand(size, 3, 16, 16, generator=g) * 2 - 1, "caption": [f"a shape {offset + b * size + i}" for i in range(size)]}
        for b in range(n_batches)
    ]
    return DataLoader(data, batch_size=None)


def validate(module: pl.LightningModule, callbacks: list, tmp_path: Path, offset: int = 0) -> dict:
    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=callbacks, default_root_dir=tmp_path, enable_progress_bar=False)
    return trainer.validate(module, dataloaders=batches(offset=offset), verbose=False)[0]


def test_generation_metrics_callback_exact_copies_give_zero_fid(tmp_path):
    torch.manual_seed(0)
    metrics = GenerationMetrics(num_samples=10, kid_subset_size=4, isc_splits=2, features=FeatureConfig(class_prompts=["a", "b"]), progress=False)
    same = validate(Echo(noise=0.0), [metrics], tmp_path)
    assert same["val/num_generated"] == 10  # 4 + 4 + 2 of the 12 available
    assert abs(same["val/fid"]) < 1e-4
    assert same["val/clip_score"] == pytest.approx(same["val/clip_score_real"], abs=1e-5)
    noisy = validate(Echo(noise=0.3), [metrics], tmp_path)
    assert noisy["val/fid"] > 100 * max(abs(same["val/fid"]), 1e-6)
    assert noisy["val/clip_score"] != pytest.approx(noisy["val/clip_score_real"], abs=1e-5)


def test_sample_grid_fixed_conditions_and_seed(tmp_path):
    grid = SampleGrid(n=3, seed=5, dirpath=str(tmp_path / "grids"))
    module = Echo(noise=0.5)
    validate(module, [grid], tmp_path, offset=0)
    first = grid.saved[-1].read_bytes()
    validate(module, [grid], tmp_path, offset=7)  # other data: the remembered conditions are reused
    assert grid.saved[-1].read_bytes() == first
    assert grid.batch["caption"] == ["a shape 0", "a shape 1", "a shape 2"]
    other = SampleGrid(n=3, seed=6, dirpath=str(tmp_path / "other"))
    validate(module, [other], tmp_path)
    assert other.saved[-1].read_bytes() != first


def test_count_training_flops_closed_form():
    module = Echo()
    b, i, o = 8, 3, 1
    batch = {"x": torch.randn(b, i)}
    state = torch.get_rng_state()
    flops = count_training_flops(module, batch)
    # forward x W^T: 2*B*I*O; backward: dL/dW only (x needs no grad): 2*B*I*O.
    assert flops == 4 * b * i * o
    assert torch.equal(torch.get_rng_state(), state)  # RNG untouched
    assert all(p.grad is None for p in module.parameters()) and "log" not in vars(module)
    assert count_training_flops(module, batch, backward=False) == 3 * 2 * b * i * o  # the DDP-safe estimate


def test_batch_size_and_memory_stats():
    assert batch_size({"caption": ["a"], "image": torch.zeros(5, 3, 2, 2)}) == 5
    assert batch_size([torch.zeros(2), torch.zeros(3)]) == 2 and batch_size(torch.zeros(7, 1)) == 7
    stats = memory_stats(torch.device("cpu"))
    assert 0 < stats["cpu_rss_mb"] <= stats["cpu_peak_rss_mb"] * 1.01 and not any(k.startswith("gpu") for k in stats)


def test_step_budget_progress_bar_titles_the_step_not_epoch_minus_two():
    """A step-budgeted run (max_epochs -1) is titled with its step budget; Lightning's default
    RichProgressBar wrote "Epoch 1/-2". An epoch-budgeted run keeps Lightning's title."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import RichProgressBar

    from callbacks.progress import StepBudgetProgressBar

    bar, plain = StepBudgetProgressBar(), RichProgressBar()
    steps = SimpleNamespace(max_epochs=-1, max_steps=600, global_step=512)
    bar._trainer = plain._trainer = steps
    assert plain._get_train_description(1).startswith("Epoch 1/-2")
    assert bar._get_train_description(1).strip() == "Epoch 1 · step 512/600"
    epochs = SimpleNamespace(max_epochs=3, max_steps=-1, global_step=0)
    bar._trainer = plain._trainer = epochs
    assert bar._get_train_description(1) == plain._get_train_description(1)


def test_read_offline_run_rereads_a_half_written_tail(monkeypatch, tmp_path):
    """While W&B's writer is still appending, the file can end in half a record (a protobuf
    DecodeError): within `wait_s` that is re-read like an unfinished run, after it the error stands."""
    from google.protobuf.message import DecodeError

    import callbacks.loggers as loggers

    calls = []

    def parse(run_dir):
        calls.append(run_dir)
        if len(calls) == 1:
            raise DecodeError("Wire format was corrupt")
        return loggers.OfflineRun(run_dir, finished=True)

    monkeypatch.setattr(loggers, "_parse_run", parse)
    assert loggers.read_offline_run(tmp_path, wait_s=5).finished and len(calls) == 2
    calls.clear()
    with pytest.raises(DecodeError):
        loggers.read_offline_run(tmp_path, wait_s=0)
