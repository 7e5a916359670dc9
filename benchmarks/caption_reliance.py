"""How much the decoder reads its caption: the same z_i and x_T, the caption changed (issue 21 diagnostic).

For each base scene "A to the left of B" the prior samples one z_i, and the decoder draws it from one
fixed x_T under each caption variant: the four relations between A and B, and A and B with their
colours swapped. Two figures per variant:

- mean |image - base image| (pixels in [0, 1]), beside the same figure for a second z_i of the base
  caption with the same x_T: how far the caption moves the image against how far z_i does;
- how often the drawn objects stand in the variant's relation: among images where the evaluator
  (`modules.evaluation.shapes_evaluator`) finds A's and B's colours, the relation between the
  largest object of each. A decoder that ignores the caption's relation scores about 1/4 on every
  variant, and its layout follows z_i and x_T alone.

    python -m benchmarks.caption_reliance --pipeline runs/demo/pipeline --seeds 16
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from benchmarks.table import print_table
from datamodules.shapes.grammar import RELATIONS, Obj, caption, parse_caption
from modules.core.images import to_unit
from modules.evaluation.shapes_evaluator import detect_objects, relation_between
from modules.pipelines.unclip import GenerateConfig, PriorMode, UnCLIPPipeline

PAIRS = [(Obj("red", "circle"), Obj("blue", "square")), (Obj("green", "triangle"), Obj("yellow", "circle")),
         (Obj("purple", "square"), Obj("orange", "triangle"))]


def variants(a: Obj, b: Obj) -> dict[str, str]:
    """Caption variants of the base scene "a LEFT b", named by what changed."""
    out = {f"relation: {rel}": caption([a, b], rel) for rel in RELATIONS}
    out["colours swapped"] = caption([Obj(b.color, a.shape), Obj(a.color, b.shape)], RELATIONS[0])
    return out


def relation_of_colours(image: torch.Tensor, first: str, second: str) -> str | None:
    """Relation between the largest detected object of colour `first` and that of `second`."""
    found = detect_objects(image)
    a = next((d for d in found if d.color == first), None)
    b = next((d for d in found if d.color == second), None)
    return relation_between(a, b) if a is not None and b is not None else None


@torch.no_grad()
def measure(pipe: UnCLIPPipeline, seeds: int, steps: int) -> dict[str, dict[str, float]]:
    cfg = GenerateConfig(prior_mode=PriorMode.PRIOR, upsample=False,
                         decoder_sampling=dataclasses.replace(pipe.decoder.sampling, steps=steps))
    size = pipe.decoder.unet.config.image_size
    totals: dict[str, dict[str, float]] = {}
    for p, (a, b) in enumerate(PAIRS):
        base = caption([a, b], RELATIONS[0])
        x_T = torch.randn(seeds, 3, size, size, generator=torch.Generator().manual_seed(p))
        text = pipe.encode_text([base] * seeds)
        z_i, z_other = (pipe.image_embeddings(text, cfg, torch.Generator().manual_seed(1000 * p + k)) for k in (1, 2))
        draw = lambda text, z: to_unit(pipe.decode(text, z, cfg, torch.Generator().manual_seed(p), x_T=x_T))  # noqa: E731
        base_images = draw(text, z_i)
        rows = {"another z_i, base caption": (base, draw(text, z_other))}
        rows.update({name: (cap, base_images if cap == base else draw(pipe.encode_text([cap] * seeds), z_i))
                     for name, cap in variants(a, b).items()})  # the base caption's own row: drawn once, above
        for name, (cap, images) in rows.items():
            (first, second), rel, _ = parse_caption(cap)  # the colours and relation the caption asks for
            t = totals.setdefault(name, {"images": 0, "delta_sum": 0.0, "both_colours": 0, "in_relation": 0})
            t["images"] += seeds
            t["delta_sum"] += float((images - base_images).abs().mean(dim=(1, 2, 3)).sum())
            for img in images:
                found = relation_of_colours(img, first.color, second.color)
                t["both_colours"] += found is not None
                t["in_relation"] += found == rel
    return {name: {"images": t["images"], "mean_abs_change": t["delta_sum"] / t["images"], "both_colours": t["both_colours"],
                   "in_relation": t["in_relation"] / max(t["both_colours"], 1)} for name, t in totals.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", required=True)
    p.add_argument("--seeds", type=int, default=16, help="x_T draws per base scene (three scenes)")
    p.add_argument("--steps", type=int, default=25, help="decoder DDIM steps")
    a = p.parse_args(argv)
    table = measure(UnCLIPPipeline.load(a.pipeline), a.seeds, a.steps)
    print_table("caption (z_i, x_T fixed)", table, [("images", "images", "d"), ("mean_abs_change", "mean |change|", ".4f"),
                                                    ("both_colours", "both colours", "d"), ("in_relation", "in relation", ".3f")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
