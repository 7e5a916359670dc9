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
from modules.core.hardware import native_bf16, say_bf16_runs_in_fp32
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
    BF16 = "bf16"  # the network's forward under torch.autocast(bfloat16): oneDNN's AMX/AVX512-BF16 on CPU; fp32 on a CPU without them


# A condition's own guidance scale in SamplingConfig, by the drop mask that removes it.
OWN_SCALES = {"drop_text": "text_guidance_scale", "drop_layout": "layout_guidance_scale"}


@dataclass
class SamplingConfig:
    """How a stage samples: respaced step count, DDIM eta, CFG scale, x0 clipping, network precision."""

    sampler: Sampler = Sampler.DDIM
    steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 1.0
    # Nested guidance (modules/diffusion/guidance.py): a condition's own scale, guidance_scale for the
    # others; the caption (`drop_text`, added after z_i) and the layout plan (`drop_layout`, added last).
    # None: that condition is guided with the others at guidance_scale (all None: joint guidance).
    text_guidance_scale: Optional[float] = None
    layout_guidance_scale: Optional[float] = None
    clipping: Clipping = Clipping.STATIC
    dynamic_percentile: float = 0.995
    precision: Precision = Precision.FP32

    def __post_init__(self) -> None:
        coerce_fields(self)
        check_range("sampling", "steps", self.steps, 1, 100_000)
        check_range("sampling", "eta", self.eta, 0.0, 1.0)
        check_range("sampling", "guidance_scale", self.guidance_scale, 0.0, 1000.0)
        for name in OWN_SCALES.values():
            if getattr(self, name) is not None:
                check_range("sampling", name, getattr(self, name), 0.0, 1000.0)
        check_range("sampling", "dynamic_percentile", self.dynamic_percentile, 0.5, 1.0)

    def clip_fn(self) -> ClipFn | None:
        if self.clipping is Clipping.STATIC:
            return static_clip
        if self.clipping is Clipping.DYNAMIC:
            return functools.partial(dynamic_threshold, percentile=self.dynamic_percentile)
        return None


def autocast_model(model: ModelFn, precision: Precision) -> ModelFn:
    """`model` run under bf16 autocast with its output returned in fp32, so guidance and the
    sampler's update see fp32 tensors (only the network's convolutions and GEMMs drop to bf16).
    On a CPU without native bf16 (`modules.core.hardware.native_bf16`) the network runs in fp32,
    and one line says so."""
    if precision is Precision.FP32:
        return model

    def run(x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        if not native_bf16(x.device.type):
            say_bf16_runs_in_fp32("sampling precision bf16")
            return model(x, t, **kwargs)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            out = model(x, t, **kwargs)
        return out.float()

    return run


def guided_model(diffusion: GaussianDiffusion, model: ModelFn, cfg: SamplingConfig, drop_keys: Sequence[str]) -> ModelFn:
    """`model` wrapped in classifier-free guidance at `cfg.guidance_scale`, unless that is 1 or nothing
    can drop. A condition with its own scale (`OWN_SCALES`: the caption's `text_guidance_scale`, the
    layout's `layout_guidance_scale`) makes it nested guidance over `drop_keys` in their order, each
    condition at its own scale or `guidance_scale`; equal scales are joint guidance."""
    scales = [cfg.guidance_scale] * len(drop_keys)
    for key, name in OWN_SCALES.items():
        own = getattr(cfg, name)
        if own is None:
            continue
        if key not in drop_keys or len(drop_keys) < 2:
            raise ConfigError(f"sampling.{name}: needs a model with {key} and another droppable condition, "
                              f"this one has {list(drop_keys)}")
        scales[list(drop_keys).index(key)] = own
    if len(set(scales)) > 1:
        return nested_guidance(model, scales, drop_keys=drop_keys, variance=diffusion.variance)
    if cfg.guidance_scale == 1.0 or not drop_keys:
        return model
    return classifier_free_guidance(model, cfg.guidance_scale, drop_keys=drop_keys, variance=diffusion.variance)


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
    fn = guided_model(diffusion, autocast_model(model, cfg.precision), cfg, drop_keys)
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
