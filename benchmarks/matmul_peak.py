"""This machine's measured matrix-multiply peak, the yardstick for achieved FLOP/s (MFU).

On CPU, fp32 GEMMs run through two libraries in torch: MKL (`torch.mm`, `nn.Linear`) and oneDNN
(convolutions; a 1x1 convolution over a channels-last map is a GEMM, a 3x3 one an implicit GEMM).
They can differ by 2x on the same core (on AMD Zen, MKL's sgemm runs at about half of oneDNN's
rate), so all three are measured and the peak is the fastest: the best dense rate this core reaches.
bf16 GEMMs run through oneDNN (AVX512-BF16 / AMX where the CPU has them). On CUDA: `torch.mm`
with TF32 off (fp32) and in bf16. Each figure is the best of `--repeats`, by wall time and by
process CPU time (the CPU-time figure is robust to other processes sharing the cores).

    python -m benchmarks.matmul_peak [--threads 1] [--device cuda]
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from benchmarks import harness


def best_rate(fn: Callable[[], Any], flops: float, device: torch.device, repeats: int) -> dict[str, float]:
    """Best FLOP/s over `repeats` calls (after one warm-up), by wall clock and by CPU time."""
    fn()
    harness.synchronize(device)
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        harness.synchronize(device)
        best_wall = min(best_wall, time.perf_counter() - w0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return {"flops_wall": flops / best_wall, "flops_cpu": flops / max(best_cpu, 1e-9)}


def measure(device: torch.device, n: int, repeats: int) -> dict[str, Any]:
    """{"fp32": {method: rates}, "bf16": {...}, "peak": {dtype: {"flops_wall", "flops_cpu"}}}."""
    flops = 2.0 * n**3
    out: dict[str, Any] = {"n": n}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        methods = {"mm": best_rate(lambda: a @ b, flops, device, repeats)}
        if device.type == "cpu":  # oneDNN: a 1x1 convolution of an NHWC map is a (16·32·32, c) x (c, c) GEMM
            c = min(n, 1024)
            x = torch.randn(16, c, 32, 32, dtype=dtype).contiguous(memory_format=torch.channels_last)
            w1, w3 = torch.randn(c, c, 1, 1, dtype=dtype), torch.randn(c // 2, c // 2, 3, 3, dtype=dtype)
            x3 = x[:, : c // 2].contiguous(memory_format=torch.channels_last)
            methods["conv1x1_onednn"] = best_rate(lambda: F.conv2d(x, w1), 2.0 * 16 * 1024 * c * c, device, repeats)
            methods["conv3x3_onednn"] = best_rate(lambda: F.conv2d(x3, w3, padding=1), 2.0 * 16 * 1024 * (c // 2) ** 2 * 9,
                                                  device, repeats)
        out[name] = methods
    out["peak"] = {name: {k: max(m[k] for m in out[name].values()) for k in ("flops_wall", "flops_cpu")}
                   for name in ("fp32", "bf16")}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n", type=int, default=None, help="square matrix side (default 2048 on CPU, 8192 on CUDA)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="n = 256, 2 repeats (tests)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    n, repeats = (256, 2) if args.tiny else (args.n or (8192 if device.type == "cuda" else 2048), args.repeats)
    result = {"bench": "matmul_peak", "device": str(device), "threads": torch.get_num_threads(), **measure(device, n, repeats)}
    harness.emit(result)


if __name__ == "__main__":
    main()
