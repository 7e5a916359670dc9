"""Prior train step: our `PriorModule` (PriorTransformer) vs dalle2-pytorch `DiffusionPriorNetwork` +
`DiffusionPrior`.

Both at the same width, depth, heads and parameter count (our MLP width is chosen to match the
peer's count, ±5%), 512-d CLIP embeddings, 77 caption-token encodings of width 512 (all real
tokens: the worst case for us, the peer pads every caption to its `max_text_len` = 256 anyway),
batch 64, x_0 prediction with the cosine schedule and 10% caption dropout, AdamW (same settings on
both sides). A step is forward + backward + optimizer step; the result is embeddings/s.

    python -m benchmarks.bench_prior --side ours --match-params 24918544
    .venv-bench/bin/python -m benchmarks.bench_prior --side theirs
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.harness import Built, Side


@dataclass
class Sizes:
    embed_dim: int  # D = the peer's model width (it requires text encodings of width D too)
    depth: int
    heads: int
    batch: int
    text_len: int
    clip_model: str  # an open_clip config with embed_dim = text width = D, for our module


def sizes(tiny: bool) -> Sizes:
    """The peer's README prior (dim 512, depth 6, 8 heads of 64) at 512-d embeddings; or tiny."""
    return Sizes(64, 2, 2, 4, 8, "tiny-vit") if tiny else Sizes(512, 6, 8, 64, 77, "ViT-B-32")


# ------------------------------------------------------------------------------ parameter matching
def our_prior_config(hidden: int, tiny: bool) -> Any:
    from modules.networks.prior_transformer import PriorConfig

    sz = sizes(tiny)
    return PriorConfig(embed_dim=sz.embed_dim, text_width=sz.embed_dim, width=sz.embed_dim, depth=sz.depth,
                       heads=sz.heads, mlp_ratio=hidden / sz.embed_dim, max_text_len=max(77, sz.text_len))


def count_prior_params(config: Any) -> int:
    from modules.networks.prior_transformer import PriorTransformer, count_parameters

    with torch.device("meta"):
        return count_parameters(PriorTransformer(config))


def match_mlp_hidden(target: int, tiny: bool = False, step: int = 64) -> tuple[int, int]:
    """(MLP hidden width, params): the multiple of `step` closest to `target` params at the peer's
    width, depth and heads (the peer's SwiGLU MLP and multi-query attention split the same budget
    differently)."""
    best: tuple[float, int, int] | None = None
    width = sizes(tiny).embed_dim
    for hidden in range(step, 16 * width + step, step):
        n = count_prior_params(our_prior_config(hidden, tiny))
        gap = abs(n / target - 1)
        if best is None or gap < best[0]:
            best = (gap, hidden, n)
        if n > target:
            break
    assert best is not None
    return best[1], best[2]


def inputs(tiny: bool, batch: int, seed: int, device: torch.device, real_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """Unit-norm z_i, z_t and caption encodings (B, 77, D) whose first `real_tokens` positions are
    real (all by default) and the rest zero padding, as CLIP's masked token encodings."""
    sz = sizes(tiny)
    g = torch.Generator().manual_seed(seed)
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g), dim=-1).to(device)  # noqa: E731
    mask = torch.arange(sz.text_len) < (sz.text_len if real_tokens is None else real_tokens)  # (L,)
    tokens = torch.randn(batch, sz.text_len, sz.embed_dim, generator=g) * mask[:, None]
    return {"image_embed": unit(batch, sz.embed_dim), "text_embed": unit(batch, sz.embed_dim),
            "text_tokens": tokens.to(device), "text_mask": mask.expand(batch, -1).to(device)}


