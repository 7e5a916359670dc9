"""What every benchmark process shares: runtime setup, step timing, memory and FLOP counting.

Each measurement runs in its own process (``run_all.py`` starts them), so one side's allocator
state, thread pool or imported packages never affect the other. A process prints exactly one
result line, ``BENCH_RESULT {json}``, which ``run_all.py`` parses.

Timing: every step is timed by wall clock and by process CPU time (user + system, all threads),
since other processes on shared cores inflate wall time; page faults per step are recorded too
(glibc large-allocation page faults can dominate CPU steps, see ../shared/ENVIRONMENT.md).
Memory: on CPU the peak resident set measured from just before the model is built (the peak is
reset through /proc/self/clear_refs, so import-time peaks do not count); on CUDA the peak
allocated memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Iterator

import torch

RESULT_PREFIX = "BENCH_RESULT "
MB = 2**20
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")  # torch.compile modes `--compile` takes


class Side(str, Enum):
    OURS = "ours"  # this project
    THEIRS = "theirs"  # dalle2-pytorch


@dataclass
class Built:
    """A built side of a benchmark: the trained network's size, one training step, a sampler."""

    params: int
    train_step: Callable[[], Any]
    sample: Callable[[int, float, "torch.Generator | None"], torch.Tensor]  # (steps, guidance, generator)
    config: dict[str, Any]


class Precision(str, Enum):
    FP32 = "fp32"
    BF16 = "bf16"  # autocast to bfloat16 (CPU: AVX512-BF16 / AMX kernels of oneDNN; CUDA: tensor cores)


def add_common_arguments(parser: argparse.ArgumentParser, *, steps: int, warmup: int) -> argparse.ArgumentParser:
    parser.add_argument("--side", type=Side, choices=list(Side), required=True)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", type=Precision, choices=list(Precision), default=Precision.FP32,
                        help="bf16: run the step under torch.autocast(bfloat16), on both sides alike")
    parser.add_argument("--compile", nargs="?", const="default", default=None,
                        choices=COMPILE_MODES, help="torch.compile the network, both sides alike (mode; reduce-overhead: CUDA graphs)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--steps", type=int, default=steps, help="timed steps")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed steps first")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (tests): seconds, not minutes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu-linear", choices=("auto", "onednn", "blas"), default="auto",
                        help="ours: backend of fp32 CPU linear layers (modules/networks/linear.py)")
    return parser


def configure_runtime(args: argparse.Namespace) -> torch.device:
    """Threads, seed, device; on CUDA also TF32 off so fp32 stays fp32 on both sides."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.side is Side.OURS:
        from modules.networks.linear import set_cpu_linear_backend

        set_cpu_linear_backend(args.cpu_linear)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return device


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    if precision is Precision.BF16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def maybe_compile(module: torch.nn.Module, mode: str | None) -> torch.nn.Module:
    """`torch.compile` in place (class, attributes and state-dict keys stay); no-op when `mode` is
    None. The first call must not run under a TorchDispatchMode such as FlopCounterMode: dynamo
    would skip the frame for good and the module would silently run eagerly."""
    if mode:
        module.compile(mode=None if mode == "default" else mode)
    return module


def make_optimizer(params: Any, fused: bool) -> torch.optim.Optimizer:
    """The same AdamW on both sides (fused kernel: CPU and CUDA in torch >= 2.4)."""
    return torch.optim.AdamW(params, lr=1e-4, fused=fused or None)


def train_step_fn(loss_fn: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer, device: torch.device,
                  precision: Precision) -> Callable[[], None]:
    """One training step: loss under autocast (bf16) or not, backward, optimizer step."""

    def step() -> None:
        with autocast(device, precision):
            loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------ memory
def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


@dataclass
class MemoryMeter:
    """Peak memory from `start()` on: resident set (CPU) or allocated bytes (CUDA), in MB."""

    device: torch.device
    base_mb: float = 0.0
    peak_reset: bool = False

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_mb = torch.cuda.memory_allocated(self.device) / MB
            return
        try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.peak_reset = True
        except OSError:
            self.peak_reset = False
        self.base_mb = (_status_kb("VmRSS") or 0) / 1024

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / MB
        hwm = _status_kb("VmHWM")
        return hwm / 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def report(self) -> dict[str, Any]:
        peak = self.peak_mb()
        return {"mem_base_mb": self.base_mb, "mem_peak_mb": peak, "mem_mb": peak - self.base_mb,
                "mem_kind": "cuda_max_allocated" if self.device.type == "cuda" else "cpu_rss",
                "mem_peak_reset": self.peak_reset or self.device.type == "cuda"}


# ------------------------------------------------------------------------------------ timing
@dataclass
class StepTimes:
    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)  # user + system, all threads of the process
    user_s: list[float] = field(default_factory=list)
    sys_s: list[float] = field(default_factory=list)
    minor_faults: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        med = statistics.median
        return {
            "steps": len(self.wall_s), "wall_s": med(self.wall_s), "wall_min_s": min(self.wall_s),
            "cpu_s": med(self.cpu_s), "cpu_min_s": min(self.cpu_s), "user_s": med(self.user_s),
            "sys_s": med(self.sys_s), "minor_faults": int(med(self.minor_faults)),
            "wall_all_s": self.wall_s, "cpu_all_s": self.cpu_s,
        }


@contextlib.contextmanager
def timed(times: StepTimes, device: torch.device) -> Iterator[None]:
    synchronize(device)
    r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    yield
    synchronize(device)
    w1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    user, system = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
    times.wall_s.append(w1 - w0)
    times.user_s.append(user)
    times.sys_s.append(system)
    times.cpu_s.append(user + system)
    times.minor_faults.append(r1.ru_minflt - r0.ru_minflt)


def time_steps(step: Callable[[], Any], *, steps: int, warmup: int, device: torch.device) -> dict[str, Any]:
    """Run `warmup` untimed then `steps` timed calls of `step`; median/min wall and CPU seconds."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = StepTimes()
    for _ in range(steps):
        with timed(times, device):
            step()
    return times.summary()


