"""End-to-end timing of the shapes generator: ``python -m datamodules.shapes`` in a subprocess.

Target: 20,000 samples at 64 px in under 60 s with 2 workers on 2 cores. Prints wall time,
samples/s and the CPU time of the generator processes (user + system, children included), since
other processes sharing the cores distort wall time.

    .venv/bin/python benchmarks/bench_shapes.py [--num-samples 20000 --size 64 --workers 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bench(num_samples: int, size: int, workers: int, shard_size: int) -> dict[str, float]:
    """Generate into a temporary folder and return timings; the folder is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="bench_shapes_") as out:
        cmd = [sys.executable, "-m", "datamodules.shapes", "--out", out, "--num-samples", str(num_samples),
               "--size", str(size), "--workers", str(workers), "--shard-size", str(shard_size)]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        stats = json.loads((Path(out) / "stats.json").read_text())
        written = sum(s["num_samples"] for s in stats["splits"].values())
        megabytes = sum(p.stat().st_size for p in Path(out).glob("*.tar")) / 2**20
    assert written == num_samples, (written, num_samples)
    return {"wall_s": wall, "samples_per_s": num_samples / wall, "user_s": after.ru_utime - before.ru_utime,
            "sys_s": after.ru_stime - before.ru_stime, "megabytes": megabytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-samples", type=int, default=20000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args()
    r = bench(args.num_samples, args.size, args.workers, args.shard_size)
    print(f"shapes: {args.num_samples} samples, {args.size} px, {args.workers} workers: "
          f"{r['wall_s']:.2f} s wall, {r['samples_per_s']:.0f} samples/s, "
          f"cpu user {r['user_s']:.2f} s + sys {r['sys_s']:.2f} s, {r['megabytes']:.1f} MiB of shards")


if __name__ == "__main__":
    main()
