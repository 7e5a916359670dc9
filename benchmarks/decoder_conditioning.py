"""The demo decoder's training step with the frozen CLIP run on every batch against the same step on
the embeddings `unclip embed` exported, side by side in one process (interleaved rounds, median
of each).

A decoder batch either carries raw images and caption tokens, which the frozen CLIP encodes inside
the step (under the step's bf16 autocast), or the exported z_i, caption token encodings and mask
(`datamodules.embeddings.ImageEmbeddingDataModule`), which skip that encoder. Both cases run the
whole `training_step` (conditioning, CFG dropout, U-Net forward), the backward pass and an AdamW
step of the demo overlay's U-Net (experiments/demo/decoder.yaml) on the same 32 shapes samples.

    python -m benchmarks.decoder_conditioning [--threads 2] [--rounds 7] [--batch 32]
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

import numpy as np
import open_clip
import torch
from torchvision.transforms.functional import to_tensor

from benchmarks.cpu_bf16 import build, demo_width
from benchmarks.harness import interleaved_rounds, print_medians
from datamodules.shapes.grammar import describe
from datamodules.shapes.dataset import render_sample
from modules.stages.conditioning import CONDITION_KEYS


def shapes_batch(batch: int, size: int, seed: int = 0) -> dict[str, Any]:
    """`batch` shapes samples at the decoder's size: images in [-1, 1] and tokenized captions."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for _ in range(batch):
        image, truth = render_sample(rng, size)
        images.append(to_tensor(image) * 2 - 1)
        captions.append(describe(truth))
    return {"image": torch.stack(images), "tokens": open_clip.get_tokenizer("tiny-vit")(captions)}


def step_fn(module: torch.nn.Module, batch: dict[str, Any]) -> Callable[[], None]:
    """One optimizer step of `module` on `batch` under bf16 autocast (the demo's bf16-mixed)."""
    opt = torch.optim.AdamW(module.unet.parameters(), lr=1e-3)

    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module.training_step(batch, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batch", type=int, default=32)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    width = demo_width()
    module = build("nchw", **width)
    module.log = lambda *args, **kwargs: None  # no Trainer attached
    raw = shapes_batch(a.batch, module.unet.config.image_size)
    with torch.no_grad():  # what `unclip embed` exports: the frozen CLIP in fp32, outside autocast
        exported = {**raw, **module.conditioner(raw)}
    assert all(k in exported for k in CONDITION_KEYS)
    cases = {"frozen CLIP in the step": step_fn(module, raw), "exported embeddings": step_fn(module, exported)}
    times = interleaved_rounds(cases, a.rounds, warmup=2)  # warm-up: oneDNN primitive creation, allocator
    print(f"demo decoder training step ({width['model_channels']} base channels, batch {a.batch}, bf16 autocast, {a.threads} threads), "
          f"median of {a.rounds} interleaved rounds (ms) [min, max]:")
    first, second = print_medians({name: [x * 1e3 for x in t] for name, t in times.items()}).values()
    print(f"  exported / on the fly: {second / first:.3f} (step {first / second:.2f}x faster on exported embeddings)")


if __name__ == "__main__":
    main()
