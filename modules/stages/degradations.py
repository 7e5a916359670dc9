"""Noise conditioning augmentation for the upsamplers (unCLIP §2.1, Ramesh et al. 2022).

The low-resolution conditioning image is corrupted during training at a random strength
s ∈ [0, 1] (the network is told s, embedded like a timestep); at sampling s is a chosen constant.

- ``Augmentation.BLUR`` (first upsampler): isotropic Gaussian blur, σ = s · ``blur_sigma_max``.
- ``Augmentation.BSR`` (second upsampler): a simplified BSR degradation (Zhang et al. 2021,
  "Designing a Practical Degradation Model for Deep Blind Image Super-Resolution"), in a fixed
  order blur -> down/up-sampling -> Gaussian noise -> JPEG. For strength s and u ~ U[0, 1]
  drawn independently per parameter:

  ======================  =========================================================  ==========
  parameter               range                                                      identity
  ======================  =========================================================  ==========
  blur σ (both axes)      [0, s · blur_sigma_max] low-res px; isotropic w.p.          σ = 0
                          ``isotropic_prob``, else anisotropic with angle θ ∈ [0, π)
  resize factor           [1, 1 + s · (scale_max − 1)]; down with AREA / BILINEAR /   factor 1
                          BICUBIC, back up with NEAREST / BILINEAR / BICUBIC
  noise std               [0, s · noise_std_max] in [-1, 1] image units              0
  JPEG quality            [100 − s · (100 − jpeg_quality_min), 100] (integer)         100
  ======================  =========================================================  ==========

  Strength 0 is exactly the identity. A batch draws ``BSR_UNIFORMS`` uniforms and one noise image
  per sample whatever the branches taken (`modules.core.draws`: a seeded ``torch.Generator`` makes
  the batch reproducible, and in training each sample's draws are its rows of the global batch's).

All functions take images (B, C, H, W) in [-1, 1] and return the same shape, clamped to [-1, 1].
Isotropic blur, resizing and JPEG are torchvision's (``transforms.v2.functional``); only the
rotated anisotropic kernel is written here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from modules.core import draws
from modules.core.hparams import coerce_fields


class Augmentation(str, Enum):
    """Which corruption the conditioning image receives."""

    NONE = "none"
    BLUR = "blur"
    BSR = "bsr"


class Resampling(str, Enum):
    """Interpolation for resizing images (AREA is average pooling, for downsampling)."""

    NEAREST = "nearest"
    AREA = "area"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


DOWN_MODES = (Resampling.AREA, Resampling.BILINEAR, Resampling.BICUBIC)
UP_MODES = (Resampling.NEAREST, Resampling.BILINEAR, Resampling.BICUBIC)
_TV_MODES = {
    Resampling.NEAREST: TF.InterpolationMode.NEAREST,
    Resampling.BILINEAR: TF.InterpolationMode.BILINEAR,
    Resampling.BICUBIC: TF.InterpolationMode.BICUBIC,
}


def resize(x: Tensor, size: tuple[int, int], mode: Resampling) -> Tensor:
    """(…, C, H, W) -> (…, C, h, w); antialiased when downsampling (torchvision), AREA via pooling."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode is Resampling.AREA:
        flat = x.reshape(-1, *x.shape[-3:])  # (N, C, H, W)
        return F.interpolate(flat, size=size, mode="area").reshape(*x.shape[:-2], *size)
    return TF.resize(x, list(size), interpolation=_TV_MODES[mode], antialias=True)


def kernel_size_for(sigma: float, height: int, width: int) -> int:
    """Odd kernel covering ±3σ, small enough for reflect padding (pad < min(H, W))."""
    size = 2 * math.ceil(3 * sigma) + 1
    return max(1, min(size, 2 * min(height, width) - 1))


def gaussian_blur(x: Tensor, sigma: float, kernel_size: int | None = None) -> Tensor:
    """Isotropic Gaussian blur with std `sigma` px (torchvision, reflect padding); σ = 0: identity.
    `kernel_size` fixes the (odd) kernel, e.g. the paper's 3 x 3 (unCLIP Table 3); None covers ±3σ."""
    if sigma <= 0:
        return x
    k = kernel_size_for(sigma, *x.shape[-2:]) if kernel_size is None else kernel_size
    return TF.gaussian_blur(x, [k, k], [sigma, sigma])


def anisotropic_gaussian_kernel(sigma_x: float, sigma_y: float, theta: float, size: int) -> Tensor:
    """(size, size) kernel ∝ exp(−½ pᵀ Σ⁻¹ p), Σ = R(θ) diag(σx², σy²) R(θ)ᵀ, summing to 1.

    p = (x, y) pixel offsets from the centre (x to the right, y down); R(θ) rotates by θ.
    """
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    c, s = math.cos(theta), math.sin(theta)
    u, v = c * x + s * y, -s * x + c * y  # coordinates along the kernel's principal axes
    logits = -0.5 * ((u / max(sigma_x, 1e-6)) ** 2 + (v / max(sigma_y, 1e-6)) ** 2)
    kernel = torch.exp(logits - logits.max())
    return (kernel / kernel.sum()).float()


