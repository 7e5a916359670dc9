"""torch.profiler table of one training step of either side of a benchmark: where the time goes.

Builds the side exactly as `bench_decoder` / `bench_prior` do (same arguments), runs warm-up steps,
then profiles `--steps` steps and prints the operators by self CPU time, plus their share grouped
into GEMM (MKL: addmm / mm / bmm), convolution (oneDNN), attention (SDPA), normalisation,
optimizer and everything else.

    python -m benchmarks.profile_step prior --side ours --match-params 24918544
    .venv-bench/bin/python -m benchmarks.profile_step decoder --side theirs
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from torch.profiler import ProfilerActivity, profile

from benchmarks import bench_decoder, bench_prior, harness

GROUPS = {  # first match wins; names are aten operators
    "gemm (BLAS)": ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm"),
    "convolution (oneDNN)": ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution"),
    "attention": ("aten::_scaled_dot_product", "aten::_efficient_attention", "aten::_flash_attention"),
    "normalisation": ("aten::native_group_norm", "aten::native_layer_norm"),
    "optimizer": ("aten::_fused_adamw", "aten::_foreach"),
}


def group_of(name: str) -> str:
    for group, prefixes in GROUPS.items():
        if name.startswith(prefixes):
            return group
    return "other"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", choices=("decoder", "prior"))
    parser.add_argument("--rows", type=int, default=25, help="operators to print")
    known, rest = parser.parse_known_args(argv)
    bench = bench_decoder if known.model == "decoder" else bench_prior
    args = harness.add_common_arguments(bench.add_arguments(argparse.ArgumentParser()), steps=2, warmup=2).parse_args(rest)
    device, _ = harness.start(args)
    built = bench.build(args, device)
    for _ in range(args.warmup):
        built.train_step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            built.train_step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{known.model} / {args.side.value}: {built.params / 1e6:.2f} M params, "
          f"{total / 1e6 / args.steps:.3f} s self CPU per step")
    print(events.table(sort_by="self_cpu_time_total", row_limit=known.rows))
    shares: dict[str, float] = defaultdict(float)
    for e in events:
        shares[group_of(e.key)] += e.self_cpu_time_total
    for group, t in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"  {group:<22} {100 * t / total:5.1f}%  {t / 1e6 / args.steps:7.3f} s/step")


if __name__ == "__main__":
    main()
