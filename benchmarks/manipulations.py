"""How often the paper's manipulations reach their target (issue 21 §4), over many inputs, not one.

The demo judges one interpolation (red circle -> blue square) and one text diff ("a red circle" ->
"a blue circle") on one seed. This benchmark runs the same functions
(`modules.pipelines.manipulations`) on every single-object scene of the shapes grammar as input and
judges the frames with the compositional evaluator, per decoder guidance scale:

- interpolation (§3.2): from "a C S" to the object with the next colour and the next shape, with
  each of the paper's two decoder latents (the inputs' DDIM inversions slerped, or one random x_T);
  the row passes when its first frame shows the start object and its last frame the end object;
- text diff (§3.3): "a C S" -> "a C' S" (the next colour), from the input image's inversion; the
  row passes when its first frame shows the input's object and its last frame the new caption's.

Input scenes are drawn by the shapes generator with layout seed k for the k-th object, and every
row's decoder seed is k too, so two runs print the same table.

    python -m benchmarks.manipulations --pipeline runs/demo/pipeline --guidance 1 3 --latents inverted random
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from benchmarks.table import print_table
from datamodules.shapes.grammar import ALL_OBJECTS, COLORS, SHAPES, Obj, caption
from datamodules.shapes.scene import draw_scene, layout_scene
from modules.evaluation.shapes_evaluator import evaluate_image
from modules.pipelines import manipulations
from modules.pipelines.unclip import UnCLIPPipeline

SCENE_SIZE = 64  # the demo's manipulation inputs are drawn at 64 px


def targets(obj: Obj) -> tuple[Obj, Obj]:
    """(interpolation end, text-diff end) of an input object: the next colour and next shape, the next colour."""
    colors = list(COLORS)
    next_color = colors[(colors.index(obj.color) + 1) % len(colors)]
    next_shape = SHAPES[(SHAPES.index(obj.shape) + 1) % len(SHAPES)]
    return Obj(next_color, next_shape), Obj(next_color, obj.shape)


def scene(obj: Obj, seed: int) -> torch.Tensor:
    """(1, 3, 64, 64) in [0, 1]: the object drawn by the shapes generator with layout seed `seed`."""
    image = draw_scene(layout_scene(np.random.default_rng(seed), SCENE_SIZE, [obj]), SCENE_SIZE)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def judge(frames: torch.Tensor, start: str, end: str) -> dict[str, bool]:
    """Does the first frame show `start` and the last `end` (the shapes evaluator)?"""
    first, last = evaluate_image(frames[0], start)["correct"], evaluate_image(frames[-1], end)["correct"]
    return {"start": first, "end": last, "both": first and last}


@torch.no_grad()
def measure(pipe: UnCLIPPipeline, guidance: list[float], latents: list[str], steps: int, frames: int,
            max_theta: float, limit: int | None = None) -> dict[str, dict[str, float]]:
    """Pass rates per (manipulation, guidance scale) over the grammar's single objects."""
    inputs = ALL_OBJECTS[:limit]
    table: dict[str, dict[str, float]] = {}
    for scale in guidance:
        names = [f"interpolate ({latent} x_T)" for latent in latents] + ["textdiff"]
        counts = {name: {"start": 0, "end": 0, "both": 0} for name in names}
        for k, obj in enumerate(inputs):
            interp_end, diff_end = targets(obj)
            start = caption([obj])
            verdicts = {}
            for latent in latents:
                row = manipulations.interpolate(pipe, scene(obj, k), scene(interp_end, k), frames, steps,
                                                guidance_scale=scale, seed=k, latent=latent)
                verdicts[f"interpolate ({latent} x_T)"] = judge(row, start, caption([interp_end]))
            row = manipulations.text_diff(pipe, scene(obj, k), start, caption([diff_end]), frames, max_theta, steps,
                                          guidance_scale=scale, seed=k)
            verdicts["textdiff"] = judge(row, start, caption([diff_end]))
            for name, verdict in verdicts.items():
                for key, ok in verdict.items():
                    counts[name][key] += ok
        for name, c in counts.items():
            table[f"{name} @ guidance {scale:g}"] = {"rows": len(inputs), **{k: v / len(inputs) for k, v in c.items()}}
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", required=True)
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0], help="decoder guidance scales to compare")
    p.add_argument("--latents", nargs="*", default=list(manipulations.INTERPOLATION_LATENTS),
                   choices=manipulations.INTERPOLATION_LATENTS, help="interpolation decoder latents to compare")
    p.add_argument("--steps", type=int, default=25, help="decoder DDIM steps (and inversion steps)")
    p.add_argument("--frames", type=int, default=6, help="frames per row")
    p.add_argument("--max-theta", type=float, default=0.5, help="text diff's last slerp angle (paper: 0.5)")
    a = p.parse_args(argv)
    table = measure(UnCLIPPipeline.load(a.pipeline), a.guidance, a.latents, a.steps, a.frames, a.max_theta)
    print_table("manipulation", table, [("rows", "rows", "d"), ("start", "first frame right", ".3f"),
                                         ("end", "last frame right", ".3f"), ("both", "both", ".3f")], name_width=40)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
