"""torch.profiler table of one training step of either side of a benchmark: where the time goes.

Builds the side exactly as `bench_decoder` / `bench_prior` do (same arguments), runs warm-up steps,
then profiles `--steps` steps and prints the operators by self CPU time, plus their share grouped
into GEMM (MKL: addmm / mm / bmm), convolution (oneDNN), attention (SDPA), normalisation,
optimizer and everything else.

`--timer dispatch` times every aten operator itself (a `TorchDispatchMode` around each call, process
CPU time) instead of torch.profiler. The profiler's own allocations page-fault on this machine
(~75k minor faults per bf16 prior step, steps 40-55% slower than the benchmark's), and the cost lands
on whichever operator touches new memory first; the dispatch timer has no such effect.

    python -m benchmarks.profile_step prior --side ours --match-params 24918544
    python -m benchmarks.profile_step decoder --side ours --match-params 14245251 --layout efficient --channels-last --timer dispatch
    .venv-bench/bin/python -m benchmarks.profile_step decoder --side theirs
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from typing import Any, Callable

from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import bench_decoder, bench_prior, harness

GROUPS = {  # first match wins; names are aten operators
    "gemm (BLAS)": ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm"),
    "convolution (oneDNN)": ("aten::mkldnn_convolution", "aten::convolution", "aten::_convolution"),
    "attention": ("aten::_scaled_dot_product", "aten::_efficient_attention", "aten::_flash_attention"),
    "normalisation": ("aten::native_group_norm", "aten::native_layer_norm"),
    "optimizer": ("aten::_fused_adamw", "aten::_foreach"),
}


def group_of(name: str) -> str:
    for group, prefixes in GROUPS.items():
        if name.startswith(prefixes):
            return group
    return "other"


class OpTimer(TorchDispatchMode):
    """Process CPU seconds and calls per aten operator (named like the profiler's, `aten::mm`)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        start = time.process_time()
        out = func(*args, **(kwargs or {}))
        name = f"{func.namespace}::{func.overloadpacket.__name__}"
        self.seconds[name] += time.process_time() - start
        self.calls[name] += 1
        return out


def dispatch_times(step: Callable[[], Any], steps: int) -> dict[str, tuple[float, int]]:
    """{operator: (CPU seconds per step, calls per step)} over `steps` calls of `step`."""
    timer = OpTimer()
    with timer:
        for _ in range(steps):
            step()
    return {name: (t / steps, timer.calls[name] // steps) for name, t in timer.seconds.items()}


def print_shares(per_step: dict[str, float]) -> None:
    total = sum(per_step.values())
    shares: dict[str, float] = defaultdict(float)
    for name, t in per_step.items():
        shares[group_of(name)] += t
    for group, t in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"  {group:<22} {100 * t / total:5.1f}%  {t:7.3f} s/step")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", choices=("decoder", "prior"))
    parser.add_argument("--rows", type=int, default=25, help="operators to print")
    parser.add_argument("--timer", choices=("profiler", "dispatch"), default="profiler",
                        help="torch.profiler, or a dispatch-mode timer per aten operator")
    known, rest = parser.parse_known_args(argv)
    bench = bench_decoder if known.model == "decoder" else bench_prior
    args = harness.add_common_arguments(bench.add_arguments(argparse.ArgumentParser()), steps=2, warmup=2).parse_args(rest)
    device, _ = harness.start(args)
    built = bench.build(args, device)
    for _ in range(args.warmup):
        built.train_step()
    if known.timer == "dispatch":
        times = dispatch_times(built.train_step, args.steps)
        print(f"{known.model} / {args.side.value}: {built.params / 1e6:.2f} M params, "
              f"{sum(t for t, _ in times.values()):.3f} s CPU in operators per step")
        for name, (t, calls) in sorted(times.items(), key=lambda kv: -kv[1][0])[:known.rows]:
            print(f"  {1e3 * t:9.2f} ms  {calls:5d} calls  {name}")
        print_shares({name: t for name, (t, _) in times.items()})
        return
    cuda = device.type == "cuda"
    if cuda:  # unprofiled step time first: the profiler's own overhead would hide launch-boundness
        timing = harness.time_steps(built.train_step, steps=args.steps, warmup=0, device=device)
        print(f"step: {1e3 * timing['wall_s']:.1f} ms wall, {1e3 * timing['cpu_s']:.1f} ms host CPU (unprofiled)")
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(args.steps):
            built.train_step()
        harness.synchronize(device)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{known.model} / {args.side.value}: {built.params / 1e6:.2f} M params, "
          f"{total / 1e6 / args.steps:.3f} s self CPU per step")
    print(events.table(sort_by="self_cpu_time_total", row_limit=known.rows))
    print_shares({e.key: e.self_cpu_time_total / 1e6 / args.steps for e in events})
    if cuda:  # GPU busy time against the step's wall time: how launch-bound the step is
        gpu = sum(getattr(e, "self_device_time_total", 0) for e in events)
        print(f"GPU kernel time {gpu / 1e3 / args.steps:.1f} ms per step (profiled)")
        print(events.table(sort_by="self_cuda_time_total", row_limit=known.rows))
    if args.compile:
        from torch._dynamo.utils import counters

        print(f"dynamo: {dict(counters['stats'])}; graph breaks: {dict(counters['graph_break'])}")


if __name__ == "__main__":
    main()
