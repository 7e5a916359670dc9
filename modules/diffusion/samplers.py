"""Samplers: pure functions sharing one signature (k-diffusion style).

- ``ddpm_sample``: ancestral sampling, x_{t−1} = μ_θ(x_t, t) + σ_t z (Ho et al. 2020 Algorithm 2,
  eq. 11; learned σ_t from improved DDPM, Nichol & Dhariwal 2021 eq. 15).
- ``ddim_sample``: Song et al. 2021 (DDIM) eq. 12,
  x_{t−1} = √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1} − σ_t²) ε̂ + σ_t z,
  σ_t = η √((1 − ᾱ_{t−1})/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t−1}) (eq. 16); η = 0 is deterministic.
- ``ddim_invert``: the η = 0 update solved for x_t given x_{t−1} with ε̂ held fixed (the discretised
  DDIM ODE, Song et al. 2021 eq. 14, run forwards), ε̂ taken from the model at (x_{t−1}, t).

``diffusion`` is usually respaced (``base.respaced(space_timesteps(1000, 50))``): the number of
steps is ``diffusion.num_timesteps``, and ``model_fn(x, t_original, **model_kwargs)`` is always
called with the ORIGINAL training steps. Any tensor rank works: images (B, C, H, W) or
embeddings (B, D). ``callback`` receives {"i": loop step, "t": original steps (B,), "x": the new
state, "pred_x0": x̂_0}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .gaussian import ClipFn, GaussianDiffusion, ModelFn

Callback = Callable[[dict[str, Any]], None]


def _noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device, returned on x's."""
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def _steps(n: int, reverse: bool, progress: bool) -> Any:
    order = range(n - 1, -1, -1) if reverse else range(n)
    return tqdm(order, total=n, disable=not progress, leave=False)


def _predict(diffusion: GaussianDiffusion, model_fn: ModelFn, x: Tensor, step: int,
             model_kwargs: dict[str, Any] | None, clip: ClipFn | None) -> tuple[Tensor, dict[str, Tensor]]:
    """(t (B,), p_mean_variance output) for respaced step ``step``."""
    t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
    output = diffusion.call_model(model_fn, x, t, model_kwargs)
    return t, diffusion.p_mean_variance(output, x, t, clip=clip)


@torch.no_grad()
def ddpm_sample(
    diffusion: GaussianDiffusion, model_fn: ModelFn, x_T: Tensor, *,
    model_kwargs: dict[str, Any] | None = None, clip: ClipFn | None = None,
    generator: torch.Generator | None = None, progress: bool = True, callback: Callback | None = None,
    log_variance: np.ndarray | None = None,
) -> Tensor:
    """Ancestral sampling from x_T ~ N(0, I) down to x_0 (DDPM Algorithm 2). `log_variance`
    (one log σ² per step of `diffusion`) replaces the process's variance, e.g. Analytic-DPM's."""
    x = x_T
    for i, step in enumerate(_steps(diffusion.num_timesteps, reverse=True, progress=progress)):
        t, out = _predict(diffusion, model_fn, x, step, model_kwargs, clip)
        x = out["mean"]
        if step > 0:  # no noise on the final step
            log_var = out["log_variance"] if log_variance is None else diffusion._extract(log_variance, t, x)
            x = x + torch.exp(0.5 * log_var) * _noise_like(x, generator)
        if callback is not None:
            callback({"i": i, "t": diffusion.model_timesteps(t), "x": x, "pred_x0": out["pred_x0"]})
    return x


@torch.no_grad()
def ddim_sample(
    diffusion: GaussianDiffusion, model_fn: ModelFn, x_T: Tensor, *,
    model_kwargs: dict[str, Any] | None = None, eta: float = 0.0, clip: ClipFn | None = None,
    generator: torch.Generator | None = None, progress: bool = True, callback: Callback | None = None,
) -> Tensor:
    """DDIM sampling (Song et al. 2021 eq. 12); η = 0 deterministic, η = 1 ≈ DDPM."""
    x = x_T
    for i, step in enumerate(_steps(diffusion.num_timesteps, reverse=True, progress=progress)):
        t, out = _predict(diffusion, model_fn, x, step, model_kwargs, clip)
        abar = diffusion._extract(diffusion.alphas_cumprod, t, x)
        abar_prev = diffusion._extract(diffusion.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))  # eq. 16
        x = (torch.sqrt(abar_prev) * out["pred_x0"]
             + torch.sqrt((1 - abar_prev - sigma**2).clamp(min=0.0)) * out["pred_eps"])
        if step > 0 and eta > 0:
            x = x + sigma * _noise_like(x, generator)
        if callback is not None:
            callback({"i": i, "t": diffusion.model_timesteps(t), "x": x, "pred_x0": out["pred_x0"]})
    return x


@torch.no_grad()
def ddim_invert(
    diffusion: GaussianDiffusion, model_fn: ModelFn, x0: Tensor, *,
    model_kwargs: dict[str, Any] | None = None, progress: bool = True, callback: Callback | None = None,
) -> Tensor:
    """Deterministic DDIM encoding x_0 -> x_T (the η = 0 update run backwards).

    Step k maps x at level ᾱ_{k−1} (ᾱ_{−1} = 1: the data) to level ᾱ_k:
    x_k = √ᾱ_k (x_{k−1} − √(1 − ᾱ_{k−1}) ε̂)/√ᾱ_{k−1} + √(1 − ᾱ_k) ε̂, ε̂ = ε_θ(x_{k−1}, k).
    This is the exact algebraic inverse of ``ddim_sample``'s η = 0 step when ε̂ is unchanged;
    the output lies at the level ᾱ_{T−1} from which ``ddim_sample`` starts.
    """
    x = x0
    for i, step in enumerate(_steps(diffusion.num_timesteps, reverse=False, progress=progress)):
        t, out = _predict(diffusion, model_fn, x, step, model_kwargs, None)
        eps = out["pred_eps"]
        abar = diffusion._extract(diffusion.alphas_cumprod, t, x)
        abar_prev = diffusion._extract(diffusion.alphas_cumprod_prev, t, x)
        pred_x0 = (x - torch.sqrt(1 - abar_prev) * eps) / torch.sqrt(abar_prev)
        x = torch.sqrt(abar) * pred_x0 + torch.sqrt(1 - abar) * eps
        if callback is not None:
            callback({"i": i, "t": diffusion.model_timesteps(t), "x": x, "pred_x0": pred_x0})
    return x
