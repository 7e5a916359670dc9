"""Decoder train step: our `DecoderModule` (GLIDE/ADM U-Net) vs dalle2-pytorch `Unet` + `Decoder`.

Both at the same parameter count (ours is sized to the peer's count, ±5%), 64 px, batch 8,
conditioned on a 512-d CLIP image embedding (no caption tokens), ε-prediction with the cosine
schedule and CFG dropout of the image embedding, AdamW (same settings on both sides). A step is
forward + backward + optimizer step; the result is images/s, CPU seconds per step, peak memory and
the FLOPs of one step (torch's FlopCounterMode), so achieved FLOP/s can be compared with
`matmul_peak.py`.

    python -m benchmarks.bench_decoder --side ours --match-params 14245251
    .venv-bench/bin/python -m benchmarks.bench_decoder --side theirs
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks import harness
from benchmarks.harness import Built, Side

EMBED_DIM = 512
# The peer's README decoder layout (dim_mults 1,2,4,8; cond_dim = dim), scaled by `dim`.
PEER_DIM, PEER_DIM_TINY = 32, 8
# Our layouts; model_channels is chosen to match the peer's parameter count.
LAYOUTS = {
    # the paper's (DESIGN.md: ADM mults 1,2,3,4, attention at 32/16/8 px, 64 channels per head), 2 res blocks
    "paper": dict(channel_mult=(1, 2, 3, 4), num_res_blocks=2, attention_resolutions=(32, 16, 8), num_head_channels=64),
    # Imagen's Efficient U-Net (Saharia et al. 2022, App. B.1) on the peer's mults: res blocks moved to the
    # low resolutions (1, 2, 2, 4), attention at 16/8 px only, up-convs before the upsampling. The same
    # parameters cost fewer FLOPs.
    "efficient": dict(channel_mult=(1, 2, 4, 8), num_res_blocks=(1, 2, 2, 4), attention_resolutions=(16, 8), num_head_channels=64,
                      conv_before_upsample=True),
    # the same with Imagen's downsampling before any 64 px res block (0, 2, 2, 4): 7% fewer FLOPs per step;
    # selectable, not a benchmark row (compare_layouts.py results: benchmarks/README.md)
    "efficient-top0": dict(channel_mult=(1, 2, 4, 8), num_res_blocks=(0, 2, 2, 4), attention_resolutions=(16, 8),
                           num_head_channels=64, conv_before_upsample=True),
    # the same as "efficient" with self-attention at 8 px only (where the peer has its one self-attention
    # layer, in the middle): no 256-token attention at 16 px
    "efficient-attn8": dict(channel_mult=(1, 2, 4, 8), num_res_blocks=(1, 2, 2, 4), attention_resolutions=(8,),
                            num_head_channels=64, conv_before_upsample=True),
}
TINY_LAYOUT = dict(channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), num_head_channels=16)


@dataclass
class Sizes:
    image_size: int
    batch: int
    peer_dim: int


def sizes(tiny: bool) -> Sizes:
    return Sizes(16, 2, PEER_DIM_TINY) if tiny else Sizes(64, 8, PEER_DIM)


def train_batch(args: argparse.Namespace) -> int:
    """`--batch`, else the size's default (8; 2 with --tiny)."""
    return args.batch or sizes(args.tiny).batch


# ------------------------------------------------------------------------------ parameter matching
def our_unet_config(model_channels: int, tiny: bool, layout: str = "paper", **overrides: Any) -> Any:
    from modules.networks.unet import UNetConfig

    kwargs = dict(image_size=sizes(tiny).image_size, model_channels=model_channels, image_embed_dim=EMBED_DIM,
                  **(TINY_LAYOUT if tiny else LAYOUTS[layout]))
    return UNetConfig(**{**kwargs, **overrides})


def count_unet_params(config: Any) -> int:
    """Parameters of a UNet built on the meta device (no memory, milliseconds)."""
    from modules.networks.unet import UNet

    with torch.device("meta"):
        return UNet(config).num_parameters()


def match_model_channels(target: int, tiny: bool = False, step: int = 8, layout: str = "paper", **overrides: Any) -> tuple[int, int]:
    """(model_channels, params): the multiple of `step` whose U-Net is closest to `target` params."""
    best: tuple[float, int, int] | None = None
    for channels in range(step, 1024 + step, step):
        try:
            n = count_unet_params(our_unet_config(channels, tiny, layout, **overrides))
        except ValueError:  # widths whose attention layers do not split into whole heads
            continue
        gap = abs(n / target - 1)
        if best is None or gap < best[0]:
            best = (gap, channels, n)
        if n > target:  # the count grows with the width: no better width beyond this one
            break
    assert best is not None
    return best[1], best[2]


# ------------------------------------------------------------------------------ the two sides
def unit_embeds(batch: int, seed: int, device: torch.device) -> torch.Tensor:
    """(batch, 512) random unit-norm CLIP image embeddings."""
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(batch, EMBED_DIM, generator=g), dim=-1).to(device)


