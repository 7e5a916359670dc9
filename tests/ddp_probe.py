"""DDP probe: trains stages from their tiny YAMLs and records losses, synced gradients and keys.

Used two ways by `tests/test_ddp.py`:
- `torchrun --nproc_per_node 2 tests/ddp_probe.py --data DIR --out DIR --stages ...` trains every
  named stage with `strategy=ddp` on 2 CPU processes (gloo) and writes `<stage>-rank<r>.pt`;
- `run_stage(...)` in the test process gives the single-process reference at the same global
  batch.

Equal global batches: every shard holds exactly one per-rank batch and shuffling inside shards is
off, so DDP step k (rank r reads shard 2k + r of the epoch's shard order) sees the same samples as
single-process step k with a batch twice as large, rank 0's rows first. The stages train with
their production draws (`modules.core.draws`: t, ε, CFG drop masks, upsampler crops and
corruption levels keyed by (seed, step) for the global batch, each rank keeping its rows), so the
only difference left between the two runs is the data-parallel arithmetic. `Probe` records each
step's draws (`StepDraws.drawn`) to show it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PER_SHARD = 8  # samples per shard = per-rank batch under DDP
NUM_SHARDS = 4
EMBED_DIM = TEXT_WIDTH = 64  # tiny-vit
TOKENS = 5  # caption token encodings per sample (fixed: no padding differences between batchings)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_image_shards(folder: Path, shards: int = NUM_SHARDS, per_shard: int = PER_SHARD, size: int = 16, seed: int = 0) -> str:
    """`shards` x `per_shard` random images with distinct captions; returns the brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for s in range(shards):
        members: list[tuple[str, bytes]] = []
        for i in range(per_shard):
            key = f"{s:04d}{i:04d}"
            members += [(f"{key}.png", png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))),
                        (f"{key}.txt", f"sample {s} {i} of the probe".encode())]
        (folder / f"img-{s:06d}.tar").write_bytes(tar_bytes(members))
    return str(folder / f"img-{{000000..{shards - 1:06d}}}.tar")


def write_embedding_shards(folder: Path, shards: int = NUM_SHARDS, per_shard: int = PER_SHARD, seed: int = 0) -> str:
    """Embedding shards in the `unclip embed` format (unit z_i, z_t; (TOKENS, W) encodings)."""
    from datamodules.embeddings import sample_members

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for s in range(shards):
        members: list[tuple[str, bytes]] = []
        for i in range(per_shard):
            zi, zt = (torch.nn.functional.normalize(torch.randn(EMBED_DIM, generator=g), dim=0) for _ in range(2))
            tokens = torch.randn(TOKENS, TEXT_WIDTH, generator=g)
            members += sample_members(f"{s:04d}{i:04d}", f"caption {s} {i}", zi, zt, tokens, np.float32)
        (folder / f"emb-{s:06d}.tar").write_bytes(tar_bytes(members))
    return str(folder / f"emb-{{000000..{shards - 1:06d}}}.tar")


def write_clip_weights(path: Path, seed: int = 0) -> str:
    """A randomly initialised tiny-vit CLIP state dict (the decoder's frozen CLIP)."""
    from modules.networks.clip import create_clip

    torch.manual_seed(seed)
    torch.save(create_clip("tiny-vit").state_dict(), path)
    return str(path)


def write_probe_data(folder: Path) -> dict[str, str]:
    return {
        "images": write_image_shards(folder / "images"),
        "embeddings": write_embedding_shards(folder / "embeddings"),
        "clip": write_clip_weights(folder / "clip.pt"),
    }


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------
def stage_args(stage: str, data: dict[str, str]) -> list[str]:
    """The stage's tiny YAML plus the overrides that make runs comparable (see module doc): fixed
    shard order, no validation; the AR prior fits its PCA on the first per-rank batch (rank 0's in
    both runs). CFG dropout, crops and corruption stay as configured."""
    image = ["--data.train_shards", data["images"], "--data.shuffle_buffer=0"]
    emb = ["--data.train_shards", data["embeddings"], "--data.shuffle_buffer=0", "--model.clip_weights=null"]
    table = {
        "clip": ["experiments/clip/tiny.yaml", *image, "--data.image_size=32", "--model.gather_with_grad=true"],
        "clip_nograd": ["experiments/clip/tiny.yaml", *image, "--data.image_size=32", "--model.gather_with_grad=false"],
        "prior": ["experiments/prior/tiny.yaml", *emb],
        "ar_prior": ["experiments/prior/ar_tiny.yaml", *emb, f"--model.fit_samples={PER_SHARD}",
                     f"--model.prior.num_components={PER_SHARD}"],
        "decoder": ["experiments/decoder/tiny.yaml", *image, "--model.clip_weights", data["clip"]],
        "superres": ["experiments/superres/tiny.yaml", *image],
    }
    config, *rest = table[stage]
    return ["--config", str(ROOT / config), "--data.val_shards=null", "--data.resampled=false", *rest]


def step_draws_log() -> list[torch.Tensor]:
    """The list the current training step's draws are appended to (`StepDraws.drawn`); call it
    from `on_train_batch_start`, after `RNGState` (which `add_reliability` puts first)."""
    from modules.core import draws

    step = draws.active()
    assert step is not None, "RNGState opens the step's draws before this callback runs"
    if step.drawn is None:
        step.drawn = []
    return step.drawn