def anisotropic_blur(x: Tensor, sigma_x: float, sigma_y: float, theta: float) -> Tensor:
    """(C, H, W) or (B, C, H, W) convolved per channel with `anisotropic_gaussian_kernel`."""
    if max(sigma_x, sigma_y) <= 0:
        return x
    k = kernel_size_for(max(sigma_x, sigma_y), *x.shape[-2:])
    kernel = anisotropic_gaussian_kernel(sigma_x, sigma_y, theta, k).to(x)
    flat = x.reshape(-1, 1, *x.shape[-2:])  # (N·C, 1, H, W)
    flat = F.pad(flat, [k // 2] * 4, mode="reflect")
    return F.conv2d(flat, kernel[None, None]).reshape(x.shape)


def jpeg(x: Tensor, quality: int) -> Tensor:
    """JPEG round trip of (C, H, W) in [-1, 1] at `quality` (torchvision, on CPU); 100 = identity."""
    if quality >= 100:
        return x
    u8 = ((x.detach().cpu().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return (TF.jpeg(u8, quality).to(x.device, torch.float32) / 127.5 - 1).to(x.dtype)


@dataclass(frozen=True)
class BSRParams:
    """One sample's BSR degradation (see the module docstring for the ranges)."""

    sigma_x: float
    sigma_y: float
    theta: float
    scale: float
    down: Resampling
    up: Resampling
    noise_std: float
    jpeg_quality: int


@dataclass
class DegradationConfig:
    """Which corruption and its ranges at strength 1 (YAML: `kind: BSR`)."""

    kind: Augmentation = Augmentation.BLUR
    blur_sigma_max: float = 1.0  # low-res pixels
    blur_kernel_size: Optional[int] = None  # odd; None: covers ±3σ. The paper's 64->256 blur: 3 (Table 3)
    isotropic_prob: float = 0.5
    scale_max: float = 2.0
    noise_std_max: float = 0.1  # [-1, 1] units (≈ 12.75 / 255)
    jpeg_quality_min: int = 30

    def __post_init__(self) -> None:
        coerce_fields(self)
        if not (0 <= self.isotropic_prob <= 1 and self.scale_max >= 1 and 1 <= self.jpeg_quality_min <= 100):
            raise ValueError(f"invalid degradation ranges: {self}")
        if self.blur_kernel_size is not None and (self.blur_kernel_size < 1 or self.blur_kernel_size % 2 == 0):
            raise ValueError(f"degradation.blur_kernel_size: must be a positive odd number, got {self.blur_kernel_size}")

    def __call__(self, x: Tensor, strength: Tensor | float, generator: torch.Generator | None = None) -> Tensor:
        """x (B, C, H, W) in [-1, 1], strength (B,) or scalar in [0, 1] -> corrupted (B, C, H, W).

        BSR draws through `modules.core.draws` (the training step's keyed draws unless `generator`).
        """
        strength = torch.as_tensor(strength, dtype=torch.float64).expand(x.shape[0]).tolist()
        if any(not 0 <= s <= 1 for s in strength):
            raise ValueError(f"strength must lie in [0, 1], got {strength}")
        if self.kind is Augmentation.NONE:
            return x
        if self.kind is Augmentation.BLUR:
            out = [gaussian_blur(xi, s * self.blur_sigma_max, self.blur_kernel_size) for xi, s in zip(x, strength)]
        else:
            u = draws.uniform((x.shape[0], BSR_UNIFORMS), device="cpu", generator=generator).tolist()  # (B, 9)
            eps = draws.normal(x.shape, device=x.device, dtype=x.dtype, generator=generator)  # (B, C, H, W)
            out = [apply_bsr(xi, bsr_params(s, self, ui), ei) for xi, s, ui, ei in zip(x, strength, u, eps)]
        return torch.stack(out).clamp(-1, 1)


BSR_UNIFORMS = 9  # uniforms per sample's BSR parameters


def bsr_params(strength: float, cfg: DegradationConfig, u: Sequence[float]) -> BSRParams:
    """One sample's BSR parameters at `strength` from `BSR_UNIFORMS` uniforms u ∈ [0, 1)."""
    if len(u) != BSR_UNIFORMS:
        raise ValueError(f"bsr_params takes {BSR_UNIFORMS} uniforms, got {len(u)}")
    isotropic = u[0] < cfg.isotropic_prob
    sigma_max = strength * cfg.blur_sigma_max
    sigma_x = sigma_max * u[1]
    sigma_y = sigma_x if isotropic else sigma_max * u[2]
    theta = 0.0 if isotropic else math.pi * u[3]
    return BSRParams(
        sigma_x=sigma_x,
        sigma_y=sigma_y,
        theta=theta,
        scale=1 + strength * (cfg.scale_max - 1) * u[4],
        down=DOWN_MODES[min(int(u[5] * len(DOWN_MODES)), len(DOWN_MODES) - 1)],
        up=UP_MODES[min(int(u[6] * len(UP_MODES)), len(UP_MODES) - 1)],
        noise_std=strength * cfg.noise_std_max * u[7],
        jpeg_quality=int(round(100 - strength * (100 - cfg.jpeg_quality_min) * u[8])),
    )


def apply_bsr(x: Tensor, p: BSRParams, eps: Tensor) -> Tensor:
    """One image (C, H, W) in [-1, 1] through blur -> down/up-sampling -> noise -> JPEG; `eps` is
    standard normal noise shaped like `x`, scaled by `p.noise_std`."""
    if p.sigma_x == p.sigma_y:
        x = gaussian_blur(x, p.sigma_x)
    else:
        x = anisotropic_blur(x, p.sigma_x, p.sigma_y, p.theta)
    H, W = x.shape[-2:]
    small = (max(1, round(H / p.scale)), max(1, round(W / p.scale)))
    if small != (H, W):
        x = resize(resize(x, small, p.down), (H, W), p.up)
    if p.noise_std > 0:
        x = x + p.noise_std * eps.to(x)
    return jpeg(x.clamp(-1, 1), p.jpeg_quality)
