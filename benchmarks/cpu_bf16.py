"""bf16 autocast against fp32 for one training step of the demo's decoder, side by side in one
process (interleaved rounds, best of each), on the CPU this runs on.

The demo trains its decoder under `precision: bf16-mixed` because oneDNN runs bf16 convolutions
on AMX / AVX512-BF16 units; this prints the ratio on the machine at hand.

    python -m benchmarks.cpu_bf16 [--threads 2] [--rounds 5] [--batch 32]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import open_clip
import torch
import yaml

from modules.stages.decoder import DecoderModule

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = yaml.safe_load((ROOT / "experiments/decoder/tiny.yaml").read_text())["model"]["init_args"]
    module = DecoderModule(**cfg)
    size = module.unet.config.image_size
    batch = {"image": torch.rand(a.batch, 3, size, size) * 2 - 1,
             "tokens": open_clip.get_tokenizer("tiny-vit")(["a red circle to the left of a blue square"] * a.batch)}
    opt = torch.optim.AdamW(module.unet.parameters(), 1e-3)
    cond = module.condition(batch, drop=True)

    def step(bf16: bool) -> float:
        start = time.perf_counter()
        t = module.diffusion.sample_timesteps(a.batch, device=batch["image"].device)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = module.diffusion.training_losses(module.unet, batch["image"], t, model_kwargs=cond)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    step(False), step(True)  # warm-up (oneDNN primitive creation)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(a.rounds):
        for bf16 in (False, True):
            times[bf16].append(step(bf16))
    fp32, bf16 = min(times[False]), min(times[True])
    print(f"decoder train step, batch {a.batch}, {a.threads} threads, best of {a.rounds}: "
          f"fp32 {fp32 * 1e3:.0f} ms, bf16 autocast {bf16 * 1e3:.0f} ms, ratio {fp32 / bf16:.2f}x")


if __name__ == "__main__":
    main()
