"""`unclip demo`: the whole unCLIP pipeline on the built-in shapes data, on 2 CPU cores.

shapes shards -> CLIP -> embedding export -> diffusion prior -> layout stage -> decoder (grounded in
layouts) -> upsampler ->
pipeline directory -> generated grid + compositional accuracy (with and without the prior) ->
evaluation report -> variation / interpolation / text-diff grids (paper §3). Each training stage
is `unclip fit --config experiments/<stage>/tiny.yaml --config experiments/demo/<stage>.yaml` (the
demo overlay sets its budget in optimizer steps, never wall time, and its paths) in its own process,
so the same seed on the same machine and torch build gives the same weights and images. The other
steps are the same `unclip` commands run in the demo's own process (`run_command`): a new process
spends ~9 s importing torch, Lightning and open_clip before it does anything. A finished
step leaves `<out>/<step>/DONE` and is skipped on the next run (`--force` redoes everything). Each
step's wall time, and for the training stages their steps and samples/s, go to `<out>/timings.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from modules.core.errors import UserError
from modules.core.files import write_text_atomic

DEMO_PROMPTS = [
    "a red circle", "a blue square", "a green triangle", "a yellow circle",
    "a purple square", "an orange triangle", "a photo of a blue circle", "a picture of a red square",
    "a red circle to the left of a blue square", "a green triangle above a yellow circle",
    "a purple square below an orange circle", "a blue triangle to the right of a red square",
]


# Manipulation inputs, drawn by the shapes generator: (caption, seed of its layout).
MANIP_INPUTS = [("a red circle", 0), ("a blue square", 1)]
TEXT_DIFF = ("a red circle", "a blue circle")  # base caption of input 0 -> new caption
# The text diff's last slerp angle. With the paper's 0.5 the last frame shows the new caption in 10 of 18 rows of
# `python -m benchmarks.manipulations` on the demo's pipeline (each single object -> the next colour),
# 0.65 in 14 (0.35: 2, 0.8: 10); both at the decoder's guidance 3.
TEXT_DIFF_MAX_THETA = 0.65


TRAINED = ("clip", "prior", "layout", "decoder", "superres")  # the steps that are `unclip fit` runs
# Decoder samples per prompt in `generate` and `evaluate`, the best by CLIP(x)·z_t kept (the pipeline's
# CLIP reranking). On the demo's pipeline (540 prompts): single-object 50.6% -> 60.6% with 2, 65.6% with 4.
DECODER_CANDIDATES = 2
# DDIM steps of the decoder in the demo's grid, accuracy and FID report (the grid took 50 until the decoder's
# budget went from 600 to 900 steps; 25 is what the accuracy figures always used).
SAMPLING_STEPS = 25
SAMPLING = ["--steps", str(SAMPLING_STEPS), "--decoder-candidates", str(DECODER_CANDIDATES)]


@dataclass
class Step:
    name: str
    run: Callable[[], None]


def _python() -> list[str]:
    return [sys.executable, "-m", "modules.cli"]


def _run_process(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    result = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        raise UserError(f"demo step failed (exit {result.returncode}): {' '.join(cmd)}")


def _in_process_commands() -> dict[str, Callable[[list[str]], int]]:
    """The demo's `unclip` commands other than `fit`, by name (as in `modules.cli.main.COMMANDS`)."""
    from modules.cli import data, embed, evaluate, pipeline

    return {"data": data.main, "embed": embed.main, "pipeline": pipeline.assemble, "generate": pipeline.generate,
            "evaluate-shapes": evaluate.evaluate_shapes, "evaluate": evaluate.evaluate, "vary": pipeline.vary,
            "interpolate": pipeline.interpolate, "textdiff": pipeline.textdiff}


def run_command(argv: list[str]) -> None:
    """`unclip ARGV` in this process; a non-zero exit (or argparse's) fails the demo with one line.
    Every command seeds its own generators, so its output does not depend on what ran before."""
    print("+ unclip " + " ".join(argv), flush=True)
    try:
        status = _in_process_commands()[argv[0]](argv[1:])
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 2
    if status:
        raise UserError(f"demo step failed (exit {status}): unclip {' '.join(argv)}")


DEFAULT_OUT = Path("runs/demo")  # the paths written in experiments/demo/*.yaml


