"""Decoder U-Net layouts at equal parameters: held-out denoising loss after the same training.

A speed ratio from a layout change is only worth having if the layout learns as well. This trains
each `bench_decoder` layout, sized to the same parameter count, on the same shapes images (64 px,
rendered in memory) with the same timesteps, noise and batch order, then reports the held-out
ε-MSE at fixed timesteps with fixed noise (DDPM eq. 14, as `val/loss`) and the CPU time per step.
The loss is that of an exponential moving average of the weights (`--ema`, as the training
recipes evaluate with Lightning's `EMAWeightAveraging`): the raw weights' loss after a few hundred
steps moves by ±10% from one step to the next (`--ema 0` measures it). The image embedding is
the learned null one throughout (unconditional denoising), so the parameter counts are the
benchmark's.

    .venv/bin/python -m benchmarks.compare_layouts --layouts efficient efficient-top0 --steps 400
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from benchmarks import bench_decoder, harness

EVAL_TIMESTEPS = (50, 250, 500, 750, 950)


def shapes_images(n: int, size: int, seed: int) -> torch.Tensor:
    """(n, 3, size, size) shapes scenes in [-1, 1] (datamodules.shapes' renderer, no files)."""
    from datamodules.shapes.dataset import render_sample
    from datamodules.steps import to_tensor

    rng = np.random.default_rng(seed)
    return torch.stack([to_tensor(render_sample(rng, size)[0]) for _ in range(n)])


@torch.no_grad()
def held_out_loss(unet: torch.nn.Module, diffusion: Any, images: torch.Tensor, seed: int) -> dict[int, float]:
    """ε-MSE at each fixed timestep, the same noise for every layout."""
    eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    out = {}
    for step in EVAL_TIMESTEPS:
        t = torch.full((images.shape[0],), step, dtype=torch.long)
        out[step] = float(diffusion.training_losses(unet, images, t, noise=eps)["mse"].mean())
    return out


def train_layout(layout: str, target_params: int, train: torch.Tensor, val: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    from modules.diffusion.config import DiffusionConfig
    from modules.networks.unet import UNet

    channels, params = bench_decoder.match_model_channels(target_params, layout=layout)
    torch.manual_seed(args.seed)  # same initial draws, timesteps and noise for every layout
    unet = UNet(bench_decoder.our_unet_config(channels, False, layout, channels_last=True))
    diffusion = DiffusionConfig().build()
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    ema = AveragedModel(unet, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True) if args.ema else None
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for step in range(args.steps):
        idx = order[(step * args.batch + torch.arange(args.batch)) % len(train)]
        x0 = train[idx]
        t = diffusion.sample_timesteps(args.batch)
        loss = diffusion.training_losses(unet, x0, t)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update_parameters(unet)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    evaluated = ema.module if ema is not None else unet
    evaluated.eval()
    losses = held_out_loss(evaluated, diffusion, val, args.seed + 1)
    return {"layout": layout, "model_channels": channels, "params": params, "steps": args.steps,
            "cpu_s_per_step": cpu / args.steps, "wall_s_per_step": wall / args.steps,
            "val_loss": sum(losses.values()) / len(losses), "val_loss_t": losses}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layouts", nargs="+", choices=list(bench_decoder.LAYOUTS), default=["efficient", "efficient-top0"])
    parser.add_argument("--params", type=int, default=14245251, help="parameter count to size every layout to (the peer's)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--ema", type=float, default=0.99, help="evaluate an EMA of the weights with this decay (0: the raw weights)")
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--val-images", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train = shapes_images(args.train_images, 64, args.seed).contiguous(memory_format=torch.channels_last)
    val = shapes_images(args.val_images, 64, args.seed + 10_000).contiguous(memory_format=torch.channels_last)
    results = [train_layout(layout, args.params, train, val, args) for layout in args.layouts]
    for r in results:
        per_t = " ".join(f"t{t}={v:.4f}" for t, v in r["val_loss_t"].items())
        print(f"{r['layout']:>16}: {r['params'] / 1e6:.2f} M params (model_channels {r['model_channels']}), "
              f"{r['cpu_s_per_step']:.3f} s CPU/step, val eps-MSE {r['val_loss']:.4f} ({per_t})")
    harness.emit({"bench": "compare_layouts", "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
