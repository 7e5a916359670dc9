"""What a demo step saves by running in the demo's own process (`modules.cli.demo.run_command`)
instead of a new `python -m modules.cli` process. The new-process case runs `unclip generate` on a
pipeline directory (one prompt, one image, 2 decoder DDIM steps, its upsamplers as configured); the
in-process case does the same work through the library in this process (load the pipeline,
generate, save), as `unclip generate` does once its arguments are parsed. Interleaved rounds; the
difference is a new process's start-up: the interpreter, then torch, Lightning and open_clip.

    python -m benchmarks.demo_steps [--pipeline runs/demo/pipeline] [--rounds 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import interleaved_rounds, print_medians
from modules.core.images import save_images
from modules.pipelines.unclip import GenerateConfig, UnCLIPPipeline

ROOT = Path(__file__).resolve().parents[1]
PROMPT, STEPS = "a red circle", 2


def in_process(pipeline: str, out: Path) -> None:
    pipe = UnCLIPPipeline.load(pipeline)
    cfg = GenerateConfig(decoder_sampling=dataclasses.replace(pipe.decoder.sampling, steps=STEPS))
    save_images(pipe.generate([PROMPT], 1, seed=0, config=cfg), out, 1)


def new_process(pipeline: str, out: Path) -> None:
    subprocess.run([sys.executable, "-m", "modules.cli", "generate", "--pipeline", pipeline, "--prompt", PROMPT,
                    "--num-images", "1", "--steps", str(STEPS), "--out", str(out)],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", default="runs/demo/pipeline", help="a pipeline directory (`make demo` writes this one)")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cases = {name: functools.partial(fn, a.pipeline, Path(tmp) / name)
                 for name, fn in (("new process", new_process), ("in process", in_process))}
        times = interleaved_rounds(cases, a.rounds)  # warm-up: this process's first call pays its imports once
    print(f"`unclip generate` (1 image, {STEPS} decoder steps) on {a.pipeline}, {a.rounds} interleaved rounds (s): "
          "median [min, max]")
    med = print_medians(times, digits=2)
    saved = med["new process"] - med["in process"]
    print(f"  start-up of a new process (median difference): {saved:.2f} s")


if __name__ == "__main__":
    main()
