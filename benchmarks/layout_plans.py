"""Are the layout stage's plans right? Boxes sampled for the covering prompt set, judged before any
image is drawn (issue 21: the layout is where the relation now enters) by two rules: the shard
writer's strict one (`datamodules.shapes.scene.classify_relation` at the decoder's pixel size: a gap
of S/16 and half the smaller side's overlap across) and the evaluator's (`relation_between`: the
dominant axis of the centre offset), which judges the drawn images; and the share of plans that
follow the writer's whole layout rule in canvas units (`follows_layout_rule`: sides too), the rule the
stage's rejection sampling (`plan_tries`) checks.

    python -m benchmarks.layout_plans --layout runs/demo/layout/checkpoints/last.ckpt --num-prompts 540 [--tries 1]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch

from datamodules.shapes.grammar import evaluation_captions, parse_caption
from datamodules.shapes.scene import classify_relation, follows_layout_rule, margin_px
from modules.evaluation.shapes_evaluator import Detection, relation_between
from modules.pipelines.store import load_stage_checkpoint
from modules.stages.layout import LayoutModule
from modules.stages.registry import StageKind


@torch.no_grad()
def plan(module: LayoutModule, prompts: list[str], seed: int, batch_size: int = 128,
         tries: int | None = None) -> torch.Tensor:
    """Boxes (N, K, 4) in [0, 1] for the prompts, one seeded generator for the whole run; `tries`: draws
    per prompt until the plan follows the layout rule (None: the stage's own `plan_tries`)."""
    generator = torch.Generator().manual_seed(seed)
    clip, tokenizer = module.conditioner.encoder(module.device), module.conditioner.tokenizer
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        out.append(module.plan(chunk, clip=clip, tokenizer=tokenizer, generator=generator,
                               tries=tries)["layout_boxes"])
    return torch.cat(out)


def judge(prompts: list[str], boxes: torch.Tensor, size: int) -> dict[str, object]:
    """Per relation (and for single objects): the share of plans that satisfy the caption at `size` px."""
    right, total, lenient, rule = Counter(), Counter(), 0, 0
    for caption, plan_boxes in zip(prompts, boxes):
        objects, relation, _ = parse_caption(caption)
        rule += follows_layout_rule(plan_boxes[: len(objects)].tolist(), relation)
        px = [[round(float(v) * size) for v in b] for b in plan_boxes[: len(objects)]]
        key = relation or "single"
        total[key] += 1
        inside = all(x1 > x0 and y1 > y0 for x0, y0, x1, y1 in px)
        if relation is None:
            right[key] += inside
        else:
            right[key] += inside and classify_relation(px[0], px[1], margin_px(size)) == relation
            a, b = (Detection(o.color, o.shape, tuple(p), 1) for o, p in zip(objects, px))
            lenient += inside and relation_between(a, b) == relation
    two = sum(total.values()) - total["single"]
    return {
        "single_inside": right["single"] / max(total["single"], 1),
        "relation_right": (sum(right.values()) - right["single"]) / max(two, 1),
        "relation_right_evaluator_rule": lenient / max(two, 1),
        "per_relation": {k: right[k] / total[k] for k in total if k != "single"},
        "follows_layout_rule": rule / max(len(prompts), 1),
        "prompts": dict(total),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layout", required=True, help="layout stage checkpoint")
    p.add_argument("--num-prompts", type=int, default=540)
    p.add_argument("--size", type=int, default=32, help="pixel size the relation is judged at")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tries", type=int, default=None, help="plans drawn per prompt until one follows the layout rule "
                   "(default: the stage's own plan_tries)")
    a = p.parse_args()
    module = load_stage_checkpoint(StageKind.LAYOUT, a.layout, "modules.stages.layout.LayoutModule").eval()
    third = a.num_prompts // 3
    prompts = evaluation_captions(num_single=third, num_pairs=third)
    print(json.dumps(judge(prompts, plan(module, prompts, a.seed, tries=a.tries), a.size), indent=2))


if __name__ == "__main__":
    main()
