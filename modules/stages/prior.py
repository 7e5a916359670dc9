"""Stage 2: the unCLIP diffusion prior P(z_i | y) (Ramesh et al. 2022 §2.2).

Training (the paper's loss, L_prior = E ||f(z_i^(t), t, y) − z_i||², i.e. the X0 objective of the
shared diffusion code): draw t, noise the scaled image embedding, predict it back from the
caption tokens, z_t and t; the caption (tokens and z_t together) is dropped 10% of the time for
classifier-free guidance. Sampling: DDIM (64 steps by default) from N(0, I), best of
``num_candidates`` (paper: 2) by dot product with z_t.

Embedding scale. CLIP embeddings are unit-norm, so each coordinate of z_i has variance ≈ 1/D: a
poor target for a process whose noise has unit variance per coordinate (the signal would be
drowned after a few steps). The prior diffuses x_0 = √D · z_i (DALLE2-pytorch's
``image_embed_scale``): ||x_0||² = D, so the mean per-coordinate second moment is exactly 1.
Samples are mapped back by L2 normalisation (which also undoes the √D). Static [-1, 1] clipping
of x̂_0 would destroy such targets, so the prior samples without clipping.
EMA is Lightning's `EMAWeightAveraging` callback, set in the experiment YAML.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from modules.core import draws, optim
from modules.stages.conditioning import ClipConditioner, best_of, repeat_rows
from modules.diffusion import Objective
from modules.diffusion.analytic import estimate_gamma
from modules.diffusion.config import (
    Clipping,
    DiffusionConfig,
    Sampler,
    SamplingConfig,
    guided_model,
    noise,
    sample,
    sampling_process,
)
from modules.stages.validation import log_fixed_timestep_losses
from modules.core.hparams import as_config, check_range, init_args, to_plain
from modules.stages.registry import class_path_of
from modules.networks.prior_transformer import PriorConfig, PriorTransformer
from modules.stages.prior_metrics import RunningMean, compare_to_baselines

DROP_KEYS = ("drop_text",)
TEXT_KEYS = ("text_embed", "text_tokens", "text_mask")


def default_diffusion() -> DiffusionConfig:
    """Paper: cosine schedule, 1000 steps, x_0 prediction."""
    return DiffusionConfig(objective=Objective.X0)


def default_sampling() -> SamplingConfig:
    """Paper: 64 sampling steps (DDIM here); no x̂_0 clipping for √D-scaled embeddings."""
    return SamplingConfig(steps=64, clipping=Clipping.NONE)


def select_best(candidates: Tensor, text_embed: Tensor) -> Tensor:
    """Per row, the candidate (B, n, D) with the largest dot product with z_t (B, D) -> (B, D)."""
    return candidates[torch.arange(candidates.shape[0], device=candidates.device), best_of(candidates, text_embed)]


class PriorModule(pl.LightningModule):
    """Trains the diffusion prior; `generate` samples unit-norm image embeddings from captions.

    Args:
        prior: Transformer size; its `embed_dim` / `text_width` are set from the CLIP model.
        clip_model / clip_weights: the frozen CLIP (registry name; local weights or CLIP-stage
            checkpoint) used when batches carry images/tokens instead of exported embeddings.
        diffusion / sampling: the process (default cosine, T=1000, X0) and sampler (DDIM, 64).
        drop_text_prob: CFG dropout of the caption tokens and z_t together (paper: 10%).
        num_candidates: best-of-n at sampling (paper: 2).
        embed_scale: x_0 = embed_scale · z_i; None means √D (see the module docstring).
        val_timesteps: fixed timesteps at which the validation loss is measured.
    """

    def __init__(
        self,
        prior: PriorConfig | None = None,
        clip_model: str = "tiny-vit",
        clip_weights: str | None = None,
        diffusion: DiffusionConfig | None = None,
        sampling: SamplingConfig | None = None,
        optimizer: optim.OptimConfig | None = None,
        drop_text_prob: float = 0.1,
        num_candidates: int = 2,
        embed_scale: float | None = None,
        val_timesteps: tuple[int, ...] = (50, 250, 500, 750, 950),
        seed: int = 0,
    ) -> None:
        args = init_args(locals())
        check_range("model", "drop_text_prob", drop_text_prob, 0.0, 1.0)  # a CFG dropout rate
        super().__init__()
        self.conditioner = ClipConditioner(clip_model, clip_weights)
        prior_cfg = dataclasses.replace(
            as_config(PriorConfig, prior), embed_dim=self.conditioner.embed_dim, text_width=self.conditioner.text_width
        )
        self.diffusion_cfg = as_config(DiffusionConfig, diffusion) if diffusion is not None else default_diffusion()
        self.sampling = as_config(SamplingConfig, sampling) if sampling is not None else default_sampling()
        self.optim_cfg = as_config(optim.OptimConfig, optimizer)
        if self.sampling.clipping is Clipping.STATIC:
            raise ValueError("static [-1, 1] clipping destroys √D-scaled embeddings; use clipping: NONE")
        self.save_hyperparameters(to_plain({
            **args, "prior": prior_cfg, "diffusion": self.diffusion_cfg, "sampling": self.sampling,
            "_class_path": class_path_of(self),
        }))
        self.net = PriorTransformer(prior_cfg)
        self.diffusion = self.diffusion_cfg.build()
        if self.sampling.sampler is Sampler.ANALYTIC:  # Γ_n per sampling step, estimated at validation
            self.register_buffer("analytic_gamma", torch.zeros(self.sampling.steps, dtype=torch.float64))
        self.mean_embed = RunningMean(prior_cfg.embed_dim)  # for the mean-embedding baseline
        self.scale = embed_scale if embed_scale is not None else math.sqrt(prior_cfg.embed_dim)

    # -- embedding scale -----------------------------------------------------------------------
    def to_x0(self, image_embed: Tensor) -> Tensor:
        """Unit-norm z_i (B, D) -> diffusion target x_0 = scale · z_i."""
        return image_embed * self.scale

    @staticmethod
    def from_x0(x0: Tensor) -> Tensor:
        """Diffusion sample (B, D) -> unit-norm image embedding."""
        return F.normalize(x0, dim=-1)

    # -- training: x_0 regression + CFG dropout ---------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        cond = self.conditioner(batch)
        z_i = cond["image_embed"]  # (B, D) unit-norm
        self.mean_embed.update(z_i)
        x0 = self.to_x0(z_i)
        t = self.diffusion.sample_timesteps(x0.shape[0], device=x0.device)  # t ~ U{0..T-1} (or ∝ w_t)
        kwargs = self.model_kwargs(cond, drop_prob=self.hparams.drop_text_prob)
        loss = self.diffusion.training_loss(self.net, x0, t, model_kwargs=kwargs)  # ||f(z_t..) - x0||^2
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Loss at fixed timesteps with fixed noise, plus sampled-embedding scores vs the baselines."""
        self.net.clear_caption_cache()  # the EMA callback swapped weights in through `.data`
        cond = self.conditioner(batch)
        x0, size = self.to_x0(cond["image_embed"]), cond["image_embed"].shape[0]
        gen = torch.Generator(device="cpu").manual_seed(self.hparams.seed + batch_idx)
        kwargs = self.model_kwargs(cond, drop_prob=0.0)
        log_fixed_timestep_losses(self, self.diffusion, self.net, x0, kwargs, self.hparams.val_timesteps, gen)
        if self.sampling.sampler is Sampler.ANALYTIC:
            self.update_analytic_gamma(x0, kwargs, batch_idx, gen)
        pred = self.generate(cond, generator=gen)
        scores = compare_to_baselines(pred, cond["image_embed"], cond["text_embed"], self.mean_embed.value())
        self.log_dict({f"val/{k}": v for k, v in scores.items()}, batch_size=size)

    def update_analytic_gamma(self, x0: Tensor, kwargs: dict[str, Tensor], batch_idx: int, gen: torch.Generator) -> None:
        """Γ_n = E ||ε̂(x_n, n)||² / d on validation data (Analytic-DPM eq. 9), a running mean over
        this validation's batches, for the sampling steps; the sampler's variance follows from it."""
        process = sampling_process(self.diffusion, self.sampling)
        fn = guided_model(process, self.net, self.sampling, DROP_KEYS)
        gamma = torch.from_numpy(estimate_gamma(process, fn, [x0], model_kwargs_of=lambda i: kwargs, generator=gen))
        n = batch_idx  # batches of this validation already averaged in
        self.analytic_gamma.copy_((self.analytic_gamma * n + gamma.to(self.analytic_gamma)) / (n + 1) if n else gamma)

    def configure_optimizers(self) -> dict[str, Any]:
        return optim.configure(self.net, self.optim_cfg)

    def model_kwargs(self, cond: dict[str, Tensor], drop_prob: float) -> dict[str, Tensor]:
        """Network keyword arguments with a per-sample CFG drop mask."""
        kwargs = {k: cond[k] for k in TEXT_KEYS}
        size, device = cond["text_embed"].shape[0], cond["text_embed"].device
        kwargs["drop_text"] = draws.uniform((size,), device=device) < drop_prob  # (B,)
        return kwargs

    # -- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        cond: dict[str, Tensor],
        *,
        num_candidates: int | None = None,
        sampling: SamplingConfig | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Unit-norm image embeddings (B, D) for `cond` (`text_embed`, `text_tokens`, `text_mask`).

        Draws `num_candidates` (default: the module's, paper 2) samples per caption and keeps the
        one with the largest dot product with z_t.
        """
        cfg = sampling or self.sampling
        n = num_candidates or self.hparams.num_candidates
        text = {k: cond[k] for k in TEXT_KEYS}
        batch, dim = text["text_embed"].shape
        kwargs = repeat_rows(text, n)
        kwargs["drop_text"] = torch.zeros(batch * n, dtype=torch.bool, device=self.device)
        x_T = noise((batch * n, dim), generator, self.device)
        self.net.clear_caption_cache()  # reused across this call's steps only
        gamma = getattr(self, "analytic_gamma", None) if cfg.sampler is Sampler.ANALYTIC else None
        if gamma is not None and (len(gamma) != cfg.steps or not bool(gamma.any())):
            gamma = None  # not estimated (yet), or for other steps: `sample` says so in one line
        x0 = sample(self.diffusion, self.net, x_T, cfg, model_kwargs=kwargs, drop_keys=DROP_KEYS, generator=generator,
                    gamma=None if gamma is None else gamma.cpu().numpy())
        candidates = self.from_x0(x0.float()).view(batch, n, dim)
        return select_best(candidates, text["text_embed"])

    @torch.no_grad()
    def generate_from_prompts(self, prompts: list[str], **kwargs: Any) -> Tensor:
        """`generate` from raw captions, encoded by the frozen CLIP."""
        return self.generate(self.conditioner.encode_prompts(prompts, self.device), **kwargs)