def build_ours(args: argparse.Namespace, device: torch.device) -> Built:
    from modules.stages.decoder import DecoderModule
    from modules.diffusion.config import SamplingConfig

    sz = sizes(args.tiny)
    channels = args.model_channels
    if args.match_params:
        channels, _ = match_model_channels(args.match_params, args.tiny, layout=args.layout)
    unet = our_unet_config(channels, args.tiny, args.layout, use_checkpoint=args.checkpoint,
                           channels_last=args.channels_last, recompute_norms=args.recompute_norms)
    module = DecoderModule(unet=unet, clip_model="ViT-B-32", condition_on_text=False).to(device)
    harness.maybe_compile(module.unet, args.compile)
    g = torch.Generator().manual_seed(args.seed)
    B = train_batch(args)
    batch = {
        "image": torch.rand(B, 3, sz.image_size, sz.image_size, generator=g).mul(2).sub(1).to(device),
        "image_embed": unit_embeds(B, args.seed, device),
        # unused (condition_on_text=False) but the conditioner reads a complete embedding batch
        "text_embed": torch.zeros(B, EMBED_DIM, device=device),
        "text_tokens": torch.zeros(B, 1, EMBED_DIM, device=device),
        "text_mask": torch.ones(B, 1, dtype=torch.bool, device=device),
    }

    opt = harness.make_optimizer(module.unet.parameters(), args.fused_adam)
    train_step = harness.train_step_fn(lambda: module.training_step(batch, 0), opt, device, args.dtype)

    def sample(steps: int, guidance: float, gen: torch.Generator | None) -> torch.Tensor:
        cond = module.unet_kwargs({"image_embed": unit_embeds(args.sample_batch, args.seed + 1, device)})
        with harness.autocast(device, args.dtype):
            return module.generate(cond, sampling=SamplingConfig(steps=steps, guidance_scale=guidance), generator=gen)

    module.train()
    return Built(module.unet.num_parameters(), train_step, sample, dataclasses.asdict(unet))


def build_theirs(args: argparse.Namespace, device: torch.device) -> Built:
    from dalle2_pytorch import Decoder, Unet

    sz = sizes(args.tiny)
    config = dict(dim=sz.peer_dim, image_embed_dim=EMBED_DIM, cond_dim=sz.peer_dim, channels=3,
                  dim_mults=(1, 2, 4, 8), cond_on_image_embeds=True, cond_on_text_encodings=False,
                  checkpoint_during_training=args.checkpoint)
    decoder = Decoder(unet=Unet(**config), image_size=sz.image_size, timesteps=1000, learned_variance=False,
                      image_cond_drop_prob=0.1, text_cond_drop_prob=0.5, sample_timesteps=50).to(device)
    network = decoder.unets[0]
    if args.channels_last:
        network.to(memory_format=torch.channels_last)
    harness.maybe_compile(network, args.compile)
    g = torch.Generator().manual_seed(args.seed)
    B = train_batch(args)
    images = torch.rand(B, 3, sz.image_size, sz.image_size, generator=g).to(device)  # [0, 1]: it normalises
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    embeds = unit_embeds(B, args.seed, device)

    opt = harness.make_optimizer(network.parameters(), args.fused_adam)
    train_step = harness.train_step_fn(lambda: decoder(images, image_embed=embeds), opt, device, args.dtype)

    def sample(steps: int, guidance: float, gen: torch.Generator | None) -> torch.Tensor:
        decoder.sample_timesteps = (steps,)  # < 1000: its DDIM sampler (η = 0)
        with harness.autocast(device, args.dtype):
            return decoder.sample(image_embed=unit_embeds(args.sample_batch, args.seed + 1, device), cond_scale=guidance)

    decoder.train()
    return Built(sum(p.numel() for p in network.parameters()), train_step, sample, config)


def build(args: argparse.Namespace, device: torch.device) -> Built:
    return build_ours(args, device) if args.side is Side.OURS else build_theirs(args, device)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--match-params", type=int, default=None, help="ours: size the U-Net to this many parameters")
    parser.add_argument("--model-channels", type=int, default=48, help="ours, without --match-params")
    parser.add_argument("--layout", choices=list(LAYOUTS), default="paper", help="ours: U-Net layout (not with --tiny)")
    parser.add_argument("--fused-adam", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--checkpoint", action="store_true", help="gradient checkpointing, both sides")
    parser.add_argument("--recompute-norms", action="store_true",
                        help="ours: recompute GroupNorm+SiLU in backward instead of storing (memory for time)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                        help="NHWC weights and activations, both sides")
    parser.add_argument("--batch", type=int, default=None, help="train batch, both sides (default 8; 2 with --tiny)")
    parser.add_argument("--sample-batch", type=int, default=4, help="images per sampling run")
    parser.add_argument("--count-only", action="store_true", help="report the parameter count and exit")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args = harness.add_common_arguments(add_arguments(parser), steps=5, warmup=2).parse_args(argv)
    device, memory = harness.start(args)
    sz = sizes(args.tiny)
    harness.emit(harness.train_benchmark(args, build(args, device), device, memory, bench="decoder_train",
                                         unit="images/s", batch=train_batch(args), image_size=sz.image_size))


if __name__ == "__main__":
    main()
