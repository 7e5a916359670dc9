"""What this machine's arithmetic units can do, where a config's choice depends on it.

bf16 pays only where the hardware runs it natively: CUDA GPUs, and CPUs with AVX512-BF16, AMX or
AVX-NE-CONVERT, whose bf16 GEMMs and convolutions oneDNN runs. On a CPU with AVX2 only, oneDNN
has no bf16 kernels: torch's fallbacks run the demo decoder's bf16 training step 11x slower than
its fp32 step (6.5 s against 0.58 s, batch 32, on an AMD EPYC host with AVX2 only, 2 threads), and
oneDNN's bf16 inner product cannot be built at all. So a bf16 request runs in fp32 there
(`native_bf16`), with one line saying so: the same seed on the same machine still gives the same
weights, and a machine with native bf16 still trains in bf16.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 GEMMs and convolutions natively on this CPU (AVX512-BF16, AMX or
    AVX-NE-CONVERT), as torch itself decides (`torch.ops.mkldnn._is_mkldnn_bf16_supported`)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(torch.backends.mkldnn.is_available() and check is not None and check())


def native_bf16(device_type: str) -> bool:
    """Whether bf16 arithmetic runs natively on a device of this type ("cpu", "cuda", ...)."""
    return cpu_has_native_bf16() if device_type == "cpu" else True


@functools.cache
def say_bf16_runs_in_fp32(what: str) -> None:
    """Log, once per process and request, that a bf16 request (`what`) runs in fp32 on this CPU."""
    log.warning("this CPU has no native bf16 (AVX512-BF16 / AMX / AVX-NE-CONVERT; "
                "torch.backends.cpu.get_cpu_capability() = %s): %s runs in fp32 instead",
                torch.backends.cpu.get_cpu_capability(), what)
