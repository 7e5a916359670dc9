"""AdamW's step on the demo decoder's parameters: PyTorch's CPU default (one tensor at a time)
against `foreach` and `fused`, side by side in one process (interleaved rounds, best of each).

On CPU, `torch.optim.AdamW` without flags runs its per-parameter loop (`foreach` defaults on for
CUDA only); `fused=True` runs one vectorised CPU kernel per parameter (torch >= 2.4). The three
are the same update: after `--steps` steps from equal gradients the parameters agree to float
rounding, printed as the largest absolute difference against the default.

    python -m benchmarks.cpu_optimizer [--threads 2] [--rounds 20] [--steps 5]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import yaml

from modules.networks.unet import UNet, UNetConfig

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"default (per tensor)": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    unet_cfg = yaml.safe_load((ROOT / "experiments/decoder/tiny.yaml").read_text())["model"]["init_args"]["unet"]
    base = UNet(UNetConfig(**unet_cfg, image_embed_dim=64, text_embed_dim=64))
    grads = [torch.randn_like(p) * 1e-2 for p in base.parameters()]
    nets = {name: copy.deepcopy(base) for name in VARIANTS}
    opts = {name: torch.optim.AdamW(nets[name].parameters(), lr=1e-3, weight_decay=0.01, **kw) for name, kw in VARIANTS.items()}

    def step(name: str) -> float:
        for param, g in zip(nets[name].parameters(), grads):
            param.grad = g.clone()
        start = time.perf_counter()
        opts[name].step()
        return time.perf_counter() - start

    for _ in range(a.steps):  # equal updates from equal gradients, then compare
        for name in VARIANTS:
            step(name)
    ref = list(nets["default (per tensor)"].parameters())
    diffs = {name: max(float((x - y).abs().max()) for x, y in zip(nets[name].parameters(), ref)) for name in VARIANTS}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(a.rounds):
        for name in VARIANTS:
            times[name].append(step(name))
    n = sum(p.numel() for p in base.parameters())
    default = min(times["default (per tensor)"])
    print(f"AdamW step, demo decoder U-Net ({n / 1e6:.2f}M params, {len(ref)} tensors), {a.threads} threads, best of {a.rounds}:")
    for name in VARIANTS:
        best = min(times[name])
        print(f"  {name:22s} {best * 1e3:7.2f} ms  {default / best:5.2f}x  max |Δparam| vs default after {a.steps} steps: {diffs[name]:.1e}")


if __name__ == "__main__":
    main()
