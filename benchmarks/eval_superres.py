"""PSNR / SSIM of a trained upsampler against bicubic upsampling of the same low-res input.

    .venv/bin/python benchmarks/eval_superres.py --ckpt runs/superres-tiny/checkpoints/last.ckpt \
        --shards 'data/shapes/val-*.tar' --num-images 256

The low-res input is the ground truth downsampled exactly as in training (the module's
`make_low_res`); both the model output and the bicubic baseline are compared with the ground
truth in [0, 1] (torchmetrics, data_range 1). Sampling time per image is wall and process CPU
time of `generate` divided by the number of images. Prints one JSON object (also `--out`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from datamodules.image_text import ImageTextDataModule  # noqa: E402
from datamodules.image_text import LoaderConfig
from modules.core.images import to_unit  # noqa: E402
from modules.diffusion.config import SamplingConfig  # noqa: E402
from modules.stages.superres import SuperResModule, bicubic_upsample  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="SuperResModule checkpoint (EMA weights when trained with EMA)")
    p.add_argument("--shards", default="data/shapes/val-*.tar")
    p.add_argument("--num-images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=None, help="override the module's sampling steps")
    p.add_argument("--aug-level", type=float, default=None, help="override the module's sample_aug_level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return p.parse_args(argv)


def metrics() -> dict[str, Any]:
    return {"psnr": PeakSignalNoiseRatio(data_range=1.0), "ssim": StructuralSimilarityIndexMeasure(data_range=1.0)}


def evaluate(module: SuperResModule, loader: Any, num_images: int, sampling: SamplingConfig,
             aug_level: float | None, seed: int) -> dict[str, Any]:
    """Accumulate PSNR / SSIM for model and bicubic over the first `num_images` images."""
    model_m, bicubic_m = metrics(), metrics()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    seen, wall, cpu = 0, 0.0, 0.0
    for batch in loader:
        image = batch["image"][: num_images - seen]  # (B, 3, H, W) in [-1, 1]
        low = module.make_low_res(image)
        t0, c0 = time.perf_counter(), time.process_time()
        out = module.generate(low, sampling=sampling, aug_level=aug_level, generator=gen)
        wall, cpu = wall + time.perf_counter() - t0, cpu + time.process_time() - c0
        bicubic = bicubic_upsample(low, tuple(image.shape[-2:]))
        truth = to_unit(image)
        for m in model_m.values():
            m.update(to_unit(out), truth)
        for m in bicubic_m.values():
            m.update(to_unit(bicubic), truth)
        seen += image.shape[0]
        if seen >= num_images:
            break
    return {
        "images": seen,
        "model": {k: m.compute().item() for k, m in model_m.items()},
        "bicubic": {k: m.compute().item() for k, m in bicubic_m.items()},
        "sampling_wall_s_per_image": wall / max(seen, 1),
        "sampling_cpu_s_per_image": cpu / max(seen, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    module = SuperResModule.load_from_checkpoint(args.ckpt, map_location="cpu").eval()
    sampling = module.sampling if args.steps is None else dataclasses.replace(module.sampling, steps=args.steps)
    dm = ImageTextDataModule(train_shards=args.shards, val_shards=args.shards, image_size=module.unet.config.image_size, val_samples=args.num_images, tokenizer=None, loader=LoaderConfig(batch_size=args.batch_size, num_workers=0))
    dm.setup("validate")
    result = evaluate(module, dm.val_dataloader(), args.num_images, sampling, args.aug_level, args.seed)
    result.update(
        ckpt=str(args.ckpt), steps=sampling.steps, sampler=sampling.sampler.name,
        aug_level=module.hparams.sample_aug_level if args.aug_level is None else args.aug_level,
        low_res_size=module.hparams.low_res_size, image_size=module.unet.config.image_size,
        threads=torch.get_num_threads(),
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