class Demo:
    """The demo's steps, in order, over one output layout (fixed by experiments/demo/*.yaml)."""

    def __init__(self, out: Path, num_samples: int, eval_prompts: int, extra_configs: dict[str, list[str]] | None = None) -> None:
        self.out, self.num_samples, self.eval_prompts = out, num_samples, eval_prompts
        self.extra_configs = extra_configs or {}
        self.data = out / "data" / "shapes"
        self.emb = out / "data" / "shapes-emb"
        self.pipeline = out / "pipeline"

    def ckpt(self, stage: str) -> str:
        return str(self.out / stage / "checkpoints" / "last.ckpt")

    def fit_args(self, stage: str) -> list[str]:
        """`unclip fit` arguments: the stage's tiny YAML, its demo overlay, any extra overlays
        (ablations), and, when the output root is not `runs/demo`, the overlay's paths moved under it."""
        args = ["fit", "--config", f"experiments/{stage}/tiny.yaml", "--config", f"experiments/demo/{stage}.yaml"]
        for extra in self.extra_configs.get(stage, []):
            args += ["--config", extra]
        if self.out != DEFAULT_OUT:
            shards = self.emb if stage == "prior" else self.data
            args += [f"--trainer.default_root_dir={self.out / stage}", f"--data.train_shards={shards}/train-*.tar",
                     f"--data.val_shards={shards}/val-*.tar"]
            if stage in ("prior", "layout", "decoder"):
                args.append(f"--model.clip_weights={self.ckpt('clip')}")
        return args

    def fit(self, stage: str) -> None:
        _run_process(_python() + self.fit_args(stage))

    def steps(self) -> list[Step]:
        return [
            Step("data", lambda: run_command(["data", "shapes", "--out", str(self.data), "--num-samples",
                                              str(self.num_samples), "--size", "64", "--seed", "0"])),
            Step("clip", lambda: self.fit("clip")),
            Step("embed", lambda: run_command(["embed", "--clip", "tiny-vit", "--weights", self.ckpt("clip"),
                                               "--shards", str(self.data / "*.tar"), "--out", str(self.emb)])),
            Step("prior", lambda: self.fit("prior")),
            Step("layout", lambda: self.fit("layout")),
            Step("decoder", lambda: self.fit("decoder")),
            Step("superres", lambda: self.fit("superres")),
            Step("pipeline", lambda: run_command([
                "pipeline", "--clip-model", "tiny-vit", "--clip-weights", self.ckpt("clip"), "--prior", self.ckpt("prior"),
                "--decoder", self.ckpt("decoder"), "--upsampler", self.ckpt("superres"), "--layout", self.ckpt("layout"),
                "--out", str(self.pipeline)])),
            Step("generate", self.generate),
            Step("evaluate", self.evaluate),
            Step("manipulate", self.manipulate),
        ]

    def generate(self) -> None:
        prompts = self.out / "prompts.txt"
        prompts.write_text("\n".join(DEMO_PROMPTS) + "\n")
        run_command(["generate", "--pipeline", str(self.pipeline), "--prompts-file", str(prompts),
                     "--num-images", "4", "--seed", "0", *SAMPLING, "--out", str(self.out / "samples")])

    def evaluate(self) -> None:
        report = self.out / "report"
        run_command(["evaluate-shapes", "--pipeline", str(self.pipeline), "--num-prompts", str(self.eval_prompts),
                     "--no-upsample", *SAMPLING, "--out", str(report)])
        run_command(["evaluate", "--pipeline", str(self.pipeline), "--val-shards", str(self.data / "val-*.tar"),
                     "--num-samples", "32", "--steps", str(SAMPLING_STEPS), "--kid-subset-size", "16",
                     "--isc-splits", "2", "--out", str(report)])

    def manipulate(self) -> None:
        from datamodules.shapes.scene import draw_scene, layout_scene
        from datamodules.shapes.grammar import parse_caption

        out = self.out / "manip"
        out.mkdir(parents=True, exist_ok=True)
        images = []
        for i, (caption, seed) in enumerate(MANIP_INPUTS):
            objects, relation, _ = parse_caption(caption)
            images.append(str(out / f"in{i}.png"))
            draw_scene(layout_scene(np.random.default_rng(seed), 64, objects, relation), 64).save(images[-1])
        common = ["--pipeline", str(self.pipeline), "--seed", "0"]
        run_command(["vary", *common, "--image", images[0], "--image", images[1], "--num-images", "4",
                     "--out", str(out / "vary")])
        run_command(["interpolate", *common, "--image", images[0], "--image", images[1], "--num-images", "6",
                     "--out", str(out / "interpolate")])
        run_command(["textdiff", *common, "--image", images[0], "--base-caption", TEXT_DIFF[0],
                     "--caption", TEXT_DIFF[1], "--num-images", "5", "--max-theta", str(TEXT_DIFF_MAX_THETA),
                     "--out", str(out / "textdiff")])
        judged = {name: judge_frames(out / name, start, end) for name, start, end in (
            ("interpolate", MANIP_INPUTS[0][0], MANIP_INPUTS[1][0]), ("textdiff", TEXT_DIFF[0], TEXT_DIFF[1]))}
        write_text_atomic(out / "judged.json", json.dumps(judged, indent=2))
        for name, verdict in judged.items():
            print(f"{name}: first frame {verdict['first']['detected']} ({verdict['start']}: {verdict['first']['correct']}), "
                  f"last frame {verdict['last']['detected']} ({verdict['end']}: {verdict['last']['correct']})")

    def trained(self, stage: str) -> dict[str, float] | None:
        """Steps and batch size a training stage's final checkpoint records (None: not a fit)."""
        from modules.core.safe_load import safe_torch_load

        path = Path(self.ckpt(stage))
        if stage not in TRAINED or not path.is_file():
            return None
        ckpt = safe_torch_load(path)
        loader = (ckpt.get("datamodule_hyper_parameters") or {}).get("loader") or {}
        return {"steps": int(ckpt["global_step"]), "batch_size": int(loader.get("batch_size", 0))}

    def run(self, force: bool, only: list[str] | None) -> dict[str, dict[str, float]]:
        timings_path = self.out / "timings.json"
        timings = json.loads(timings_path.read_text()) if timings_path.exists() and not force else {}
        timings = {k: v for k, v in timings.items() if isinstance(v, dict)}  # older files held bare seconds
        for step in self.steps():
            if only and step.name not in only:
                continue
            done = self.out / step.name / "DONE"
            if done.exists() and not force and not only:
                print(f"== {step.name}: done before ({timings.get(step.name, {}).get('seconds', 0):.0f} s), skipped", flush=True)
                continue
            print(f"== {step.name}", flush=True)
            start = time.perf_counter()
            step.run()
            seconds = round(time.perf_counter() - start, 1)
            entry: dict[str, float] = {"seconds": seconds}
            fit = self.trained(step.name)
            if fit is not None:  # wall time includes process start-up and validation
                entry.update(fit, samples_per_s=round(fit["steps"] * fit["batch_size"] / max(seconds, 1e-9), 1))
            timings[step.name] = entry
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text(f"{seconds}\n")
            write_text_atomic(timings_path, json.dumps(timings, indent=2))
        return timings


