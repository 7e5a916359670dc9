"""`Linear` that runs its fp32 CPU GEMMs through oneDNN instead of MKL where that is faster.

On CPU, torch sends `nn.Linear` (addmm / mm) to MKL's sgemm and convolutions to oneDNN. MKL picks
its kernels by CPU vendor: on AMD Zen it runs sgemm at about 40% of what oneDNN reaches on the same
core (measured here: ~105 vs ~250 GFLOP/s per core, forward + backward; `benchmarks/matmul_peak.py`
and `benchmarks/profile_step.py`). A linear layer is a 1x1 convolution, so `linear` lays the rows
out as a channels-last (16, K, rows/16, 1) map — a view, no copy, when the input is contiguous —
and calls `F.conv2d`, whose forward and backward both run in oneDNN. The result equals `F.linear`
up to float summation order; gradients flow through the convolution's own autograd.

Used only where it pays: fp32 on CPU, outside autocast (bf16 GEMMs already run in oneDNN) and
outside `torch.compile` (inductor picks its own kernels), at least `MIN_ROWS` rows (below that
oneDNN's setup costs more than it saves), and when the backend resolves to oneDNN: `auto` (the
default) means oneDNN when torch's BLAS is MKL on an AMD CPU; the environment variable
``UNCLIP_CPU_LINEAR=onednn|blas|auto`` or :func:`set_cpu_linear_backend` overrides it.

Under CPU bf16 autocast, where the CPU has native bf16 (`onednn_bf16_linear`), `linear` runs as one
autograd function (`_AutocastBf16Linear`) with the same
bf16 GEMMs as autocast's ``F.linear`` (same values and gradients, bit for bit on the prior): the forward
through oneDNN's linear with the bias fused (``addmm`` first writes the broadcast bias into its output:
fc1 (5184, 512) -> 2752 took 32.7 vs 28.5 ms), and the weight gradient in whichever orientation is
faster: torch computes gᵀx (N, K), which with K > N runs at ~390 vs ~470 GFLOP/s for its transpose xᵀg
(38.4 vs 32.1 ms at N = 512, K = 2752); the transposed result is cast to the weight's dtype in one copy.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.core.hardware import cpu_has_native_bf16

BACKENDS = ("auto", "onednn", "blas")
MIN_ROWS = 64  # fwd+bwd (rows, 512) x (512, 512): 1.1x at 64 rows, 1.6x at 128, 2.2x at 5184
ROW_GROUPS = 16  # oneDNN is chosen for 1x1 convolutions with a batch of at least 16 (torch's heuristic)
_override: Optional[str] = None


def set_cpu_linear_backend(backend: Optional[str]) -> None:
    """Force ``"onednn"`` or ``"blas"`` for fp32 CPU linear layers; ``None`` / ``"auto"`` restores
    the default (environment variable, then CPU vendor)."""
    global _override
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"cpu linear backend must be one of {BACKENDS}, got {backend!r}")
    _override = None if backend in (None, "auto") else backend


@functools.lru_cache(maxsize=1)
def _cpu_vendor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_linear_backend() -> str:
    """The backend fp32 CPU linear layers use now: ``"onednn"`` or ``"blas"``."""
    choice = _override or os.environ.get("UNCLIP_CPU_LINEAR", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"UNCLIP_CPU_LINEAR must be one of {BACKENDS}, got {choice!r}")
    if choice == "auto":
        mkl_on_amd = torch.backends.mkl.is_available() and _cpu_vendor() == "AuthenticAMD"
        choice = "onednn" if mkl_on_amd else "blas"
    if choice == "onednn" and not torch.backends.mkldnn.is_available():
        return "blas"
    return choice


def _eager_cpu_rows(x: Tensor) -> bool:
    """Where either oneDNN route may apply: rows of a CPU tensor, eager mode, oneDNN switched on."""
    return (
        x.device.type == "cpu"
        and x.dim() >= 2
        and not torch.compiler.is_compiling()
        and torch.backends.mkldnn.enabled
    )


def _use_onednn(x: Tensor, weight: Tensor) -> bool:
    return (
        _eager_cpu_rows(x)
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.numel() // max(x.shape[-1], 1) >= MIN_ROWS
        and not torch.is_autocast_enabled("cpu")
        and cpu_linear_backend() == "onednn"
    )


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)``: x (..., K), weight (N, K) -> (..., N); oneDNN where it pays."""
    if _autocast_bf16_cpu(x):
        return _AutocastBf16Linear.apply(x, weight, bias)
    if not _use_onednn(x, weight):
        return F.linear(x, weight, bias)
    k, n = x.shape[-1], weight.shape[0]
    rows = x.reshape(-1, k)  # (M, K)
    m = rows.shape[0]
    pad = -m % ROW_GROUPS
    if pad:
        rows = F.pad(rows, (0, 0, 0, pad))  # (M', K), M' a multiple of 16
    fmap = rows.view(ROW_GROUPS, -1, 1, k).permute(0, 3, 1, 2)  # (16, K, M'/16, 1), channels-last view
    out = F.conv2d(fmap, weight[:, :, None, None], bias)  # (16, N, M'/16, 1), channels-last
    out = out.permute(0, 2, 3, 1).reshape(-1, n)  # (M', N)
    return out[:m].view(*x.shape[:-1], n)


