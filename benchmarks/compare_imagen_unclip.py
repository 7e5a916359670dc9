"""Imagen-style cascade vs unCLIP on the shapes data: same prompts, same seeds, same scorers.

    .venv/bin/python benchmarks/compare_imagen_unclip.py --imagen runs/imagen-demo/base/checkpoints/last.ckpt \
        --imagen-upsampler runs/imagen-demo/superres/checkpoints/last.ckpt --unclip runs/demo/pipeline --out runs/compare \
        --budget "9.5 min base vs prior + decoder, 2 min upsampler each"

`--imagen` is an Imagen pipeline directory or a base-model checkpoint; `--unclip` an unCLIP
pipeline directory (optional: without it only the Imagen grid and scores are written). Each
system generates one image per (prompt, seed) with `pipe.generate(prompts, 1, seed=s)`, and every
image is scored by the deterministic compositional evaluator (`modules.evaluation.shapes_evaluator`:
single-object accuracy, two-object binding accuracy with and without the relation) and by CLIP
score (100 x cosine of image and caption embeddings): `clip_score_own` with the unCLIP pipeline's
own CLIP, which favours unCLIP (its decoder was trained on those embeddings), and `clip_score` with
an independent CLIP given by `--clip-model/--clip-weights` (e.g. another CLIP run on the same data).
Writes `comparison.json`, `comparison.md` and, per system, `<name>/grid.png` (rows = prompts,
columns = seeds) and `<name>/rows.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.diffusion.config import Clipping, Sampler  # noqa: E402
from modules.evaluation.shapes_evaluator import accuracy_table, evaluate_image  # noqa: E402

# A fixed probe set: every colour and shape alone, and two-object scenes with every relation.
DEFAULT_PROMPTS = [
    "a red circle", "a blue square", "a green triangle", "a yellow circle",
    "a purple square", "an orange triangle", "a photo of a blue circle", "a drawing of a red square",
    "a red circle to the left of a blue square", "a blue square to the left of a red circle",
    "a green triangle above a yellow circle", "a yellow circle above a green triangle",
    "a purple square below an orange circle", "an orange triangle to the right of a blue circle",
    "a red square above a green circle", "a blue triangle below a red circle",
]
Generate = Callable[[list[str], int], Tensor]  # (prompts, seed) -> (B, 3, H, W) in [0, 1]


def load_imagen(path: str, upsamplers: list[str], overrides: dict[str, Any], up_overrides: dict[str, Any]) -> Generate:
    from modules.pipelines.imagen import ImagenGenerateConfig, ImagenPipeline

    pipe = ImagenPipeline.from_checkpoints(path, upsamplers) if path.endswith(".ckpt") else ImagenPipeline.load(path)
    cfg = ImagenGenerateConfig(base_sampling=dataclasses.replace(pipe.base.sampling, **overrides),
                               upsampler_sampling=[dataclasses.replace(u.sampling, **up_overrides) for u in pipe.upsamplers])
    return lambda prompts, seed: pipe.generate(prompts, 1, seed=seed, config=cfg)


def load_unclip(path: str, overrides: dict[str, Any], up_overrides: dict[str, Any]) -> tuple[Generate, Any]:
    from modules.pipelines.unclip import GenerateConfig, UnCLIPPipeline

    pipe = UnCLIPPipeline.load(path)
    cfg = GenerateConfig(decoder_sampling=dataclasses.replace(pipe.decoder.sampling, **overrides),
                         upsampler_sampling=[dataclasses.replace(u.sampling, **up_overrides) for u in pipe.upsamplers])
    return (lambda prompts, seed: pipe.generate(prompts, 1, seed=seed, config=cfg)), pipe.clip


@torch.no_grad()
def run_system(generate: Generate, prompts: list[str], seeds: list[int], clips: dict[str, Any]) -> tuple[dict[str, Any], Tensor]:
    """Images (P * S, 3, H, W) prompt-major and their scores: accuracy table, one CLIP score per
    entry of `clips` (result key -> CLIP), rows."""
    start = time.perf_counter()
    per_seed = [generate(prompts, seed) for seed in seeds]  # each (P, 3, H, W)
    seconds = time.perf_counter() - start
    images = torch.stack(per_seed, dim=1).flatten(0, 1)  # (P * S, 3, H, W), prompt-major
    captions = [p for p in prompts for _ in seeds]
    rows = [{**evaluate_image(img, cap), "seed": seed} for img, cap, seed in zip(images, captions, seeds * len(prompts))]
    result: dict[str, Any] = {**accuracy_table(rows), "seconds": seconds, "image_size": int(images.shape[-1])}
    from callbacks.generation_metrics import ClipScore

    for key, clip in clips.items():
        metric = ClipScore(clip)
        metric.update(images, captions)
        result[key] = float(metric.compute())
    return {"table": result, "rows": rows}, images


def markdown(tables: dict[str, dict[str, Any]], budget: str | None, n_prompts: int, seeds: list[int]) -> str:
    keys = ["single_object_accuracy", "two_object_accuracy", "two_object_objects_accuracy", "overall_accuracy", "clip_score",
            "clip_score_own"]
    lines = [f"Prompts: {n_prompts} x seeds {seeds}. Training budget: {budget or 'not stated'}.", "",
             "| system | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, t in tables.items():
        cells = ["-" if t.get(k) is None else f"{t[k]:.2f}" if k.startswith("clip_score") else f"{t[k]:.3f}" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--imagen", required=True, help="Imagen pipeline directory or base-model .ckpt")
    p.add_argument("--imagen-upsampler", action="append", default=[], help="with a base .ckpt: its upsampler .ckpt (repeatable)")
    p.add_argument("--unclip", default=None, help="unCLIP pipeline directory")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--prompts-file", default=None, help="one prompt per line (default: the fixed probe set)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--steps", type=int, default=None, help="base/decoder sampling steps for both (default: each config's)")
    p.add_argument("--guidance", type=float, default=None, help="base/decoder guidance scale for both")
    p.add_argument("--sampler", choices=[s.name for s in Sampler], default=None, help="base/decoder sampler for both")
    p.add_argument("--clipping", choices=[c.name for c in Clipping], default=None,
                   help="x0 clipping of every stage of both systems (default: each config's)")
    p.add_argument("--clip-model", default=None, help="an independent CLIP scorer (clip_score)")
    p.add_argument("--clip-weights", default=None)
    p.add_argument("--budget", default=None, help="training budget to state in the table")
    a = p.parse_args(argv)
    prompts = Path(a.prompts_file).read_text().splitlines() if a.prompts_file else DEFAULT_PROMPTS
    prompts = [q.strip() for q in prompts if q.strip()]
    up_overrides = {} if a.clipping is None else {"clipping": Clipping[a.clipping]}
    overrides = {k: v for k, v in (("steps", a.steps), ("guidance_scale", a.guidance), ("sampler", a.sampler and Sampler[a.sampler])) if v is not None}
    overrides.update(up_overrides)
    systems: dict[str, Generate] = {"imagen": load_imagen(a.imagen, a.imagen_upsampler, overrides, up_overrides)}
    clips: dict[str, Any] = {}
    if a.unclip:
        systems["unclip"], clips["clip_score_own"] = load_unclip(a.unclip, overrides, up_overrides)
    if a.clip_model:
        from modules.networks.clip import FrozenCLIP

        clips["clip_score"] = FrozenCLIP(a.clip_model, a.clip_weights)
    from modules.core.images import save_images

    report: dict[str, Any] = {"prompts": prompts, "seeds": a.seeds, "budget": a.budget, "sampling_overrides": {k: str(v) for k, v in overrides.items()}, "systems": {}}
    for name, generate in systems.items():
        result, images = run_system(generate, prompts, a.seeds, clips)
        report["systems"][name] = result["table"]
        (a.out / name).mkdir(parents=True, exist_ok=True)
        (a.out / name / "rows.json").write_text(json.dumps(result["rows"], indent=1))
        save_images(images, a.out / name, len(a.seeds))
        print(f"{name:>7}: {json.dumps(result['table'])}")
    (a.out / "comparison.json").write_text(json.dumps(report, indent=2))
    table = markdown(report["systems"], a.budget, len(prompts), a.seeds)
    (a.out / "comparison.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
