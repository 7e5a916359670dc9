"""Gaussian diffusion process: forward noising, posterior, parameterisations and training losses.

Equations (numbers from the papers):
- Forward process q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I): Ho et al. 2020 (DDPM) eq. 4.
- Posterior q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t I): DDPM eq. 6–7,
  μ̃_t = √ᾱ_{t−1} β_t/(1 − ᾱ_t) x_0 + √α_t (1 − ᾱ_{t−1})/(1 − ᾱ_t) x_t,
  β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t) β_t.
- ε-parameterisation x_0 = (x_t − √(1 − ᾱ_t) ε)/√ᾱ_t: DDPM eq. 9–11; L_simple: DDPM eq. 14.
- Learned interpolated variance Σ = exp(v log β_t + (1 − v) log β̃_t) and hybrid loss
  L_simple + λ L_vlb with λ = 0.001 and a stop-gradient on the mean: Nichol & Dhariwal 2021
  (improved DDPM) eq. 15–16; L_0 is the discretised Gaussian likelihood of DDPM eq. 13.
- v-parameterisation v = √ᾱ ε − √(1 − ᾱ) x_0: Salimans & Ho 2022 §4 / appendix D.
- Min-SNR-γ loss weighting: Hang et al. 2023, w_t = min(SNR_t, γ) in x_0 space, i.e.
  min(SNR, γ)/SNR for an ε target and min(SNR, γ)/(SNR + 1) for a v target.
- Timestep density: the objective is E_{t~U}[w_t L_t]. Drawing t with p(t) ∝ w_t instead and
  weighting each sample by w_t/(T p(t)) (constant: the mean weight) estimates the same objective
  with lower variance (importance sampling, as improved DDPM §3.3 does for L_vlb; EDM and SD3
  likewise choose the noise-level density instead of weighting).

Tables are float64 numpy; each call casts the needed rows to the input's device and dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any

import numpy as np
import torch
from torch import Tensor

from modules.core import draws

from .schedules import respaced_betas

ClipFn = Callable[[Tensor], Tensor]
ModelFn = Callable[..., Tensor]


class Objective(str, Enum):
    """What the network predicts."""

    EPS = "eps"
    X0 = "x0"
    V = "v"


class VarianceType(str, Enum):
    """Reverse-process variance: β̃_t (small), β_t (large) or learned interpolation."""

    FIXED_SMALL = "fixed_small"
    FIXED_LARGE = "fixed_large"
    LEARNED_RANGE = "learned_range"


class LossWeighting(str, Enum):
    """Per-timestep weighting of the MSE term."""

    NONE = "none"
    MIN_SNR = "min_snr"


class TimestepSampling(str, Enum):
    """Density of the training timesteps."""

    UNIFORM = "uniform"  # t ~ U{0..T-1} (DDPM Algorithm 1)
    WEIGHTED = "weighted"  # t ~ p(t) ∝ w_t, samples weighted by w_t/(T p(t)): same objective, lower variance


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all non-batch dimensions: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log p(x) for x in [−1, 1] quantised to 256 bins under N(mean, e^{2 log_scale}) (DDPM eq. 13).

    The edge bins extend to ±∞. Returns elementwise log-probabilities (nats).
    """
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + 1.0 / 255.0)
    lower = inv_std * (x - mean - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)  # log Φ(upper), for the x = −1 bin
    log_sf_lower = torch.special.log_ndtr(-lower)  # log(1 − Φ(lower)), for the x = +1 bin
    delta = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12)
    return torch.where(
        x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, torch.log(delta))
    )