class Probe(Callback):
    """Per step: the training_step loss, the (all-reduced) gradient vector, the batch keys and the
    values this rank drew through `modules.core.draws` (in call order)."""

    def __init__(self, grad_steps: int = 2) -> None:
        self.grad_steps = grad_steps
        self.losses: list[float] = []
        self.grads: list[torch.Tensor] = []
        self.keys: list[list[str]] = []
        self.epochs: list[int] = []
        self.rng: list[str] = []  # digest of the torch generator state each step starts from
        self.draws: list[list[torch.Tensor]] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.keys.append(list(batch["key"]))
        self.epochs.append(trainer.current_epoch)
        self.rng.append(hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest())  # after RNGState seeded it
        self.draws.append(step_draws_log())

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if len(self.grads) < self.grad_steps:
            self.grads.append(torch.cat([p.grad.flatten() for p in pl_module.parameters() if p.grad is not None]).clone())

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))

    def record(self) -> dict[str, Any]:
        return {"losses": self.losses, "grads": self.grads, "keys": self.keys, "epochs": self.epochs, "rng": self.rng,
                "draws": self.draws}


def run_stage(stage: str, data: dict[str, str], root: Path, *, devices: int, batch_size: int, workers: int,
              max_epochs: int) -> dict[str, Any]:
    """Fit `stage` from its tiny YAML; returns the probe record of this process."""
    from modules.cli.lightning import UnclipCLI

    args = stage_args(stage, data) + [
        "--trainer.accelerator=cpu", f"--trainer.devices={devices}", f"--trainer.strategy={'ddp' if devices > 1 else 'auto'}",
        "--trainer.max_steps=-1", f"--trainer.max_epochs={max_epochs}", "--trainer.max_time=null",
        "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--trainer.logger=false",
        "--trainer.callbacks=null", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={root / stage}",
        f"--data.loader.batch_size={batch_size}", f"--data.loader.num_workers={workers}",
    ]
    if workers:
        # Workers forked by a forkserver, not by this multi-threaded rank: a fork from a threaded
        # process deadlocked a worker once on CPython 3.11.7 (python/cpython#112275).
        args.append("--data.loader.multiprocessing_context=forkserver")
    cli = UnclipCLI(args=args, run=False)
    probe = Probe()
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return {**probe.record(), "world_size": cli.trainer.world_size, "rank": cli.trainer.global_rank}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stages", nargs="+", required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)
    sys.argv = sys.argv[:1]  # LightningCLI gets its arguments from `args=` only
    torch.set_num_threads(1)
    data = {"images": str(args.data / "images" / "img-{000000..000003}.tar"),
            "embeddings": str(args.data / "embeddings" / "emb-{000000..000003}.tar"), "clip": str(args.data / "clip.pt")}
    for stage in args.stages:
        record = run_stage(stage, data, args.out, devices=int(os.environ.get("WORLD_SIZE", 1)), batch_size=PER_SHARD,
                           workers=args.workers, max_epochs=args.epochs)
        torch.save(record, args.out / f"{stage}-rank{record['rank']}.pt")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())


# ---------------------------------------------------------------------------------------------
# Kill / resume probe (`unclip fit ... --trainer.callbacks+=tests.ddp_probe.StepLog`)
# ---------------------------------------------------------------------------------------------
class StepLog(Callback):
    """One JSON line per training step: global step, epoch, batch index, keys, loss, LR, a digest
    of the torch RNG state the step starts from and one of the values it drew through
    `modules.core.draws`. Driven by environment variables:
    UNCLIP_STEPLOG (the file), UNCLIP_SIGNAL_AT ("<step>:<KILL|TERM>": send that signal to this
    process after that step) and UNCLIP_FINAL_CKPT (save a checkpoint after the last step)."""

    def __init__(self) -> None:
        self.path = os.environ.get("UNCLIP_STEPLOG")
        at = os.environ.get("UNCLIP_SIGNAL_AT", "")
        self.signal_step, self.signal_name = (int(at.split(":")[0]), at.split(":")[1]) if at else (-1, "")
        self.final = os.environ.get("UNCLIP_FINAL_CKPT")
        self._row: dict[str, Any] = {}
        self._drawn: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        digest = hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16]
        self._row = {"epoch": trainer.current_epoch, "batch_idx": batch_idx, "keys": list(batch["key"]), "rng": digest,
                     "lr": trainer.optimizers[0].param_groups[0]["lr"]}
        self._drawn = step_draws_log()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        import json
        import signal

        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        drawn = hashlib.sha1(b"".join(d.numpy().tobytes() for d in self._drawn)).hexdigest()[:16]
        row = {**self._row, "step": trainer.global_step, "loss": float(loss), "draws": drawn if self._drawn else None}
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.final and trainer.global_step == trainer.max_steps:
            trainer.save_checkpoint(self.final)
        if trainer.global_step == self.signal_step:
            os.kill(os.getpid(), getattr(signal, f"SIG{self.signal_name}"))


def read_steplog(path: Path) -> dict[int, dict[str, Any]]:
    import json

    return {row["step"]: row for row in map(json.loads, Path(path).read_text().splitlines())}


class PoisonBatches(Callback):
    """Sets the floating-point tensors of the batches at the given step indices to NaN (the
    steps come from UNCLIP_POISON_STEPS, e.g. "2,3" or "4-100", unless given)."""

    def __init__(self, steps: set[int] | None = None) -> None:
        if steps is None:
            spec = os.environ.get("UNCLIP_POISON_STEPS", "")
            steps = set()
            for part in filter(None, spec.split(",")):
                lo, _, hi = part.partition("-")
                steps.update(range(int(lo), int(hi or lo) + 1))
        self.steps = steps

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step in self.steps:
            for value in batch.values():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    value.fill_(float("nan"))
