"""What a demo step saves by running in the demo's own process (`modules.cli.demo.run_command`)
instead of a new `python -m modules.cli` process: the same small `unclip generate` on a pipeline
directory (one prompt, one image, 2 decoder DDIM steps, its upsamplers as configured), timed both
ways in interleaved rounds. The difference is a new process's start-up: the interpreter, then
torch, Lightning and open_clip.

    python -m benchmarks.demo_steps [--pipeline runs/demo/pipeline] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from modules.cli.demo import run_command

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", default="runs/demo/pipeline", help="a pipeline directory (`make demo` writes this one)")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["generate", "--pipeline", a.pipeline, "--prompt", "a red circle", "--num-images", "1", "--steps", "2",
                "--out", tmp]
        cases = {"new process": lambda: subprocess.run([sys.executable, "-m", "modules.cli", *argv], check=True, cwd=ROOT,
                                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                 "in process": lambda: run_command(argv)}
        for fn in cases.values():
            fn()  # warm-up: this process's first call pays its imports once
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(a.rounds):
            for name, fn in cases.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    print(f"`unclip {' '.join(argv[:1])}` on {a.pipeline}, {a.rounds} interleaved rounds (s): median [min, max]")
    for name, t in times.items():
        print(f"  {name:<12} {statistics.median(t):6.2f} [{min(t):.2f}, {max(t):.2f}]")
    saved = statistics.median(times["new process"]) - statistics.median(times["in process"])
    print(f"  start-up of a new process (median difference): {saved:.2f} s")


if __name__ == "__main__":
    main()