class GaussianDiffusion:
    """A discrete-time Gaussian diffusion (guided-diffusion style); the network is passed per call.

    ``timestep_map[i]`` is the ORIGINAL training step of this process's step i (identity unless
    built by :meth:`respaced`); networks are always called with original steps via
    :meth:`model_timesteps`.
    """

    def __init__(
        self,
        betas: np.ndarray,
        *,
        objective: Objective = Objective.EPS,
        variance: VarianceType = VarianceType.FIXED_SMALL,
        loss_weighting: LossWeighting = LossWeighting.NONE,
        min_snr_gamma: float = 5.0,
        min_snr_floor: float = 0.0,
        vb_weight: float = 1e-3,
        timestep_map: np.ndarray | None = None,
        timestep_sampling: TimestepSampling = TimestepSampling.UNIFORM,
    ) -> None:
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.objective = Objective(objective)
        self.variance = VarianceType(variance)
        self.loss_weighting = LossWeighting(loss_weighting)
        self.min_snr_gamma = float(min_snr_gamma)
        self.min_snr_floor = float(min_snr_floor)
        if not 0.0 <= self.min_snr_floor <= self.min_snr_gamma:
            raise ValueError(f"min_snr_floor {self.min_snr_floor} must lie in [0, min_snr_gamma {self.min_snr_gamma}]")
        self.timestep_sampling = TimestepSampling(timestep_sampling)
        self.vb_weight = float(vb_weight)
        self.num_timesteps = len(betas)
        self.timestep_map = (
            np.arange(self.num_timesteps, dtype=np.int64)
            if timestep_map is None else np.asarray(timestep_map, dtype=np.int64)
        )
        assert self.timestep_map.shape == betas.shape

        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.snr_table = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        # Posterior q(x_{t-1} | x_t, x_0), DDPM eq. 6-7.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # β̃_0 = 0: clip the log to β̃_1 (the posterior at t = 0 is degenerate).
        first = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        # FIXED_LARGE uses β_t, with β̃_1 at t = 0 (guided-diffusion) for a finite log-likelihood.
        self.large_variance = np.append(first, betas[1:])
        self.log_large_variance = np.log(self.large_variance)
        self.log_betas = np.log(betas)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        # p(t) of `sample_timesteps`, its CDF (for the inverse-CDF draw) and 1/(T p(t)), built once here.
        self.timestep_probs, weights = self._timestep_density()
        self._timestep_cdf = torch.from_numpy(np.cumsum(self.timestep_probs))
        self._timestep_weights = torch.from_numpy(weights)
        self._cache: dict[tuple[int, torch.device, torch.dtype], tuple[np.ndarray, Tensor]] = {}

    # ------------------------------------------------------------------ helpers
    def _extract(self, table: np.ndarray, t: Tensor, x: Tensor) -> Tensor:
        """table[t] on x's device/dtype, shaped (B, 1, ..., 1) to broadcast against x.

        ``table`` is one of this object's float64 arrays; its cast copy is cached per device/dtype.
        """
        key = (id(table), x.device, x.dtype)
        cached = self._cache.get(key)
        if cached is None or cached[0] is not table:
            cached = (table, torch.from_numpy(table).to(dtype=x.dtype).to(x.device))
            self._cache[key] = cached
        out = cached[1][t.to(x.device).long()]  # (B,)
        return out.reshape(out.shape + (1,) * (x.ndim - out.ndim))

    def model_timesteps(self, t: Tensor) -> Tensor:
        """Map this process's step indices to the original training steps the network knows."""
        table = torch.from_numpy(self.timestep_map).to(t.device)
        return table[t.long()]

    def call_model(self, model: ModelFn, x_t: Tensor, t: Tensor, model_kwargs: dict[str, Any] | None) -> Tensor:
        """model(x_t, original_t, **model_kwargs)."""
        return model(x_t, self.model_timesteps(t), **(model_kwargs or {}))

    def respaced(self, use_timesteps: Iterable[int]) -> GaussianDiffusion:
        """This process restricted to ``use_timesteps`` (indices of THIS process), ᾱ kept exactly."""
        betas, local_map = respaced_betas(self.alphas_cumprod, use_timesteps)
        return GaussianDiffusion(
            betas, objective=self.objective, variance=self.variance,
            loss_weighting=self.loss_weighting, min_snr_gamma=self.min_snr_gamma, min_snr_floor=self.min_snr_floor,
            vb_weight=self.vb_weight, timestep_map=self.timestep_map[local_map],
            timestep_sampling=self.timestep_sampling,
        )

    def sample_timesteps(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """Training timesteps t ~ p(t), shape (B,), on `device` (default: the generator's, else CPU):
        uniform on {0, ..., T−1}, or ∝ w_t by inverse CDF for `TimestepSampling.WEIGHTED`.

        Without a generator, inside a training step t comes from that step's keyed draws
        (`modules.core.draws`); elsewhere from the global torch generator.
        """
        if self.timestep_sampling is TimestepSampling.UNIFORM:
            return draws.integers(0, self.num_timesteps, (batch,), device=device, generator=generator)
        u = draws.uniform((batch,), device=device, generator=generator).double()
        return torch.searchsorted(self._timestep_cdf.to(u.device), u, right=True).clamp(max=self.num_timesteps - 1)

    def _timestep_density(self) -> tuple[np.ndarray, np.ndarray]:
        """(p(t), 1/(T p(t))), float64: uniform (weights exactly 1), or p ∝ w_t for WEIGHTED, whose
        weights are w̄/w_t (min-SNR or unit loss weights)."""
        if self.timestep_sampling is TimestepSampling.UNIFORM:
            return np.full(self.num_timesteps, 1.0 / self.num_timesteps), np.ones(self.num_timesteps)
        w = self.loss_weight(torch.arange(self.num_timesteps), torch.float64).numpy()
        if not w.sum() > 0:
            raise ValueError("timestep_sampling 'weighted' needs loss weights with a positive sum")
        return w / w.sum(), w.mean() / w

    def importance_weight(self, t: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """1/(T p(t)), shape (B,): the factor that makes the mean of per-sample losses at t ~ p(t) an
        unbiased estimate of E_{t~U}[loss_t] (1 for uniform t; w̄/w_t for WEIGHTED)."""
        return self._timestep_weights.to(t.device)[t.long()].to(dtype)

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0) (DDPM eq. 4)."""
        mean = self._extract(self.sqrt_alphas_cumprod, t, x0) * x0
        var = self._extract(self.one_minus_alphas_cumprod, t, x0)
        return mean, var, self._extract(self.log_one_minus_alphas_cumprod, t, x0)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (DDPM eq. 4)."""
        noise = torch.randn_like(x0) if noise is None else noise
        return (self._extract(self.sqrt_alphas_cumprod, t, x0) * x0
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(μ̃_t, β̃_t, log β̃_t clipped) of q(x_{t−1} | x_t, x_0) (DDPM eq. 6–7)."""
        mean = (self._extract(self.posterior_mean_coef1, t, x_t) * x0
                + self._extract(self.posterior_mean_coef2, t, x_t) * x_t)
        var = self._extract(self.posterior_variance, t, x_t)
        return mean, var, self._extract(self.posterior_log_variance_clipped, t, x_t)

    # ------------------------------------------------------------------ parameterisations
    def eps_to_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_0 = (x_t − √(1 − ᾱ) ε)/√ᾱ."""
        return (x_t - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) / \
            self._extract(self.sqrt_alphas_cumprod, t, x_t)

    def x0_to_eps(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """ε = (x_t − √ᾱ x_0)/√(1 − ᾱ)."""
        return (x_t - self._extract(self.sqrt_alphas_cumprod, t, x_t) * x0) / \
            self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t)

    def v_from(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """v = √ᾱ ε − √(1 − ᾱ) x_0 (Salimans & Ho 2022)."""
        return (self._extract(self.sqrt_alphas_cumprod, t, x0) * eps
                - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0)

    def v_to_x0(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """x_0 = √ᾱ x_t − √(1 − ᾱ) v."""
        return (self._extract(self.sqrt_alphas_cumprod, t, x_t) * x_t
                - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v)

    def v_to_eps(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """ε = √(1 − ᾱ) x_t + √ᾱ v."""
        return (self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
                + self._extract(self.sqrt_alphas_cumprod, t, x_t) * v)

    def pred_to_x0_eps(self, x_t: Tensor, t: Tensor, pred: Tensor) -> tuple[Tensor, Tensor]:
        """(x̂_0, ε̂) from the prediction channels of the network, for this objective."""
        if self.objective is Objective.EPS:
            return self.eps_to_x0(x_t, t, pred), pred
        if self.objective is Objective.X0:
            return pred, self.x0_to_eps(x_t, t, pred)
        return self.v_to_x0(x_t, t, pred), self.v_to_eps(x_t, t, pred)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The regression target of this objective."""
        if self.objective is Objective.EPS:
            return eps
        if self.objective is Objective.X0:
            return x0
        return self.v_from(x0, eps, t)

    def snr(self, t: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """SNR_t = ᾱ_t/(1 − ᾱ_t), shape (B,), on t's device."""
        return torch.from_numpy(self.snr_table).to(dtype=dtype).to(t.device)[t.long()]

    def loss_weight(self, t: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Per-sample MSE weight (B,): 1, or min-SNR-γ expressed for this objective's target.

        In x_0 space min-SNR-γ weighs an error by min(SNR, γ) (Hang et al. 2023, eq. 5); ``min_snr_floor``
        f > 0 makes it clamp(SNR, f, γ), with f = 1 the truncated-SNR weighting max(SNR, 1) of Salimans &
        Ho 2022 (§4) below γ: the noisiest steps, where the layout of an image is decided, keep weight f
        instead of vanishing with SNR."""
        snr = self.snr(t, torch.float64)
        if self.loss_weighting is LossWeighting.NONE:
            return torch.ones_like(snr, dtype=dtype)
        clipped = snr.clamp(min=self.min_snr_floor, max=self.min_snr_gamma)  # the weight in x_0 space
        if self.objective is Objective.EPS:
            w = clipped / snr  # ‖ε − ε̂‖² = SNR ‖x_0 − x̂_0‖²
        elif self.objective is Objective.V:
            w = clipped / (snr + 1.0)  # ‖v − v̂‖² = (SNR + 1) ‖x_0 − x̂_0‖²
        else:
            w = clipped
        return w.to(dtype)

    # ------------------------------------------------------------------ reverse process
    def p_mean_variance(
        self, model_output: Tensor, x_t: Tensor, t: Tensor, *, clip: ClipFn | None = None
    ) -> dict[str, Tensor]:
        """p_θ(x_{t−1} | x_t) from the raw network output (DDPM eq. 1; improved DDPM eq. 15).

        With LEARNED_RANGE the output has 2C channels on dim 1: [prediction, v ∈ [−1, 1]].
        ``clip`` is applied to x̂_0 before the posterior mean, and ε̂ is recomputed from the clipped
        x̂_0. Variances broadcast against x_t.
        """
        model_output = model_output.to(x_t.dtype)
        if self.variance is VarianceType.LEARNED_RANGE:
            pred, var_values = model_output.chunk(2, dim=1)
            min_log = self._extract(self.posterior_log_variance_clipped, t, x_t)
            max_log = self._extract(self.log_betas, t, x_t)
            frac = (var_values + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            pred = model_output
            table = self.posterior_variance if self.variance is VarianceType.FIXED_SMALL else self.large_variance
            log_table = (self.posterior_log_variance_clipped if self.variance is VarianceType.FIXED_SMALL
                         else self.log_large_variance)
            variance = self._extract(table, t, x_t)
            log_variance = self._extract(log_table, t, x_t)
        pred_x0, pred_eps = self.pred_to_x0_eps(x_t, t, pred)
        if clip is not None:
            pred_x0 = clip(pred_x0)
            pred_eps = self.x0_to_eps(x_t, t, pred_x0)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance,
                "pred_x0": pred_x0, "pred_eps": pred_eps}

    # ------------------------------------------------------------------ training
    def vb_terms_bpd(self, model_output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """L_{t−1} = KL(q(x_{t−1}|x_t,x_0) ‖ p_θ(x_{t−1}|x_t)) for t > 0, −log p(x_0|x_1) at t = 0, in bits (B,)."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(
            x0, out["mean"], 0.5 * out["log_variance"])) / math.log(2.0)
        return torch.where(t.to(x0.device) == 0, nll, kl)

    def training_losses(
        self, model: ModelFn, x0: Tensor, t: Tensor, *,
        model_kwargs: dict[str, Any] | None = None, noise: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample losses (B,): ``loss`` = w_t·``mse`` (+ ``vb`` when the variance is learned).

        ``mse`` is L_simple on this objective's target (DDPM eq. 14), mean over non-batch dims;
        ``vb`` is the improved-DDPM L_vlb term with the mean's gradient stopped, scaled by
        λ·T (a one-sample estimate of λ·Σ_t L_t), λ = ``vb_weight``. Without ``noise``, ε ~ N(0, I)
        comes from the training step's keyed draws (`modules.core.draws`).
        """
        noise = draws.normal(x0.shape, device=x0.device, dtype=x0.dtype) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)  # (B, ...)
        output = self.call_model(model, x_t, t, model_kwargs).to(x0.dtype)
        terms: dict[str, Tensor] = {}
        if self.variance is VarianceType.LEARNED_RANGE:
            pred, var_values = output.chunk(2, dim=1)
            frozen = torch.cat([pred.detach(), var_values], dim=1)  # stop-gradient on the mean
            terms["vb"] = self.vb_terms_bpd(frozen, x0, x_t, t) * (self.num_timesteps * self.vb_weight)
        else:
            pred = output
        target = self.target(x0, noise, t)
        assert pred.shape == target.shape, f"prediction {tuple(pred.shape)} vs target {tuple(target.shape)}"
        terms["mse"] = mean_flat((target - pred) ** 2)
        terms["loss"] = self.loss_weight(t, x0.dtype).to(x0.device) * terms["mse"]
        if "vb" in terms:
            terms["loss"] = terms["loss"] + terms["vb"]
        return terms

    def training_loss(
        self, model: ModelFn, x0: Tensor, t: Tensor, *, model_kwargs: dict[str, Any] | None = None,
    ) -> Tensor:
        """The batch's estimate of E_{t~U}[loss_t] for t drawn by :meth:`sample_timesteps`: the mean of
        the per-sample ``loss`` times 1/(T p(t)) (plain mean for uniform t)."""
        losses = self.training_losses(model, x0, t, model_kwargs=model_kwargs)["loss"]
        return (losses * self.importance_weight(t, losses.dtype)).mean()