def _autocast_bf16_cpu(x: Tensor) -> bool:
    return (
        _eager_cpu_rows(x)
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and onednn_bf16_linear()
    )


@functools.cache
def onednn_bf16_linear() -> bool:
    """Whether bf16 linear layers can run through oneDNN's fused linear
    (`torch.ops.mkldnn._linear_pointwise`, what inductor calls on CPU): the private op exists (oneDNN
    built in, this torch) and the CPU has native bf16 (`modules.core.hardware`). On an AVX2-only CPU
    oneDNN cannot build the bf16 inner product at all ("could not create a primitive descriptor"),
    so autocast's own `F.linear` runs instead."""
    return cpu_has_native_bf16() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class _AutocastBf16Linear(torch.autograd.Function):
    """What autocast's ``F.linear`` computes (inputs cast to bf16, bf16 GEMMs with fp32 accumulation,
    gradients cast back to the inputs' dtypes), with the bias fused and the faster weight-gradient GEMM."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        x2 = x.to(torch.bfloat16).reshape(-1, x.shape[-1])  # (M, K)
        w = weight.to(torch.bfloat16).contiguous()  # (N, K)
        b = bias.to(torch.bfloat16) if bias is not None else None
        out = torch.ops.mkldnn._linear_pointwise(x2, w, b, "none", [], "")  # (M, N)
        ctx.save_for_backward(x2, w)
        ctx.x_meta = (x.dtype, x.shape)
        ctx.param_dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return out.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        x2, w = ctx.saved_tensors
        (x_dtype, x_shape), (w_dtype, b_dtype) = ctx.x_meta, ctx.param_dtypes
        g = grad.reshape(-1, grad.shape[-1]).to(torch.bfloat16)  # (M, N)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g, w).view(x_shape).to(x_dtype)
        if ctx.needs_input_grad[1]:
            n, k = w.shape
            if k > n:  # xᵀg (K, N), transposed in the cast
                grad_w = torch.empty((n, k), dtype=w_dtype, device=w.device).copy_(torch.mm(x2.t(), g).t())
            else:
                grad_w = torch.mm(g.t(), x2).to(w_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = g.sum(0).to(b_dtype)
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state-dict keys) whose forward is :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class Conv1x1(nn.Conv2d):
    """1x1 `nn.Conv2d` (same parameters and state-dict keys) that runs as :func:`linear` over the
    pixels of a channels-last input. torch sends 1x1 convolutions with a batch below 16 to its
    BLAS fallback, so a U-Net's channel-changing skip convolutions at batch 8 would miss oneDNN.
    NCHW inputs take the plain convolution (the pixel-major copy costs more than it saves)."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H, W)
        pixels = x.permute(0, 2, 3, 1)  # (B, H, W, C_in), a view
        if not (pixels.is_contiguous() and _use_onednn(pixels, self.weight)):
            return super().forward(x)
        return linear(pixels, self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)  # channels-last