def judge_frames(folder: Path, start: str, end: str) -> dict[str, object]:
    """The compositional evaluator on a manipulation's frames (`000_00.png`, ... in order): does
    the first frame show `start` and the last `end`? Every frame's detections are kept."""
    from PIL import Image

    from modules.evaluation.shapes_evaluator import evaluate_image

    frames = sorted(folder.glob("000_*.png"))
    if not frames:
        raise UserError(f"no frames to judge in {folder}")
    rows = []
    for frame in frames:
        with Image.open(frame) as image:
            rows.append({"frame": frame.name, **evaluate_image(image, end)})
    with Image.open(frames[0]) as image:
        first = evaluate_image(image, start)
    keep = ("detected", "correct")
    return {"start": start, "end": end, "first": {k: first[k] for k in keep}, "last": {k: rows[-1][k] for k in keep},
            "frames": [{k: r[k] for k in ("frame", *keep)} for r in rows]}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="unclip demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output root (another root moves every stage's paths under it)")
    p.add_argument("--num-samples", type=int, default=20000)
    p.add_argument("--eval-prompts", type=int, default=120,
                   help="covering-set prompts scored with and without the prior (a third single-object)")
    p.add_argument("--force", action="store_true", help="redo finished steps")
    p.add_argument("--only", nargs="*", help="run only these steps")
    p.add_argument("--config", action="append", default=[], metavar="STAGE=YAML",
                   help="an extra overlay for one training stage, e.g. clip=experiments/demo/ablations/negclip.yaml")
    a = p.parse_args(argv)
    extra: dict[str, list[str]] = {}
    for item in a.config:
        stage, _, path = item.partition("=")
        if stage not in TRAINED or not path:
            raise UserError(f"--config {item!r}: expected STAGE=YAML with STAGE one of {', '.join(TRAINED)}")
        if not Path(path).is_file():
            raise UserError(f"--config {item!r}: file not found: {path}")
        extra.setdefault(stage, []).append(path)
    os.environ.setdefault("WANDB_MODE", "offline")
    start = time.perf_counter()
    timings = Demo(Path(a.out), a.num_samples, a.eval_prompts, extra).run(a.force, a.only)
    print("\nstep         seconds   steps  samples/s")
    for name, t in timings.items():
        steps = f"{t['steps']:>7d}  {t['samples_per_s']:>9.1f}" if "steps" in t else ""
        print(f"{name:<12} {t['seconds']:>7.1f} {steps}")
    total = sum(t["seconds"] for t in timings.values())
    print(f"{'total':<12} {total:>7.1f}   (this invocation: {time.perf_counter() - start:.1f} s)")
    print(f"\nsamples: {a.out}/samples/grid.png   report: {a.out}/report/report.html   manipulations: {a.out}/manip/*/grid.png")
    return 0

