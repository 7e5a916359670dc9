"""OpenMP's wait policy for the demo decoder's fit: libgomp's default (idle threads spin for a while,
then sleep) against `OMP_WAIT_POLICY=PASSIVE` (they sleep at once), side by side.

OpenMP reads the policy when torch loads it, so every measurement is its own `unclip fit` process
of the demo decoder (experiments/decoder/tiny.yaml + experiments/demo/decoder.yaml: bf16 autocast,
the frozen CLIP in every step (random-init here), a loader worker, EMA, the callbacks) on small shapes shards
written here (`unclip data shapes`). The time per step is the
difference between a long and a short fit, divided by their difference in steps, so start-up,
the final validation and the checkpoint cancel. The two policies alternate over the rounds.
`--busy N` runs N processes that spin on a core each meanwhile (a machine shared with other work).

    python -m benchmarks.omp_wait_policy [--rounds 2] [--steps 10 70] [--busy 0]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import print_medians

ROOT = Path(__file__).resolve().parents[1]
POLICIES = {"default (spin, then sleep)": None, "PASSIVE": "PASSIVE"}


def unclip(args: list[str], env: dict[str, str] | None = None) -> float:
    """Wall seconds of `unclip ARGS` in a new process (its output discarded; a failure raises)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "modules.cli", *args], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def fit_seconds(work: Path, steps: int, policy: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    data = work / "shapes"
    return unclip(["fit", "--config", "experiments/decoder/tiny.yaml", "--config", "experiments/demo/decoder.yaml",
                   f"--trainer.default_root_dir={work / 'fit'}", f"--trainer.max_steps={steps}",
                   f"--trainer.val_check_interval={steps}", "--trainer.logger=false",
                   "--trainer.enable_progress_bar=false", "--model.clip_weights=null",
                   f"--data.train_shards={data}/train-*.tar", f"--data.val_shards={data}/val-*.tar"], env)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, nargs=2, default=[10, 70], metavar=("SHORT", "LONG"))
    p.add_argument("--busy", type=int, default=0, help="processes spinning on a core each while measuring")
    a = p.parse_args()
    short, long = a.steps
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        unclip(["data", "shapes", "--out", str(work / "shapes"), "--num-samples", "3000", "--size", "64", "--seed", "0"])
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.busy)]
        per_step: dict[str, list[float]] = {name: [] for name in POLICIES}
        try:
            for r in range(a.rounds):
                order = list(POLICIES.items()) if r % 2 == 0 else list(POLICIES.items())[::-1]
                for name, policy in order:
                    t_short, t_long = fit_seconds(work, short, policy), fit_seconds(work, long, policy)
                    per_step[name].append((t_long - t_short) / (long - short) * 1e3)
        finally:
            for hog in hogs:
                hog.kill()
    print(f"demo decoder `unclip fit` ({a.busy} busy cores): ms per step = (fit of {long} steps - fit of {short}) / "
          f"{long - short}, median of {a.rounds} alternating rounds [min, max]:")
    default, passive = print_medians(per_step, lambda med: f"  ({1e3 / med:.2f} steps/s)").values()
    print(f"  PASSIVE / default: {passive / default:.2f}")


if __name__ == "__main__":
    main()
