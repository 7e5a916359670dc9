"""`unclip pipeline|generate|vary|interpolate|textdiff`: build a pipeline directory and use it.

Outputs follow one convention: `{prompt_index:03d}_{image_index:02d}.png` at the final
resolution, a `grid.png`, and a JSON file that maps indices to their inputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

from modules.cli.args import Parser, count, output_dir, real
from modules.core.errors import UserError


def load_pipeline(path: str):
    """A pipeline directory on the GPU when there is one; a bad one raises `PipelineError`, a
    `UserError` (one line, exit 2)."""
    import torch

    from modules.pipelines.unclip import UnCLIPPipeline

    return UnCLIPPipeline.load(path, "cuda" if torch.cuda.is_available() else "cpu")


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        f = Path(args.prompts_file)
        if not f.is_file():
            raise UserError(f"prompts file not found: {f}")
        prompts += [line.strip() for line in f.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserError("no prompt given (use --prompt TEXT or --prompts-file FILE)")
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise UserError(f"prompt {empty[0]} is empty")
    return prompts


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", required=True, help="pipeline directory (unclip pipeline ...)")
    parser.add_argument("--out", required=True, type=output_dir, help="output directory")
    parser.add_argument("--seed", type=count(0, 2**63 - 1), default=0)
    parser.add_argument("--steps", type=count(1, 1000), default=50, help="DDIM steps of the decoder")


def assemble(argv: list[str]) -> int:
    from modules.pipelines.unclip import UnCLIPPipeline

    p = Parser(prog="unclip pipeline", description="Assemble stage checkpoints into a pipeline directory.")
    p.add_argument("--clip-model", required=True)
    p.add_argument("--clip-weights", default=None, help="CLIP weights file or CLIP-stage checkpoint")
    p.add_argument("--prior", default=None, help="prior stage checkpoint")
    p.add_argument("--prior-class", default="modules.stages.prior.PriorModule")
    p.add_argument("--decoder", required=True, help="decoder stage checkpoint")
    p.add_argument("--upsampler", action="append", default=[], help="upsampler checkpoint (repeat, low to high)")
    p.add_argument("--layout", default=None, help="layout stage checkpoint (for a decoder trained with layouts)")
    p.add_argument("--out", required=True, type=output_dir)
    a = p.parse_args(argv)
    # PipelineError (a UserError) and FileNotFoundError are reported by `unclip` as one line.
    pipe = UnCLIPPipeline.from_checkpoints(a.clip_model, a.clip_weights, a.decoder, a.prior, a.upsampler, a.prior_class,
                                           a.layout)
    print(f"pipeline written to {pipe.save(a.out)}")
    return 0


def generate(argv: list[str]) -> int:
    from modules.core.images import save_images
    from modules.pipelines.unclip import GenerateConfig, PriorMode

    p = Parser(prog="unclip generate", description="Text to image with a pipeline directory.")
    _common(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="one prompt per line")
    p.add_argument("--num-images", type=count(1, 1024), default=4)
    p.add_argument("--decoder-guidance", type=real(0.0, 100.0), default=None)
    p.add_argument("--decoder-text-guidance", type=real(0.0, 100.0), default=None,
                   help="nested guidance: the caption's own scale; --decoder-guidance then weighs z_i alone")
    p.add_argument("--decoder-layout-guidance", type=real(0.0, 100.0), default=None,
                   help="nested guidance: the layout plan's own scale (a layout pipeline)")
    p.add_argument("--prior-guidance", type=real(0.0, 100.0), default=None)
    p.add_argument("--no-prior", action="store_true", help="feed z_t to the decoder (ablation)")
    p.add_argument("--decoder-candidates", type=count(1, 64), default=1,
                   help="decoder samples per image, the best by CLIP score kept (default 1: no reranking)")
    a = p.parse_args(argv)
    prompts = _read_prompts(a)
    pipe = load_pipeline(a.pipeline)
    dec = pipe.decoder.sampling  # the decoder's own sampling, with the flags' overrides
    guidance = a.decoder_guidance if a.decoder_guidance is not None else dec.guidance_scale
    own = {name: value for name, value in (("text_guidance_scale", a.decoder_text_guidance),
                                           ("layout_guidance_scale", a.decoder_layout_guidance)) if value is not None}
    cfg = GenerateConfig(
        prior_mode=PriorMode.TEXT if a.no_prior else PriorMode.PRIOR,
        decoder_sampling=dataclasses.replace(dec, steps=a.steps, guidance_scale=guidance, **own),
        decoder_candidates=a.decoder_candidates,
        prior_sampling=pipe.prior_sampling(**({} if a.prior_guidance is None else {"guidance_scale": a.prior_guidance})),
    )
    images = pipe.generate(prompts, a.num_images, seed=a.seed, config=cfg)
    out = Path(a.out)
    save_images(images, out, a.num_images)
    (out / "prompts.json").write_text(json.dumps({f"{i:03d}": t for i, t in enumerate(prompts)}, indent=2))
    print(f"{len(images)} images of {images.shape[-1]} px written to {out}")
    return 0


def vary(argv: list[str]) -> int:
    import torch

    from modules.core.images import load_image, save_images, to_unit
    from modules.pipelines import manipulations

    p = Parser(prog="unclip vary", description="Variations of images (paper §3.1).")
    _common(p)
    p.add_argument("--image", action="append", required=True)
    p.add_argument("--num-images", type=count(1, 1024), default=4)
    p.add_argument("--eta", type=real(0.0, 1.0), default=0.8)
    a = p.parse_args(argv)
    loaded = [load_image(i) for i in a.image]
    pipe = load_pipeline(a.pipeline)
    images = torch.cat([to_unit(manipulations.to_decoder_input(pipe, im)) for im in loaded])
    out = manipulations.variations(pipe, images, a.num_images, a.eta, a.steps, seed=a.seed)
    save_images(out, Path(a.out), a.num_images)
    _, err = manipulations.reconstruction_error(pipe, images, a.steps)
    (Path(a.out) / "inputs.json").write_text(json.dumps({"images": a.image, "eta": a.eta, "inversion_mae": err}, indent=2))
    print(f"variations written to {a.out} (DDIM inversion round-trip mean |error| {err:.4f})")
    return 0


def _manipulation_guidance(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guidance-scale", type=real(0.0, 100.0), default=None,
                   help="decoder guidance on z_i (default: the decoder's own sampling scale)")


def interpolate(argv: list[str]) -> int:
    from modules.core.images import load_image, save_images
    from modules.pipelines import manipulations

    p = Parser(prog="unclip interpolate", description="Interpolate between two images (§3.2).")
    _common(p)
    p.add_argument("--image", action="append", required=True, help="exactly two images")
    p.add_argument("--num-images", type=count(1, 1024), default=5)
    p.add_argument("--latent", choices=manipulations.INTERPOLATION_LATENTS, default="inverted",
                   help="decoder latent: the two images' DDIM inversions slerped (endpoints reconstruct them), "
                        "or one random x_T for the row (paper §3.2's two options)")
    _manipulation_guidance(p)
    a = p.parse_args(argv)
    if len(a.image) != 2:
        raise UserError("--image must be given exactly twice")
    pipe = load_pipeline(a.pipeline)
    out = manipulations.interpolate(pipe, load_image(a.image[0]), load_image(a.image[1]), a.num_images, a.steps,
                                    guidance_scale=a.guidance_scale, seed=a.seed, latent=a.latent)
    save_images(out, Path(a.out), a.num_images)
    (Path(a.out) / "inputs.json").write_text(json.dumps(
        {"images": a.image, "latent": a.latent, "guidance_scale": a.guidance_scale}, indent=2))
    return 0


def textdiff(argv: list[str]) -> int:
    from modules.core.images import load_image, save_images
    from modules.pipelines import manipulations

    p = Parser(prog="unclip textdiff", description="Text diffs (§3.3).")
    _common(p)
    p.add_argument("--image", required=True)
    p.add_argument("--base-caption", required=True)
    p.add_argument("--caption", required=True)
    p.add_argument("--num-images", type=count(1, 1024), default=5)
    p.add_argument("--max-theta", type=real(0.0, 1.0), default=0.5, help="the last frame's slerp angle (paper: 0.5)")
    _manipulation_guidance(p)
    a = p.parse_args(argv)
    if not a.base_caption.strip() or not a.caption.strip():
        raise UserError("captions must not be empty")
    pipe = load_pipeline(a.pipeline)
    out = manipulations.text_diff(pipe, load_image(a.image), a.base_caption, a.caption, a.num_images, a.max_theta, a.steps,
                                  guidance_scale=a.guidance_scale, seed=a.seed)
    save_images(out, Path(a.out), a.num_images)
    (Path(a.out) / "inputs.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}, indent=2))
    return 0
