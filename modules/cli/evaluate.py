"""`unclip evaluate` (FID / KID / IS / CLIP score report) and `unclip evaluate-shapes`
(compositional accuracy with and without the prior): argument parsing over `modules.evaluation`."""

from __future__ import annotations

import argparse
from pathlib import Path

from modules.cli.args import Parser, count, new_output, output_dir, real
from modules.core.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="unclip evaluate", description="Sample from a decoder checkpoint or a pipeline; FID / KID / IS / CLIP score report.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a stage checkpoint (.ckpt), loaded with weights_only=True")
    src.add_argument("--pipeline", help="a pipeline directory (modules/pipelines/unclip.py)")
    p.add_argument("--val-shards", help="real images + captions (WebDataset shards), e.g. 'data/shapes/val-*.tar'")
    p.add_argument("--prompts", help="text file, one prompt per line (cycled); default: the val captions")
    p.add_argument("--class-prompts", help="text file of class prompts for the CLIP Inception Score (default: the unique prompts)")
    p.add_argument("--out", required=True, type=output_dir, help="output directory (report.json, report.html, images/)")
    p.add_argument("--num-samples", type=count(1, 1_000_000), default=64)
    p.add_argument("--batch-size", type=count(1, 4096), default=16)
    p.add_argument("--seed", type=count(0, 2**63 - 1), default=0)
    p.add_argument("--steps", type=count(1, 1000), help="override the sampling steps")
    p.add_argument("--guidance-scale", type=real(0.0, 100.0), help="override the classifier-free guidance scale")
    p.add_argument("--inception-weights", help="local Inception-v3 FID weights (weights-inception-2015-12-05-6726825d.pth)")
    p.add_argument("--clip-model", help="CLIP for FID_CLIP / CLIP score (default: the checkpoint's CLIP)")
    p.add_argument("--clip-weights", help="local weights for --clip-model")
    p.add_argument("--kid-subsets", type=count(1, 10_000), default=100)
    p.add_argument("--kid-subset-size", type=count(2, 1_000_000), default=1000)
    p.add_argument("--isc-splits", type=count(1, 1000), default=10)
    p.add_argument("--show", type=count(0, 10_000), default=16, help="samples saved and shown in the HTML report")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--wandb", action="store_true", help="also log the report to W&B (offline unless WANDB_MODE=online)")
    return p


def evaluate(argv: list[str]) -> int:
    from modules.evaluation.evaluate import EvalConfig, evaluate as run_evaluation

    args = vars(build_parser().parse_args(argv))
    args["out"] = str(args["out"])
    with new_output(args["out"]):
        report = run_evaluation(EvalConfig(**args))
    m = report["metrics"]
    summary = ", ".join(f"{k} {v:.4g}" for k, v in m.items() if v is not None)
    print(f"unclip evaluate: {report['data']['num_generated']} samples; {summary}; report: {Path(args['out']) / 'report.html'}")
    return 0


def evaluate_shapes(argv: list[str]) -> int:
    from datamodules.shapes.grammar import evaluation_captions
    from modules.evaluation.compositional import shapes_accuracy, val_captions
    from modules.cli.pipeline import load_pipeline
    from modules.pipelines.unclip import PriorMode

    p = Parser(prog="unclip evaluate-shapes",
                                description="Shapes compositional accuracy with and without the prior.")
    p.add_argument("--pipeline", required=True)
    p.add_argument("--shards", help="val shards whose first captions are the prompts (default: the covering set: "
                   "every colour-shape pair alone, two-object scenes in both phrasings of all four relations, "
                   "same-colour pairs; datamodules.shapes.grammar.evaluation_captions)")
    p.add_argument("--num-prompts", type=count(3, 100_000), default=540, help="a third single-object, two thirds two-object")
    p.add_argument("--seed", type=count(0, 2**63 - 1), default=0)
    p.add_argument("--steps", type=count(1, 1000), default=None, help="decoder DDIM steps (default: the decoder's own)")
    p.add_argument("--no-upsample", action="store_true", help="score at the decoder's resolution")
    p.add_argument("--decoder-candidates", type=count(1, 64), default=1,
                   help="decoder samples per prompt, the best by CLIP score kept (default 1: no reranking)")
    p.add_argument("--guidance-scale", type=real(0.0, 100.0), default=None,
                   help="decoder guidance scale (default: the decoder's own)")
    p.add_argument("--text-guidance-scale", type=real(0.0, 100.0), default=None,
                   help="nested guidance: the caption's own scale, --guidance-scale then weighs z_i alone "
                        "(default: the decoder's own, usually joint guidance)")
    p.add_argument("--layout-guidance-scale", type=real(0.0, 100.0), default=None,
                   help="nested guidance: the layout plan's own scale (default: the decoder's own, usually joint guidance)")
    p.add_argument("--prior-candidates", type=count(1, 64), default=None,
                   help="the prior's best-of-n over z_i by dot product with z_t (default: the prior's own; paper 2)")
    p.add_argument("--prior-guidance-scale", type=real(0.0, 100.0), default=None,
                   help="the diffusion prior's guidance scale (default: the prior's own)")
    p.add_argument("--no-layout", action="store_true",
                   help="sample without the pipeline's layout stage (ablation; the decoder gets the null layout)")
    p.add_argument("--layout-tries", type=count(1, 1000), default=None,
                   help="plans drawn per prompt until one follows the layout rule (default: the layout stage's own)")
    p.add_argument("--arms", nargs="+", choices=[m.value for m in PriorMode], default=["prior", "text"],
                   help="where the decoder's image embedding comes from, one scored arm each: the prior's z_i, z_t "
                        "(no prior), or none (caption: the decoder's null z_i; paper §5.1). Default: prior text")
    p.add_argument("--out", required=True, type=output_dir)
    a = p.parse_args(argv)
    overrides = {k: v for k, v in (("steps", a.steps), ("guidance_scale", a.guidance_scale),
                                   ("text_guidance_scale", a.text_guidance_scale),
                                   ("layout_guidance_scale", a.layout_guidance_scale)) if v is not None}
    if a.shards:
        captions = val_captions(a.shards, a.num_prompts)
        if not captions:
            raise UserError(f"no captions found in {a.shards}")
    else:
        captions = evaluation_captions(num_single=a.num_prompts // 3, num_pairs=a.num_prompts // 3, seed=a.seed)
    pipe = load_pipeline(a.pipeline)
    with new_output(a.out):
        shapes_accuracy(pipe, captions, Path(a.out), seed=a.seed, upsample=not a.no_upsample,
                        decoder_candidates=a.decoder_candidates, decoder_overrides=overrides, use_layout=not a.no_layout,
                        prior_candidates=a.prior_candidates,
                        prior_overrides={} if a.prior_guidance_scale is None else {"guidance_scale": a.prior_guidance_scale},
                        layout_tries=a.layout_tries, arms=[PriorMode(arm) for arm in dict.fromkeys(a.arms)])
    return 0
