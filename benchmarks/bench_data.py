"""Is the image loader ever the bottleneck? Decode + augment throughput of one `ImageTextDataModule`
worker against the rate at which the decoder consumes images, at the tiny and the paper settings.

- tiny: the built-in shapes shards (64 px PNG) loaded at 32 px, batch 32, consumed by the tiny
  decoder of `experiments/decoder/tiny.yaml` (tiny-vit widths) — a train step timed here.
- paper: 256 px JPEG photos-like shards (img2dataset's usual output) loaded at 64 px, consumed by
  the paper's decoder (DESIGN.md: 512 channels, mults 1,2,3,4, 3 res blocks, attention at
  32/16/8, ViT-H widths). It cannot train on a CPU, so its consumption is its FLOPs per image
  (counted on the meta device) divided by (a) the FLOP/s a 64 px decoder step achieves on this
  core and (b) a reference accelerator (`--accelerator-tflops` x `--mfu`, default an H100's dense
  bf16 989 TFLOP/s at 40% MFU — an assumption, stated in the output).

One worker is measured in-process (`num_workers=0`), wall and CPU time; the ratio is images/s per
worker over images/s consumed (> 1: one worker keeps up), and `workers_needed` rounds up its inverse.

    python -m benchmarks.bench_data [--threads 1]
"""

from __future__ import annotations

import argparse
import io
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from benchmarks import harness

TINY_UNET = dict(image_size=32, model_channels=48, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(8,),
                 num_head_channels=32, image_embed_dim=64, text_embed_dim=64)
PAPER_UNET = dict(image_size=64, model_channels=512, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                  attention_resolutions=(32, 16, 8), num_head_channels=64, image_embed_dim=1024, text_embed_dim=1024)


def write_photo_shards(out: Path, count: int, size: int = 256, seed: int = 0) -> str:
    """`count` smooth-noise RGB JPEGs (quality 95) with captions, one WebDataset shard."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    with wds.ShardWriter(str(out / "photo-%06d.tar"), maxcount=count, verbose=0) as sink:
        for i in range(count):
            noise = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
            image = Image.fromarray(noise).resize((size, size), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=95)
            sink.write({"__key__": f"{i:06d}", "jpg": buf.getvalue(), "txt": f"a photo number {i}".encode()})
    return str(out / "photo-000000.tar")


def write_shapes_shards(out: Path, count: int) -> str:
    from datamodules.shapes.dataset import ShapesConfig, write_shapes_dataset

    write_shapes_dataset(ShapesConfig(num_samples=count, size=64, shard_size=count, val_fraction=0.0), out, workers=1)
    return str(out / "train-*.tar")


def loader_rate(shards: str, image_size: int, batch: int, images: int) -> dict[str, float]:
    """Images/s of one loader worker (in-process), by wall clock and by CPU time."""
    from datamodules.image_text import ImageTextDataModule, LoaderConfig

    dm = ImageTextDataModule(train_shards=shards, image_size=image_size, resampled=True, epoch_samples=images, shuffle_buffer=100, tokenizer="ViT-B-32", loader=LoaderConfig(batch_size=batch, num_workers=0))
    dm.setup("fit")
    seen, it = 0, iter(dm.train_dataloader())
    next(it)  # open the shard, warm the tokenizer
    c0, w0 = time.process_time(), time.perf_counter()
    for batch_ in it:
        seen += batch_["image"].shape[0]
        if seen >= images:
            break
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {"images": seen, "images_per_s": seen / wall, "images_per_cpu_s": seen / max(cpu, 1e-9)}


def unet_flops_per_image(config: dict[str, Any], text_len: int = 16) -> int:
    """Forward + backward FLOPs of one image, counted on the meta device (nothing is allocated)."""
    from modules.networks.unet import UNet, UNetConfig

    with torch.device("meta"):
        net, s = UNet(UNetConfig(**config)), config["image_size"]
        x, t = torch.randn(1, 3, s, s), torch.zeros(1, dtype=torch.long)
        kw = dict(image_embed=torch.randn(1, config["image_embed_dim"]), text_tokens=torch.randn(1, text_len, config["text_embed_dim"]),
                  text_mask=torch.ones(1, text_len, dtype=torch.bool))
        with harness.flop_counter() as counter:
            net(x, t, **kw).sum().backward()
    return int(counter.get_total_flops())


def tiny_decoder_rate(batch: int, steps: int) -> dict[str, float]:
    """Images/s of the tiny decoder's train step (forward, backward, AdamW) on this core."""
    from modules.diffusion.config import DiffusionConfig
    from modules.networks.unet import UNet, UNetConfig

    torch.manual_seed(0)
    net, diffusion = UNet(UNetConfig(**TINY_UNET)), DiffusionConfig().build()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    x0, L = torch.rand(batch, 3, 32, 32) * 2 - 1, 16
    kw = dict(image_embed=torch.randn(batch, 64), text_tokens=torch.randn(batch, L, 64), text_mask=torch.ones(batch, L, dtype=torch.bool))

    def step() -> None:
        t = diffusion.sample_timesteps(batch, device=x0.device)
        loss = diffusion.training_losses(net, x0, t, model_kwargs=kw)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    timing = harness.time_steps(step, steps=steps, warmup=1, device=torch.device("cpu"))
    return {"images_per_s": batch / timing["wall_s"], "images_per_cpu_s": batch / timing["cpu_s"]}


