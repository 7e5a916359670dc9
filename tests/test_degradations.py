"""Noise conditioning augmentation: identity at strength 0, seeded determinism, stated ranges,
and the corruptions themselves against closed forms (kernel moments, noise std, pooling)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modules.stages.degradations import (
    BSR_UNIFORMS,
    DOWN_MODES,
    UP_MODES,
    Augmentation,
    BSRParams,
    DegradationConfig,
    Resampling,
    anisotropic_blur,
    anisotropic_gaussian_kernel,
    apply_bsr,
    bsr_params,
    gaussian_blur,
    jpeg,
    resize,
)

BSR = DegradationConfig(kind=Augmentation.BSR, blur_sigma_max=2.0, scale_max=3.0, noise_std_max=0.2, jpeg_quality_min=20)


def images(b: int = 4, size: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def second_moments(kernel: torch.Tensor) -> tuple[float, float, float]:
    """(E[x²], E[y²], E[xy]) of a centred (k, k) kernel read as a distribution (x right, y down)."""
    k = kernel.shape[-1]
    r = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    w = kernel.double() / kernel.double().sum()
    return (w * x * x).sum().item(), (w * y * y).sum().item(), (w * x * y).sum().item()


def delta(size: int = 41) -> torch.Tensor:
    img = torch.zeros(1, 1, size, size)
    img[..., size // 2, size // 2] = 1.0
    return img


@pytest.mark.parametrize("kind", [Augmentation.BLUR, Augmentation.BSR])
def test_strength_zero_is_identity_per_sample(kind):
    cfg = DegradationConfig(kind=kind)
    x = images()
    out = cfg(x, torch.tensor([0.0, 1.0, 0.0, 0.8]), torch.Generator().manual_seed(0))
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    assert (out[1] - x[1]).abs().mean() > 0.05 and (out[3] - x[3]).abs().mean() > 0.05


def test_bsr_is_deterministic_under_a_seed():
    x, s = images(), torch.tensor([0.3, 0.6, 0.9, 1.0])
    a = BSR(x, s, torch.Generator().manual_seed(7))
    b = BSR(x, s, torch.Generator().manual_seed(7))
    c = BSR(x, s, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("strength", [0.25, 1.0])
def test_bsr_parameters_stay_in_and_cover_their_stated_ranges(strength):
    gen = torch.Generator().manual_seed(0)
    params = [bsr_params(strength, BSR, u) for u in torch.rand(400, BSR_UNIFORMS, generator=gen).tolist()]
    bounds = {
        "sigma": strength * BSR.blur_sigma_max,
        "scale": 1 + strength * (BSR.scale_max - 1),
        "noise": strength * BSR.noise_std_max,
        "quality": 100 - strength * (100 - BSR.jpeg_quality_min),
    }
    sigmas = [s for p in params for s in (p.sigma_x, p.sigma_y)]
    assert 0 <= min(sigmas) and max(sigmas) <= bounds["sigma"] and max(sigmas) > 0.95 * bounds["sigma"]
    scales = [p.scale for p in params]
    assert min(scales) >= 1 and max(scales) <= bounds["scale"] and max(scales) > 1 + 0.95 * (bounds["scale"] - 1)
    noises = [p.noise_std for p in params]
    assert min(noises) >= 0 and max(noises) <= bounds["noise"] and max(noises) > 0.95 * bounds["noise"]
    qualities = [p.jpeg_quality for p in params]
    assert min(qualities) >= math.floor(bounds["quality"]) and max(qualities) <= 100
    assert min(qualities) <= bounds["quality"] + 2
    assert all(0 <= p.theta < math.pi for p in params)
    assert {p.down for p in params} == set(DOWN_MODES) and {p.up for p in params} == set(UP_MODES)
    isotropic = sum(p.sigma_x == p.sigma_y for p in params) / len(params)
    assert abs(isotropic - BSR.isotropic_prob) < 0.1


def test_bsr_output_stays_in_range():
    x = images(4, 16).sign()  # saturated ±1 images: overshoot from bicubic / noise must be clamped
    out = BSR(x, torch.ones(4), torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1


def test_blur_strength_sets_sigma_and_smooths_monotonically():
    cfg = DegradationConfig(kind=Augmentation.BLUR, blur_sigma_max=2.0)
    x = images(1, 32).expand(3, -1, -1, -1)
    out = cfg(x, torch.tensor([0.25, 0.5, 1.0]))
    assert torch.allclose(out[1], gaussian_blur(x[1], 1.0).clamp(-1, 1))
    tv = [(o[..., 1:] - o[..., :-1]).abs().mean().item() for o in out]
    assert tv[0] > tv[1] > tv[2]


def test_isotropic_blur_of_a_delta_has_variance_sigma_squared():
    ex2, ey2, exy = second_moments(gaussian_blur(delta(), 2.0)[0, 0])
    assert ex2 == pytest.approx(4.0, rel=0.03) and ey2 == pytest.approx(4.0, rel=0.03)
    assert abs(exy) < 1e-6


def test_anisotropic_kernel_and_blur_have_the_rotated_covariance():
    """Σ = R(θ) diag(σx², σy²) R(θ)ᵀ: E[x²] = σx²c² + σy²s², E[y²] = σx²s² + σy²c², E[xy] = (σx² − σy²)cs."""
    sx, sy, theta = 2.5, 1.0, 0.6
    c, s = math.cos(theta), math.sin(theta)
    expected = (sx**2 * c * c + sy**2 * s * s, sx**2 * s * s + sy**2 * c * c, (sx**2 - sy**2) * c * s)
    kernel = anisotropic_gaussian_kernel(sx, sy, theta, 41)
    assert kernel.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert second_moments(kernel) == pytest.approx(expected, rel=1e-3)
    # The convolution flips the kernel, which leaves a centred Gaussian's covariance unchanged.
    assert second_moments(anisotropic_blur(delta(), sx, sy, theta)[0, 0]) == pytest.approx(expected, rel=0.03)


def test_noise_has_its_stated_std():
    p = BSRParams(0.0, 0.0, 0.0, 1.0, Resampling.AREA, Resampling.NEAREST, noise_std=0.05, jpeg_quality=100)
    out = apply_bsr(torch.zeros(3, 64, 64), p, torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert out.std().item() == pytest.approx(0.05, rel=0.05) and abs(out.mean().item()) < 0.005


def test_resize_modes_and_jpeg():
    x = images(2, 16)
    assert torch.allclose(resize(x, (8, 8), Resampling.AREA), F.avg_pool2d(x, 2))
    assert torch.equal(resize(x, (16, 16), Resampling.BICUBIC), x)
    assert resize(x[0], (12, 12), Resampling.BICUBIC).shape == (3, 12, 12)
    assert torch.equal(jpeg(x[0], 100), x[0])
    smooth = gaussian_blur(x[0], 1.5)
    err_hi, err_lo = [(jpeg(smooth, q) - smooth).abs().mean().item() for q in (95, 10)]
    assert err_lo > err_hi > 0
    assert jpeg(smooth, 10).abs().max() <= 1


def test_config_validation_and_yaml_names():
    assert DegradationConfig(kind="BSR").kind is Augmentation.BSR
    assert torch.equal(DegradationConfig(kind="NONE")(images(), 1.0), images())
    with pytest.raises(ValueError):
        DegradationConfig(scale_max=0.5)
    with pytest.raises(ValueError):
        DegradationConfig()(images(), 1.5)


def test_paper_blur_kernel_3_matches_the_closed_form_3_tap_gaussian():
    """unCLIP Table 3's 64->256 blur: a 3 x 3 kernel at σ 0.6. Away from the border the output is
    the image convolved with w = exp(-i²/2σ²) / Σ, i ∈ {-1, 0, 1}, along each axis."""
    cfg = DegradationConfig(kind=Augmentation.BLUR, blur_sigma_max=0.6, blur_kernel_size=3)
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1.0
    out = cfg(x, torch.tensor([1.0]))[0, 0]
    w = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) / (2 * 0.6**2))
    w = w / w.sum()
    expected = torch.zeros(9, 9)
    expected[3:6, 3:6] = torch.outer(w, w)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    wide = DegradationConfig(kind=Augmentation.BLUR, blur_sigma_max=0.6)(x, torch.tensor([1.0]))[0, 0]
    assert wide[4, 6] > 0 and out[4, 6] == 0  # the default ±3σ kernel (5 taps) reaches further
    with pytest.raises(ValueError, match="blur_kernel_size"):
        DegradationConfig(kind=Augmentation.BLUR, blur_kernel_size=4)