# ------------------------------------------------------------------------------ the two sides
def build_ours(args: argparse.Namespace, device: torch.device) -> Built:
    from modules.diffusion.config import Clipping, SamplingConfig
    from modules.stages.prior import PriorModule

    sz = sizes(args.tiny)
    hidden = args.mlp_hidden or 4 * sz.embed_dim
    if args.match_params:
        hidden, _ = match_mlp_hidden(args.match_params, args.tiny)
    config = our_prior_config(hidden, args.tiny)
    module = PriorModule(prior=config, clip_model=sz.clip_model).to(device)
    harness.maybe_compile(module.net, args.compile)
    batch = inputs(args.tiny, sz.batch, args.seed, device, args.caption_tokens)
    opt = harness.make_optimizer(module.net.parameters(), args.fused_adam)
    train_step = harness.train_step_fn(lambda: module.training_step(batch, 0), opt, device, args.dtype)

    def sample(steps: int, guidance: float, gen: torch.Generator | None) -> torch.Tensor:
        cond = inputs(args.tiny, args.sample_batch, args.seed + 1, device, args.caption_tokens)
        cfg = SamplingConfig(steps=steps, guidance_scale=guidance, clipping=Clipping.NONE)
        with harness.autocast(device, args.dtype):
            return module.generate(cond, num_candidates=2, sampling=cfg, generator=gen)

    module.train()
    return Built(sum(p.numel() for p in module.net.parameters()), train_step, sample, dataclasses.asdict(config))


def build_theirs(args: argparse.Namespace, device: torch.device) -> Built:
    from dalle2_pytorch import DiffusionPrior, DiffusionPriorNetwork

    sz = sizes(args.tiny)
    config = dict(dim=sz.embed_dim, depth=sz.depth, dim_head=sz.embed_dim // sz.heads, heads=sz.heads)
    net = DiffusionPriorNetwork(**config)
    prior = DiffusionPrior(net=net, image_embed_dim=sz.embed_dim, timesteps=1000, cond_drop_prob=0.1,
                           condition_on_text_encodings=True).to(device)
    harness.maybe_compile(net, args.compile)
    batch = inputs(args.tiny, sz.batch, args.seed, device, args.caption_tokens)
    opt = harness.make_optimizer(net.parameters(), args.fused_adam)
    train_step = harness.train_step_fn(  # the peer scales image_embed in place: give it a copy
        lambda: prior(text_embed=batch["text_embed"], image_embed=batch["image_embed"].clone(),
                      text_encodings=batch["text_tokens"]), opt, device, args.dtype)

    def sample(steps: int, guidance: float, gen: torch.Generator | None) -> torch.Tensor:
        """`DiffusionPrior.sample` without its CLIP: 2 candidates per caption, best by z_i·z_t."""
        cond = inputs(args.tiny, args.sample_batch, args.seed + 1, device, args.caption_tokens)
        text_cond = {"text_embed": cond["text_embed"].repeat_interleave(2, 0),
                     "text_encodings": cond["text_tokens"].repeat_interleave(2, 0)}
        with harness.autocast(device, args.dtype):
            z = prior.p_sample_loop((2 * args.sample_batch, sz.embed_dim), text_cond=text_cond,
                                    timesteps=steps, cond_scale=guidance)
        z = F.normalize(z.float(), dim=-1).view(args.sample_batch, 2, -1)
        best = torch.einsum("bnd,bd->bn", z, cond["text_embed"]).argmax(1)
        return z[torch.arange(args.sample_batch, device=device), best]

    prior.train()
    return Built(sum(p.numel() for p in net.parameters()), train_step, sample, config)


def build(args: argparse.Namespace, device: torch.device) -> Built:
    return build_ours(args, device) if args.side is Side.OURS else build_theirs(args, device)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--match-params", type=int, default=None, help="ours: size the MLP to this many parameters")
    parser.add_argument("--mlp-hidden", type=int, default=None, help="ours, without --match-params (default 4·width)")
    parser.add_argument("--fused-adam", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--caption-tokens", type=int, default=None,
                        help="real tokens per caption, the rest of the 77 positions padding (default: all 77)")
    parser.add_argument("--sample-batch", type=int, default=4, help="captions per sampling run (2 candidates each)")
    parser.add_argument("--count-only", action="store_true", help="report the parameter count and exit")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args = harness.add_common_arguments(add_arguments(parser), steps=3, warmup=1).parse_args(argv)
    device, memory = harness.start(args)
    sz = sizes(args.tiny)
    harness.emit(harness.train_benchmark(args, build(args, device), device, memory, bench="prior_train",
                                         unit="embeddings/s", batch=sz.batch, text_len=sz.text_len,
                                         caption_tokens=args.caption_tokens or sz.text_len))


if __name__ == "__main__":
    main()
