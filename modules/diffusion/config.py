"""Typed configs that turn YAML into a diffusion process and a sampling run.

Every stage (prior, decoder, upsamplers, the Imagen variant) trains with `DiffusionConfig.build()`
and samples with `sample(...)`, so respacing, guidance and clipping are wired in one place.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from modules.core import draws
from modules.core.errors import ConfigError
from modules.core.hparams import check_range, coerce_fields

from .analytic import analytic_ddpm_sample
from .gaussian import ClipFn, GaussianDiffusion, LossWeighting, ModelFn, Objective, TimestepSampling, VarianceType
from .guidance import classifier_free_guidance, dynamic_threshold, nested_guidance, static_clip
from .samplers import Callback, ddim_sample, ddpm_sample
from .schedules import Schedule, make_betas, space_timesteps


@dataclass
class DiffusionConfig:
    """The forward process and training target (DESIGN.md "Diffusion")."""

    schedule: Schedule = Schedule.COSINE
    timesteps: int = 1000
    schedule_shift: float = 1.0  # SNR(t) / shift² at every t (simple diffusion §3.1); > 1: noisier
    objective: Objective = Objective.EPS
    variance: VarianceType = VarianceType.FIXED_SMALL
    loss_weighting: LossWeighting = LossWeighting.NONE
    min_snr_gamma: float = 5.0
    min_snr_floor: float = 0.0  # x_0-space weight clamp(SNR, floor, γ); 1: truncated SNR (Salimans & Ho 2022)
    timestep_sampling: TimestepSampling = TimestepSampling.UNIFORM

    def __post_init__(self) -> None:
        coerce_fields(self)
        check_range("diffusion", "timesteps", self.timesteps, 2, 100_000)
        check_range("diffusion", "schedule_shift", self.schedule_shift, 1e-3, 1e3)
        check_range("diffusion", "min_snr_gamma", self.min_snr_gamma, 1e-6, 1e6)
        check_range("diffusion", "min_snr_floor", self.min_snr_floor, 0.0, self.min_snr_gamma)

    def build(self) -> GaussianDiffusion:
        return GaussianDiffusion(
            make_betas(self.schedule, self.timesteps, self.schedule_shift),
            objective=self.objective,
            variance=self.variance,
            loss_weighting=self.loss_weighting,
            min_snr_gamma=self.min_snr_gamma,
            min_snr_floor=self.min_snr_floor,
            timestep_sampling=self.timestep_sampling,
        )


class Sampler(str, Enum):
    DDPM = "ddpm"
    DDIM = "ddim"
    ANALYTIC = "analytic"  # ancestral, Analytic-DPM variance from Γ estimated on data (unCLIP's prior)


class Clipping(str, Enum):
    """What happens to the predicted x0 at each step."""

    NONE = "none"
    STATIC = "static"  # clamp to [-1, 1]
    DYNAMIC = "dynamic"  # Imagen's percentile thresholding


class Precision(str, Enum):
    """The network's arithmetic while sampling; the sampler's own update (x_t -> x_{t-1}) is fp32."""

    FP32 = "fp32"
    BF16 = "bf16"  # the network's forward under torch.autocast(bfloat16): oneDNN's AMX/AVX512-BF16 on CPU


@dataclass
class SamplingConfig:
    """How a stage samples: respaced step count, DDIM eta, CFG scale, x0 clipping, network precision."""

    sampler: Sampler = Sampler.DDIM
    steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 1.0
    # Nested guidance (modules/diffusion/guidance.py): the last condition's own scale (the decoder's
    # caption, added after z_i), guidance_scale for the others. None: joint guidance at guidance_scale.
    text_guidance_scale: Optional[float] = None
    clipping: Clipping = Clipping.STATIC
    dynamic_percentile: float = 0.995
    precision: Precision = Precision.FP32

    def __post_init__(self) -> None:
        coerce_fields(self)
        check_range("sampling", "steps", self.steps, 1, 100_000)
        check_range("sampling", "eta", self.eta, 0.0, 1.0)
        check_range("sampling", "guidance_scale", self.guidance_scale, 0.0, 1000.0)
        if self.text_guidance_scale is not None:
            check_range("sampling", "text_guidance_scale", self.text_guidance_scale, 0.0, 1000.0)
        check_range("sampling", "dynamic_percentile", self.dynamic_percentile, 0.5, 1.0)

    def clip_fn(self) -> ClipFn | None:
        if self.clipping is Clipping.STATIC:
            return static_clip
        if self.clipping is Clipping.DYNAMIC:
            return functools.partial(dynamic_threshold, percentile=self.dynamic_percentile)
        return None


def autocast_model(model: ModelFn, precision: Precision) -> ModelFn:
    """`model` run under bf16 autocast with its output returned in fp32, so guidance and the
    sampler's update see fp32 tensors (only the network's convolutions and GEMMs drop to bf16)."""
    if precision is Precision.FP32:
        return model

    def run(x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            out = model(x, t, **kwargs)
        return out.float()

    return run


def guided_model(diffusion: GaussianDiffusion, model: ModelFn, scale: float, drop_keys: Sequence[str],
                 text_scale: float | None = None) -> ModelFn:
    """`model` wrapped in classifier-free guidance, unless the scale is 1 or nothing can drop; with
    `text_scale`, nested guidance whose last condition (`drop_keys[-1]`) has that scale."""
    if text_scale is not None:
        if len(drop_keys) < 2:
            raise ConfigError(f"sampling.text_guidance_scale: needs a model with two droppable conditions, "
                              f"this one has {list(drop_keys)}")
        scales = [scale] * (len(drop_keys) - 1) + [text_scale]
        return nested_guidance(model, scales, drop_keys=drop_keys, variance=diffusion.variance)
    if scale == 1.0 or not drop_keys:
        return model
    return classifier_free_guidance(model, scale, drop_keys=drop_keys, variance=diffusion.variance)


def sample(
    diffusion: GaussianDiffusion,
    model: ModelFn,
    x_T: Tensor,
    cfg: SamplingConfig,
    *,
    model_kwargs: dict[str, Any] | None = None,
    drop_keys: Sequence[str] = (),
    generator: torch.Generator | None = None,
    progress: bool = False,
    callback: Callback | None = None,
    gamma: Sequence[float] | Tensor | None = None,
) -> Tensor:
    """Run `cfg`'s sampler on the respaced process from x_T (any shape) to x0 (`gamma`: Γ_n per
    step, for the analytic sampler)."""
    respaced = sampling_process(diffusion, cfg)
    fn = guided_model(diffusion, autocast_model(model, cfg.precision), cfg.guidance_scale, drop_keys, cfg.text_guidance_scale)
    common: dict[str, Any] = dict(
        model_kwargs=model_kwargs, clip=cfg.clip_fn(), generator=generator, progress=progress, callback=callback
    )
    if cfg.sampler is Sampler.DDIM:
        return ddim_sample(respaced, fn, x_T, eta=cfg.eta, **common)
    if cfg.sampler is Sampler.ANALYTIC:
        if gamma is None or len(gamma) != respaced.num_timesteps:
            raise ConfigError(f"sampling.sampler analytic: needs Γ estimated on data for its {cfg.steps} steps "
                              "(the prior estimates it at validation; run a validation first)")
        return analytic_ddpm_sample(respaced, fn, x_T, gamma, **common)
    return ddpm_sample(respaced, fn, x_T, **common)


def sampling_process(diffusion: GaussianDiffusion, cfg: SamplingConfig) -> GaussianDiffusion:
    """The respaced process `sample` runs for `cfg` (its steps are the ones Γ is estimated for)."""
    return diffusion.respaced(space_timesteps(diffusion.num_timesteps, cfg.steps))


def noise(shape: Sequence[int], generator: torch.Generator | None, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise drawn on the generator's device (reproducible across devices), on `device`."""
    return draws.normal(shape, device=device, dtype=dtype, generator=generator)


ModelFactory = Callable[[], ModelFn]
