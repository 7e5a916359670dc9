"""Analytic-DPM: the optimal reverse variance in closed form (Bao et al. 2022), the sampling
variance unCLIP's diffusion prior uses (Ramesh et al. 2022, Table 3: "analytic").

For the reverse step n -> s (s = n - 1, or the previous kept step of a respaced process) with the
mean of DDPM's posterior evaluated at the model's x̂_0, and the DDPM choice λ_n² = β̃_n, Theorem 1
(with ᾱ for the paper's α and β̄_n = 1 - ᾱ_n) gives

    σ*_n² = λ_n² + (√(β̄_n / α_n) − √(β̄_s − λ_n²))² (1 − Γ_n),   α_n = ᾱ_n / ᾱ_s,
    Γ_n = E_q(x_n) ||ε_θ(x_n, n)||² / d  (= β̄_n E||∇ log q_n||² / d, the paper's eq. 7 -> 9),

(the second term is the spread of x_0 given x_n, E Var(x_0 | x_n) = (β̄_n / ᾱ_n)(1 − Γ_n), carried
through the posterior mean's x_0 coefficient),

which Theorem 2 bounds to [β̃_n, β_n] (β_n = 1 − α_n); the estimate is clipped to those bounds.
Γ_n is a Monte Carlo average of the trained ε-predictor over data: `estimate_gamma`. For Gaussian
data the optimal ε is known in closed form and σ*² equals the exact posterior variance
(`tests/test_analytic_dpm.py`).
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor

from .gaussian import GaussianDiffusion, ModelFn
from .samplers import _noise_like, ddpm_sample


def analytic_variance(diffusion: GaussianDiffusion, gamma: np.ndarray | Tensor) -> np.ndarray:
    """σ*_n² for every step n of `diffusion` (respaced or not) given Γ_n (same length), float64."""
    gamma = gamma.detach().double().cpu().numpy() if isinstance(gamma, Tensor) else np.asarray(gamma, dtype=np.float64)
    if gamma.shape != (diffusion.num_timesteps,):
        raise ValueError(f"gamma: expected {diffusion.num_timesteps} values (one per step), got shape {gamma.shape}")
    abar, abar_prev = diffusion.alphas_cumprod, diffusion.alphas_cumprod_prev
    bbar, bbar_prev = 1.0 - abar, 1.0 - abar_prev
    alpha = abar / abar_prev
    lam2 = diffusion.posterior_variance  # β̃_n: DDPM's λ_n²
    coef = (np.sqrt(bbar / alpha) - np.sqrt(np.clip(bbar_prev - lam2, 0.0, None))) ** 2
    sigma2 = lam2 + coef * (1.0 - gamma)
    return np.clip(sigma2, lam2, diffusion.betas)


@torch.no_grad()
def estimate_gamma(
    diffusion: GaussianDiffusion, model_fn: ModelFn, x0_batches: Iterable[Tensor], *,
    model_kwargs_of: Any = None, generator: torch.Generator | None = None,
) -> np.ndarray:
    """Γ_n = mean ||ε̂(x_n, n)||² / d over data for each step n of `diffusion` (Analytic-DPM eq. 8).

    `x0_batches` yields data batches x_0 (B, ...); `model_kwargs_of(i)` gives the model keyword
    arguments of batch i (conditioning), or None. Each x_n is drawn from q(x_n | x_0)."""
    totals = np.zeros(diffusion.num_timesteps, dtype=np.float64)
    count = 0
    for i, x0 in enumerate(x0_batches):
        kwargs = model_kwargs_of(i) if model_kwargs_of is not None else None
        for n in range(diffusion.num_timesteps):
            t = torch.full((x0.shape[0],), n, device=x0.device, dtype=torch.long)
            x_n = diffusion.q_sample(x0, t, noise=_noise_like(x0, generator))
            _, eps = diffusion.pred_to_x0_eps(x_n, t, diffusion.call_model(model_fn, x_n, t, kwargs))
            totals[n] += eps.double().pow(2).flatten(1).mean(1).sum().item()
        count += x0.shape[0]
    if count == 0:
        raise ValueError("estimate_gamma: no data")
    return totals / count


def analytic_ddpm_sample(diffusion: GaussianDiffusion, model_fn: ModelFn, x_T: Tensor, gamma: np.ndarray | Tensor,
                         **kwargs: Any) -> Tensor:
    """`ddpm_sample` (DDPM's posterior mean) with the Analytic-DPM variance σ*_n² from Γ."""
    log_variance = np.log(np.maximum(analytic_variance(diffusion, gamma), 1e-20))
    return ddpm_sample(diffusion, model_fn, x_T, log_variance=log_variance, **kwargs)