def compare(loader: dict[str, float], consumer_cpu: float, label: str) -> dict[str, Any]:
    ratio = loader["images_per_cpu_s"] / consumer_cpu
    return {"consumer": label, "consumed_images_per_s": consumer_cpu, "loader_images_per_s_per_worker": loader["images_per_cpu_s"],
            "ratio": ratio, "workers_needed": max(1, math.ceil(1 / ratio))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--images", type=int, default=512, help="images decoded per setting")
    parser.add_argument("--decoder-flops", type=float, default=None,
                        help="FLOP/s a decoder train step achieves per CPU-second here (run_all passes the 64 px "
                             "decoder's; default: the tiny decoder's, measured here)")
    parser.add_argument("--accelerator-tflops", type=float, default=989.0, help="reference accelerator peak (bf16 dense)")
    parser.add_argument("--mfu", type=float, default=0.4, help="reference accelerator's model FLOPs utilisation")
    parser.add_argument("--accelerator-label", default=None,
                        help="what the accelerator figures are (default: the reference's, assumed)")
    parser.add_argument("--tiny", action="store_true", help="few images (tests)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    harness.quiet_warnings()
    images = 64 if args.tiny else args.images
    result: dict[str, Any] = {"bench": "data", "threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        shapes = write_shapes_shards(Path(tmp) / "shapes", images + 64)
        photos = write_photo_shards(Path(tmp), images + 64)
        tiny_loader = loader_rate(shapes, 32, 32, images)
        paper_loader = loader_rate(photos, 64, 32, images)
    tiny_consumer = tiny_decoder_rate(32, 1 if args.tiny else 3)
    achieved = args.decoder_flops or tiny_consumer["images_per_cpu_s"] * unet_flops_per_image(TINY_UNET)
    paper_flops = unet_flops_per_image(PAPER_UNET)
    gpu_rate = args.accelerator_tflops * 1e12 * args.mfu / paper_flops
    result["tiny"] = {"loader": tiny_loader, **compare(tiny_loader, tiny_consumer["images_per_cpu_s"], "tiny decoder, this core")}
    result["paper"] = {"loader": paper_loader, "flops_per_image": paper_flops,
                       "decoder_flops_per_cpu_s": achieved,
                       "this_core": compare(paper_loader, achieved / paper_flops, "paper decoder, this core"),
                       "accelerator": compare(paper_loader, gpu_rate, f"paper decoder, {args.accelerator_tflops:.0f} TFLOP/s "
                                                                      f"at {args.mfu:.0%} MFU ({args.accelerator_label or 'assumed'})")}
    harness.emit(result)
    for name, row in (("tiny", result["tiny"]), ("paper/this core", result["paper"]["this_core"]),
                      ("paper/accelerator", result["paper"]["accelerator"])):
        print(f"{name:<18} loader {row['loader_images_per_s_per_worker']:8.1f} img/s/worker  consumer "
              f"{row['consumed_images_per_s']:10.3f} img/s  ratio {row['ratio']:9.2f}  workers needed {row['workers_needed']}")


if __name__ == "__main__":
    main()