# ------------------------------------------------------------------------------------ FLOPs
def _cpu_flash_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)


def _onednn_linear_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode passes shapes: x (M, K), weight (N, K)."""
    return 2 * x_shape.numel() * weight_shape[0]


def flop_counter() -> Any:
    """torch's FlopCounterMode plus the CPU kernels it does not know: the flash-attention kernels
    (torch 2.13 counts SDPA only through its CUDA kernels, so CPU attention would count as zero) and
    oneDNN's fused linear, which `modules.networks.linear` runs under bf16 autocast."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flops,
    }
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        mapping[torch.ops.mkldnn._linear_pointwise] = _onednn_linear_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops(step: Callable[[], Any]) -> int:
    """FLOPs (multiply-add = 2) of one call of `step`, forward and backward as it runs them."""
    with flop_counter() as counter:
        step()
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------------ output
def environment(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    return {
        "side": args.side.value, "device": str(device), "dtype": args.dtype.value, "compile": args.compile,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "tiny": args.tiny,
        "malloc_env": {k: os.environ.get(k) for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")},
    }


def start(args: argparse.Namespace) -> tuple[torch.device, MemoryMeter]:
    """Common start of a benchmark process: runtime, the side's imports, then the memory baseline."""
    quiet_warnings()
    device = configure_runtime(args)
    preload(args.side)
    memory = MemoryMeter(device)
    memory.start()
    return device, memory


def train_benchmark(args: argparse.Namespace, built: Any, device: torch.device, memory: MemoryMeter, *,
                    bench: str, unit: str, batch: int, **extra: Any) -> dict[str, Any]:
    """Count the FLOPs of one training step (the first warm-up step), time the others, report."""
    result: dict[str, Any] = {"bench": bench, "params": built.params, "config": built.config, **environment(args, device)}
    if args.count_only:
        return result
    if args.compile:  # compile outside FlopCounterMode: dynamo would skip the frame for good under it
        built.train_step()
    flops = count_flops(built.train_step)
    timing = time_steps(built.train_step, steps=args.steps, warmup=max(0, args.warmup - 1), device=device)
    result.update(**timing, **memory.report(), **extra, batch=batch, unit=unit, flops_per_step=flops,
                  throughput=batch / timing["wall_s"], throughput_cpu=batch / timing["cpu_s"],
                  achieved_flops=flops / timing["wall_s"], achieved_flops_cpu=flops / timing["cpu_s"])
    return result


def emit(result: dict[str, Any]) -> None:
    """The one line `run_all.py` reads from this process."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def parse_result(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise ValueError("no BENCH_RESULT line in the benchmark's output")


def preload(side: Side) -> None:
    """Import one side's packages before memory is measured, so imports do not count as memory."""
    if side is Side.THEIRS:
        import dalle2_pytorch  # noqa: F401
    else:
        import modules.stages.decoder  # noqa: F401
        import modules.stages.prior  # noqa: F401


def quiet_warnings() -> None:
    """Silence library warnings that would flood the log (self.log outside a Trainer, einops...)."""
    import warnings

    warnings.filterwarnings("ignore")


def interleaved_rounds(cases: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall seconds of each case per round, the cases run in turn within every round (so a drift in
    the machine's speed falls on all of them), after `warmup` untimed passes over all of them."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def print_medians(ms: dict[str, list[float]], suffix: Callable[[float], str] = lambda med: "",
                  digits: int = 1) -> dict[str, float]:
    """One line per case: median [min, max] of its times (ms, or whatever unit they are in), to
    `digits` decimals (and `suffix(median)`); the medians."""
    med = {name: statistics.median(v) for name, v in ms.items()}
    width = max(len(name) for name in ms) + 2
    for name, v in ms.items():
        print(f"  {name:{width}s} {med[name]:7.{digits}f} [{min(v):.{digits}f}, {max(v):.{digits}f}]{suffix(med[name])}")
    return med
