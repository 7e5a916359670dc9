"""What a loader worker start method costs: fork vs forkserver (with its preload) vs spawn.

Non-persistent workers start again every epoch, so the start method is paid per epoch. Each
method runs in a fresh process (a forkserver is per process), `--epochs` passes of the train
loader of `ImageTextDataModule` over shapes shards with `--workers` workers; reported: wall time
to the first batch and of the whole pass, per epoch (the first epoch of forkserver includes
starting the server and its preload), and the ratios to fork.

    python -m benchmarks.bench_loader_start [--epochs 3 --workers 2 --rounds 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import harness
from benchmarks.bench_data import write_shapes_shards


def time_passes(shards: str, method: str, epochs: int, workers: int, batch: int) -> list[dict[str, float]]:
    """Per epoch: seconds to the first batch and to the end of the pass."""
    from datamodules.image_text import ImageTextDataModule, LoaderConfig

    context = None if method == "fork" else method
    dm = ImageTextDataModule(train_shards=shards, image_size=32, shuffle_buffer=100, tokenizer="ViT-B-32", loader=LoaderConfig(batch_size=batch, num_workers=workers, multiprocessing_context=context))
    dm.setup("fit")
    loader, out = dm.train_dataloader(), []
    for _ in range(epochs):
        t0, first, images = time.perf_counter(), None, 0
        for batch_ in loader:
            first = time.perf_counter() - t0 if first is None else first
            images += batch_["image"].shape[0]
        out.append({"first_batch_s": first or 0.0, "epoch_s": time.perf_counter() - t0, "images": images})
    return out


def run_child(shards: str, method: str, args: argparse.Namespace) -> list[dict[str, float]]:
    cmd = [sys.executable, "-m", "benchmarks.bench_loader_start", "--child", method, "--shards", shards,
           "--epochs", str(args.epochs), "--workers", str(args.workers), "--batch", str(args.batch)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench_loader_start --child {method} failed:\n{done.stderr[-2000:]}")
    return harness.parse_result(done.stdout)["epochs"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=512, help="shapes images in the shards")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per method, alternating")
    parser.add_argument("--methods", nargs="+", default=["fork", "forkserver", "spawn"])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shards", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        harness.emit({"epochs": time_passes(args.shards, args.child, args.epochs, args.workers, args.batch)})
        return
    methods = [m for m in args.methods if m in multiprocessing.get_all_start_methods()]
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shapes_shards(Path(tmp), args.images)
        runs: dict[str, list[list[dict[str, float]]]] = {m: [] for m in methods}
        for _ in range(args.rounds):
            for method in methods:
                runs[method].append(run_child(shards, method, args))
    summary: dict[str, Any] = {}
    for method, rounds in runs.items():
        summary[method] = {
            "first_epoch_s": statistics.median(r[0]["epoch_s"] for r in rounds),
            "later_epoch_s": statistics.median(e["epoch_s"] for r in rounds for e in r[1:]) if args.epochs > 1 else None,
            "later_first_batch_s": statistics.median(e["first_batch_s"] for r in rounds for e in r[1:]) if args.epochs > 1 else None,
        }
    base = summary.get("fork")
    for method, s in summary.items():
        if base:
            s["later_epoch_vs_fork"] = s["later_epoch_s"] / base["later_epoch_s"] if s["later_epoch_s"] else None
        later = f"{s['later_epoch_s']:.2f} s" if s["later_epoch_s"] is not None else "-"
        ratio = f" ({s['later_epoch_vs_fork']:.2f}x fork)" if s.get("later_epoch_vs_fork") else ""
        first_batch = f"{s['later_first_batch_s']:.2f} s" if s["later_first_batch_s"] is not None else "-"
        print(f"{method:>10}: first epoch {s['first_epoch_s']:.2f} s, later epochs {later}{ratio}, "
              f"first batch of a later epoch {first_batch}")
    harness.emit({"bench": "loader_start", "args": vars(args), "runs": runs, "summary": summary})


if __name__ == "__main__":
    main()
