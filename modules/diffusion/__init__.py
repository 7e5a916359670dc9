"""Diffusion math: schedules, the Gaussian process, samplers and guidance (no nn.Module)."""

from .gaussian import (
    GaussianDiffusion,
    LossWeighting,
    Objective,
    TimestepSampling,
    VarianceType,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from .guidance import classifier_free_guidance, dynamic_threshold, nested_guidance, static_clip
from .samplers import ddim_invert, ddim_sample, ddpm_sample
from .schedules import Schedule, cosine_betas, linear_betas, make_betas, respaced_betas, space_timesteps

__all__ = [
    "GaussianDiffusion",
    "LossWeighting",
    "Objective",
    "Schedule",
    "TimestepSampling",
    "VarianceType",
    "classifier_free_guidance",
    "cosine_betas",
    "ddim_invert",
    "ddim_sample",
    "ddpm_sample",
    "discretized_gaussian_log_likelihood",
    "dynamic_threshold",
    "linear_betas",
    "make_betas",
    "nested_guidance",
    "mean_flat",
    "normal_kl",
    "respaced_betas",
    "space_timesteps",
    "static_clip",
]
