"""Compositional accuracy of a pipeline on shapes prompts, with and without the prior.

The ablation the paper's readers ask about: does sampling z_i with the prior beat feeding the
text embedding z_t straight to the decoder? Both arms use the same captions and seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import torch

from datamodules.stages import expand_shards
from modules.cli import UserError, register
from modules.pipeline import GenerateConfig, PriorMode, UnCLIPPipeline
from modules.shapes_evaluator import accuracy_table, evaluate_image


def val_captions(pattern: str, n: int) -> list[str]:
    """The first `n` captions of a shard set, in shard order."""
    captions: list[str] = []
    for url in expand_shards(pattern):
        with tarfile.open(url) as tar:
            for member in tar:
                if member.name.endswith(".txt"):
                    captions.append(tar.extractfile(member).read().decode("utf-8").strip())
                    if len(captions) == n:
                        return captions
    return captions


@torch.no_grad()
def score(pipe: UnCLIPPipeline, captions: list[str], mode: PriorMode, seed: int = 0, steps: int | None = None,
          upsample: bool = True) -> tuple[dict[str, Any], torch.Tensor]:
    """Generate one image per caption and score it; returns (accuracy table + rows, images)."""
    sampling = dataclasses.replace(pipe.decoder.sampling, steps=steps) if steps else None
    cfg = GenerateConfig(prior_mode=mode, decoder_sampling=sampling, upsample=upsample)
    images = pipe.generate(captions, 1, seed=seed, config=cfg)
    rows = [evaluate_image(img, cap) for img, cap in zip(images, captions)]
    return {"table": accuracy_table(rows), "rows": rows}, images


def cmd_evaluate_shapes(argv: list[str]) -> int:
    from modules.pipeline_commands import _load_pipeline, save_images

    p = argparse.ArgumentParser(prog="unclip evaluate-shapes",
                                description="Shapes compositional accuracy with and without the prior.")
    p.add_argument("--pipeline", required=True)
    p.add_argument("--shards", required=True, help="val shards whose captions are the prompts")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="decoder DDIM steps (default: the decoder's own)")
    p.add_argument("--no-upsample", action="store_true", help="score at the decoder's resolution")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    pipe = _load_pipeline(a.pipeline)
    captions = val_captions(a.shards, a.num_prompts)
    if not captions:
        raise UserError(f"no captions found in {a.shards}")
    out = Path(a.out)
    report: dict[str, Any] = {"num_prompts": len(captions), "seed": a.seed, "decoder_steps": a.steps,
                              "resolution": "decoder" if a.no_upsample else "final"}
    for mode in (PriorMode.PRIOR, PriorMode.TEXT):
        if mode is PriorMode.PRIOR and pipe.prior is None:
            continue
        result, images = score(pipe, captions, mode, a.seed, a.steps, upsample=not a.no_upsample)
        report[mode.value] = result["table"]
        (out / mode.value).mkdir(parents=True, exist_ok=True)
        (out / mode.value / "rows.json").write_text(json.dumps(result["rows"], indent=1))
        save_images(images[:64], out / mode.value / "images", 8, 8)
        print(f"{mode.value:>6}: {json.dumps(result['table'])}")
    (out / "shapes_accuracy.json").write_text(json.dumps(report, indent=2))
    return 0


register("evaluate-shapes", cmd_evaluate_shapes)
