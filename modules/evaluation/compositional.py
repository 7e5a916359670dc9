"""Compositional accuracy of a pipeline on shapes prompts, with and without the prior.

The ablation the paper's readers ask about: does sampling z_i with the prior beat feeding the
text embedding z_t straight to the decoder? Both arms use the same captions and seeds. A third arm
gives the decoder no image embedding at all (its learned null z_i: the caption and plan alone), the
paper's first conditioning of one decoder (Ramesh et al. 2022 §5.1, Fig. 7).
"""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path
from typing import Any, Sequence

import torch

from datamodules.shards import expand_shards
from modules.pipelines.unclip import GenerateConfig, PriorMode, UnCLIPPipeline
from modules.evaluation.shapes_evaluator import accuracy_table, evaluate_image


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
def score(pipe: UnCLIPPipeline, captions: list[str], cfg: GenerateConfig, seed: int = 0) -> tuple[dict[str, Any], torch.Tensor]:
    """Generate one image per caption under `cfg` and score it; returns (accuracy table + rows, images)."""
    images = pipe.generate(captions, 1, seed=seed, config=cfg)
    rows = [evaluate_image(img, cap) for img, cap in zip(images, captions)]
    return {"table": accuracy_table(rows), "rows": rows}, images


def shapes_accuracy(pipe: UnCLIPPipeline, captions: list[str], out: Path, *, seed: int = 0, upsample: bool = True,
                    decoder_candidates: int = 1, decoder_overrides: dict[str, Any] | None = None,
                    use_layout: bool = True, prior_candidates: int | None = None,
                    prior_overrides: dict[str, Any] | None = None, layout_tries: int | None = None,
                    arms: Sequence[PriorMode] = (PriorMode.PRIOR, PriorMode.TEXT)) -> dict[str, Any]:
    """Score `captions` in each of `arms` (default: with and without the prior; the prior's arm is
    skipped when the pipeline has none); writes `out/<arm>/` (rows.json, images) and
    `out/shapes_accuracy.json`, and returns that report. `decoder_overrides` / `prior_overrides`
    (SamplingConfig fields, e.g. steps) replace that stage's own sampling; `prior_candidates` the prior's
    best-of-n (None: the prior's own); `use_layout=False` samples without the layout stage's plan
    (ablation); `layout_tries` its plans' rejection sampling (None: the stage's own)."""
    from modules.core.images import save_images

    decoder_overrides = decoder_overrides or {}
    sampling = dataclasses.replace(pipe.decoder.sampling, **decoder_overrides) if decoder_overrides else None
    cfg = GenerateConfig(decoder_sampling=sampling, upsample=upsample, decoder_candidates=decoder_candidates,
                         use_layout=use_layout, num_candidates=prior_candidates, layout_tries=layout_tries,
                         prior_sampling=pipe.prior_sampling(**(prior_overrides or {})))
    report: dict[str, Any] = {"num_prompts": len(captions), "seed": seed, "decoder_steps": decoder_overrides.get("steps"),
                              "resolution": "final" if upsample else "decoder", "decoder_candidates": decoder_candidates,
                              "decoder_overrides": decoder_overrides,
                              "layout": pipe.layout is not None and use_layout,
                              "prior_candidates": prior_candidates, "prior_overrides": prior_overrides or {},
                              "layout_tries": layout_tries}
    for mode in arms:
        if mode is PriorMode.PRIOR and pipe.prior is None:
            continue
        result, images = score(pipe, captions, dataclasses.replace(cfg, prior_mode=mode), seed)
        report[mode.value] = result["table"]
        (out / mode.value).mkdir(parents=True, exist_ok=True)
        (out / mode.value / "rows.json").write_text(json.dumps(result["rows"], indent=1))
        save_images(images[:64], out / mode.value / "images", 8)
        print(f"{mode.value:>6}: {json.dumps(result['table'])}")
    (out / "shapes_accuracy.json").write_text(json.dumps(report, indent=2))
    return report
