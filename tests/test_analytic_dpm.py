"""Analytic-DPM against closed forms: for Gaussian data x_0 ~ N(0, s² I) the optimal ε-predictor is
E[ε | x_n] = √β̄_n x_n / (ᾱ_n s² + β̄_n), so Γ_n = β̄_n / (ᾱ_n s² + β̄_n), and the reverse step's true
variance is Var(x_s | x_n) = v_s β / (α v_s + β) with v_s = ᾱ_s s² + β̄_s, α = ᾱ_n/ᾱ_s, β = 1 − α."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modules.diffusion.analytic import analytic_ddpm_sample, analytic_variance, estimate_gamma
from modules.diffusion.gaussian import GaussianDiffusion
from modules.diffusion.schedules import Schedule, make_betas, space_timesteps

S2 = 0.3  # data variance per coordinate


def optimal_eps(diffusion: GaussianDiffusion):
    abar = torch.from_numpy(diffusion.alphas_cumprod)

    def model(x, t_original, **_):
        local = torch.from_numpy(np.searchsorted(diffusion.timestep_map, t_original.numpy()))
        a = abar[local].to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return torch.sqrt(1 - a) * x / (a * S2 + 1 - a)

    return model


def exact_posterior_variance(diffusion: GaussianDiffusion) -> np.ndarray:
    abar, abar_prev = diffusion.alphas_cumprod, diffusion.alphas_cumprod_prev
    alpha = abar / abar_prev
    v_prev = abar_prev * S2 + (1 - abar_prev)
    return v_prev * (1 - alpha) / (alpha * v_prev + (1 - alpha))


@pytest.mark.parametrize("steps", [1000, 64, 10])
def test_analytic_variance_is_the_exact_posterior_variance_for_gaussian_data(steps: int) -> None:
    base = GaussianDiffusion(make_betas(Schedule.COSINE, 1000))
    diffusion = base.respaced(space_timesteps(1000, steps)) if steps < 1000 else base
    gamma = (1 - diffusion.alphas_cumprod) / (diffusion.alphas_cumprod * S2 + 1 - diffusion.alphas_cumprod)
    sigma2 = analytic_variance(diffusion, gamma)
    exact = exact_posterior_variance(diffusion)
    np.testing.assert_allclose(sigma2[1:], exact[1:], rtol=1e-6)
    assert np.all(sigma2 >= diffusion.posterior_variance - 1e-15) and np.all(sigma2 <= diffusion.betas + 1e-15)
    # the two fixed choices bracket it, and differ from it (the point of estimating it)
    assert not np.allclose(sigma2[1:], diffusion.posterior_variance[1:], rtol=1e-3)


def test_estimate_gamma_matches_the_closed_form() -> None:
    base = GaussianDiffusion(make_betas(Schedule.COSINE, 1000))
    diffusion = base.respaced(space_timesteps(1000, 16))
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(512, 32, generator=gen) * S2**0.5 for _ in range(4)]
    gamma = estimate_gamma(diffusion, optimal_eps(diffusion), data, generator=gen)
    closed = (1 - diffusion.alphas_cumprod) / (diffusion.alphas_cumprod * S2 + 1 - diffusion.alphas_cumprod)
    np.testing.assert_allclose(gamma, closed, rtol=0.01)


def test_analytic_sampler_reproduces_the_data_variance() -> None:
    """With the optimal ε and the analytic variance, 10-step ancestral samples have the data's
    variance S2; DDPM's fixed small variance (β̃) under-disperses at 10 steps."""
    from modules.diffusion.samplers import ddpm_sample

    base = GaussianDiffusion(make_betas(Schedule.COSINE, 1000))
    diffusion = base.respaced(space_timesteps(1000, 10))
    gamma = (1 - diffusion.alphas_cumprod) / (diffusion.alphas_cumprod * S2 + 1 - diffusion.alphas_cumprod)
    x_T = torch.randn(20000, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = optimal_eps(diffusion)
    ours = analytic_ddpm_sample(diffusion, model, x_T, gamma, generator=torch.Generator().manual_seed(2), progress=False)
    fixed = ddpm_sample(diffusion, model, x_T, generator=torch.Generator().manual_seed(2), progress=False)
    assert float(ours.var()) == pytest.approx(S2, rel=0.02)
    assert float(fixed.var()) < 0.95 * S2


def test_gamma_of_the_wrong_length_is_refused() -> None:
    diffusion = GaussianDiffusion(make_betas(Schedule.COSINE, 100))
    with pytest.raises(ValueError, match="gamma: expected 100"):
        analytic_variance(diffusion, np.ones(10))


def test_prior_estimates_gamma_at_validation_and_samples_with_it(tmp_path) -> None:
    """A tiny prior with `sampler: analytic` refuses to sample before Γ exists (one line), fills Γ
    (one value per sampling step; an untrained x_0-predictor's ε̂ is large at small t, so Γ > 1
    there and σ² falls back to the bound β̃) in a validation step, then samples unit-norm z_i; Γ
    travels with the weights (state_dict)."""
    from modules.core.errors import ConfigError
    from modules.networks.prior_transformer import PriorConfig
    from modules.stages.prior import PriorModule

    torch.manual_seed(0)
    prior = PriorModule(prior=PriorConfig(width=32, depth=1, heads=2), clip_model="tiny-vit",
                        sampling={"sampler": "ANALYTIC", "steps": 8, "clipping": "NONE"})
    b, d = 6, prior.conditioner.embed_dim
    cond = {"image_embed": torch.nn.functional.normalize(torch.randn(b, d), dim=-1),
            "text_embed": torch.nn.functional.normalize(torch.randn(b, d), dim=-1),
            "text_tokens": torch.randn(b, 5, prior.conditioner.text_width), "text_mask": torch.ones(b, 5, dtype=torch.bool)}
    with pytest.raises(ConfigError, match="needs Γ estimated on data"):
        prior.generate(cond, generator=torch.Generator().manual_seed(0))
    prior.log = lambda *a, **k: None
    prior.log_dict = lambda *a, **k: None
    prior.validation_step(cond, 0)
    gamma = prior.analytic_gamma
    assert gamma.shape == (8,) and bool(torch.isfinite(gamma).all()) and bool((gamma > 0).all())
    from modules.diffusion.config import sampling_process

    process = sampling_process(prior.diffusion, prior.sampling)
    sigma2 = analytic_variance(process, gamma)
    assert np.all(sigma2 >= process.posterior_variance) and np.all(sigma2 <= process.betas)
    z = prior.generate(cond, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(b))
    assert "analytic_gamma" in prior.state_dict()
