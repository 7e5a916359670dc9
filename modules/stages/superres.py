"""Stage 4: the diffusion upsamplers 64->256 and 256->1024 (Ramesh et al. 2022 §2.1, App. C).

Training (DDPM Algorithm 1 on pairs): the low-res input is made by downsampling the high-res
target; both are randomly cropped at aligned offsets (a quarter of the target size by default);
the low-res crop is corrupted at a random strength s (noise conditioning augmentation, see
`modules.stages.degradations`) and the U-Net sees the noisy target, the corrupted low-res image and s.
Sampling runs the same convolutional U-Net at the full size with DDIM and few steps (paper: 27
for 64->256, 15 for 256->1024), with s a configured constant. EMA of the weights is Lightning's
`EMAWeightAveraging` callback, set in the experiment YAML.

Imagen's upsamplers (Saharia et al. 2022) are also text-conditional: with a `text_encoder` the
U-Net attends to the caption's token encodings (and adds their pooled mean to the timestep
embedding), the caption is dropped for classifier-free guidance, and `generate(..., text=)` takes
the caption conditioning (see `modules.stages.text_encoders`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from modules.core import draws, optim
from modules.core.images import to_unit
from modules.stages.degradations import DegradationConfig, Resampling, resize
from modules.diffusion.config import DiffusionConfig, SamplingConfig, noise, sample
from modules.stages.validation import log_fixed_timestep_losses
from modules.core.hparams import as_config, check_range, enum_member, init_args, to_plain
from modules.stages.registry import class_path_of
from modules.networks.superres_unet import Interpolation, SuperResUNet, SuperResUNetConfig
from modules.stages.text_encoders import TextConditioner, TextEncoderConfig, text_unet_kwargs


def unet_config(value: SuperResUNetConfig | dict | None) -> SuperResUNetConfig:
    """`as_config`, also accepting the interpolation by member name (how `to_plain` stores it;
    `SuperResUNetConfig` itself only takes values)."""
    if isinstance(value, dict) and "interpolation" in value:
        value = {**value, "interpolation": enum_member(Interpolation, value["interpolation"])}
    return as_config(SuperResUNetConfig, value)


def random_crop_pair(
    high: Tensor,  # (B, C, H, W)
    low: Tensor,  # (B, C, H/f, W/f)
    crop: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-sample random crops (crop, crop) of `high` and (crop/f, crop/f) of `low` at aligned
    offsets: the low-res crop covers exactly the high-res crop's area."""
    factor = high.shape[-1] // low.shape[-1]
    if crop == high.shape[-1] and crop == high.shape[-2]:
        return high, low
    lc = crop // factor
    n_y, n_x = low.shape[-2] - lc + 1, low.shape[-1] - lc + 1  # low-res offsets available
    ys = draws.integers(0, n_y, (high.shape[0],), device="cpu", generator=generator).tolist()
    xs = draws.integers(0, n_x, (high.shape[0],), device="cpu", generator=generator).tolist()
    highs = [h[:, y * factor : y * factor + crop, x * factor : x * factor + crop] for h, y, x in zip(high, ys, xs)]
    lows = [l[:, y : y + lc, x : x + lc] for l, y, x in zip(low, ys, xs)]
    return torch.stack(highs), torch.stack(lows)  # (B, C, crop, crop), (B, C, crop/f, crop/f)


class SuperResModule(pl.LightningModule):
    """Trains a `SuperResUNet`; `generate(low_res)` upsamples by `unet.image_size / low_res_size`.

    Args:
        unet: the upsampler U-Net; `image_size` is the full (target) size.
        low_res_size: side of the conditioning image; the target size must be a multiple of it.
        crop_size: training crop of the target (default a quarter of it, as in the paper); the
            low-res crop is `crop_size / factor`. Must be divisible by the U-Net's downsampling.
        downsample: how training targets are reduced to the low-res input (AREA or BICUBIC).
        degradation: noise conditioning augmentation (BLUR for 64->256, BSR for 256->1024).
        aug_prob: fraction of training samples corrupted at s ~ U[0, max_train_aug]; the rest get
            s = 0 (clean input).
        sample_aug_level: the constant s used at sampling (and for the validation loss).
        text_encoder: a frozen caption encoder (Imagen's text-conditional upsamplers); None: no
            caption conditioning (unCLIP's upsamplers). Batches then need `caption`.
        drop_text_prob: CFG caption dropout rate with a text encoder (Imagen: 10%).
        val_timesteps: fixed timesteps at which the validation loss is measured (full size).
    """

    def __init__(
        self,
        unet: SuperResUNetConfig | None = None,
        low_res_size: int = 64,
        crop_size: int | None = None,
        downsample: Resampling = Resampling.AREA,
        degradation: DegradationConfig | None = None,
        aug_prob: float = 1.0,
        max_train_aug: float = 1.0,
        sample_aug_level: float = 0.0,
        text_encoder: TextEncoderConfig | None = None,
        drop_text_prob: float = 0.1,
        diffusion: DiffusionConfig | None = None,
        sampling: SamplingConfig | None = None,
        optimizer: optim.OptimConfig | None = None,
        val_timesteps: tuple[int, ...] = (50, 250, 500, 750, 950),
        seed: int = 0,
    ) -> None:
        args = init_args(locals())
        check_range("model", "drop_text_prob", drop_text_prob, 0.0, 1.0)  # a CFG dropout rate
        super().__init__()
        unet_cfg = unet_config(unet)
        self.conditioner = TextConditioner(as_config(TextEncoderConfig, text_encoder)) if text_encoder is not None else None
        if self.conditioner is not None:
            unet_cfg = dataclasses.replace(unet_cfg, text_embed_dim=self.conditioner.text_width)
        self.degrade = as_config(DegradationConfig, degradation)
        self.sampling = as_config(SamplingConfig, sampling or {"steps": 27})
        self.diffusion_cfg, self.optim_cfg = as_config(DiffusionConfig, diffusion), as_config(optim.OptimConfig, optimizer)
        self.downsample = enum_member(Resampling, downsample)
        size = unet_cfg.image_size
        if size % low_res_size:
            raise ValueError(f"target size {size} is not a multiple of low_res_size {low_res_size}")
        self.factor = size // low_res_size
        self.crop_size = crop_size or size // 4
        unet_stride = 2 ** (len(unet_cfg.channel_mult) - 1)
        if self.crop_size % self.factor or self.crop_size % unet_stride or self.crop_size > size:
            raise ValueError(f"crop_size {self.crop_size} must be <= {size} and divisible by {self.factor} and {unet_stride}")
        if not (0 <= sample_aug_level <= 1 and 0 <= max_train_aug <= 1 and 0 <= aug_prob <= 1):
            raise ValueError("aug levels and aug_prob must lie in [0, 1]")
        self.save_hyperparameters(to_plain({**args, "unet": unet_cfg, "sampling": self.sampling, "downsample": self.downsample,
                                             "_class_path": class_path_of(self)}))
        self.unet = SuperResUNet(unet_cfg)
        self.diffusion = self.diffusion_cfg.build()

    # -- data ----------------------------------------------------------------------------------
    def make_low_res(self, image: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H/f, W/f) in [-1, 1] with the configured downsampling."""
        size = (image.shape[-2] // self.factor, image.shape[-1] // self.factor)
        return resize(image, size, self.downsample).clamp(-1, 1)

    def training_levels(self, batch: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample corruption strength (B,): U[0, max_train_aug] w.p. aug_prob, else 0."""
        hp = self.hparams
        u = draws.uniform((batch, 2), device=device, generator=generator)  # (B, 2): [corrupt?, level]
        return torch.where(u[:, 0] < hp.aug_prob, u[:, 1] * hp.max_train_aug, torch.zeros_like(u[:, 1]))

    # -- training: DDPM Algorithm 1 on (crop, corrupted low-res crop) pairs ----------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        image = batch["image"]  # (B, 3, H, W) in [-1, 1]
        x0, low = random_crop_pair(image, self.make_low_res(image), self.crop_size)  # (B, 3, c, c), (B, 3, c/f, c/f)
        level = self.training_levels(x0.shape[0], x0.device)  # (B,)
        low = self.degrade(low, level)
        t = self.diffusion.sample_timesteps(x0.shape[0], device=x0.device)  # t ~ U{0..T-1} (or ∝ w_t)
        cond = {"low_res": low, "aug_level": level, **self.text_kwargs(batch, drop=True)}
        loss = self.diffusion.training_loss(self.unet, x0, t, model_kwargs=cond)
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Full-size loss at fixed timesteps, fixed noise and the sampling corruption level."""
        x0 = batch["image"]
        gen = torch.Generator(device="cpu").manual_seed(self.hparams.seed + batch_idx)
        cond = self.condition(self.make_low_res(x0), self.hparams.sample_aug_level, gen)
        cond.update(self.text_kwargs(batch, drop=False))
        log_fixed_timestep_losses(self, self.diffusion, self.unet, x0, cond, self.hparams.val_timesteps, gen)

    def configure_optimizers(self) -> dict[str, Any]:
        return optim.configure(self.unet, self.optim_cfg)

    def text_kwargs(self, batch: dict[str, Any], drop: bool) -> dict[str, Tensor]:
        """Caption keywords for the U-Net (none without a text encoder); `drop`: CFG dropout."""
        if self.conditioner is None:
            return {}
        return text_unet_kwargs(self.conditioner(batch), self.hparams.drop_text_prob if drop else 0.0)

    # -- sampling ------------------------------------------------------------------------------
    def condition(self, low_res: Tensor, aug_level: float | Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        """U-Net keywords: the low-res image corrupted at `aug_level` (scalar or (B,)) and the level."""
        level = torch.as_tensor(aug_level, dtype=low_res.dtype, device=low_res.device).expand(low_res.shape[0])
        return {"low_res": self.degrade(low_res, level, generator), "aug_level": level}

    @torch.no_grad()
    def generate(
        self,
        low_res: Tensor,
        *,
        sampling: SamplingConfig | None = None,
        aug_level: float | Tensor | None = None,
        generator: torch.Generator | None = None,
        text: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """(B, C, h, w) in [-1, 1] -> (B, C, h·f, w·f) in [-1, 1], at any h, w (fully convolutional).

        `aug_level` (default `sample_aug_level`) corrupts the input and conditions the U-Net.
        `text`: caption conditioning (`text_tokens`, `text_mask`, e.g. `conditioner.encode_prompts`)
        for a text-conditioned upsampler; guided by `sampling.guidance_scale`.
        """
        cfg = sampling or self.sampling
        low_res = low_res.to(self.device)
        level = self.hparams.sample_aug_level if aug_level is None else aug_level
        cond = self.condition(low_res, level, generator)
        if (text is None) != (self.conditioner is None):
            raise ValueError("give `text` exactly when the upsampler has a text encoder")
        cond.update(text_unet_kwargs(text) if text is not None else {})
        B, C, h, w = low_res.shape
        x_T = noise((B, self.unet.config.in_channels, h * self.factor, w * self.factor), generator, self.device)
        drop_keys = ["drop_text"] if text is not None else []
        return sample(self.diffusion, self.unet, x_T, cfg, model_kwargs=cond, drop_keys=drop_keys, generator=generator)

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any], n: int = 8, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Low-res input (nearest), bicubic upsample, model output and target, side by side."""
        image = batch["image"][:n].to(self.device)
        low = self.make_low_res(image)
        gen = generator or torch.Generator(device="cpu").manual_seed(self.hparams.seed)
        text = self.conditioner.encode_prompts(list(batch["caption"])[:n], self.device) if self.conditioner else None
        out = self.generate(low, generator=gen, text=text)
        size = tuple(image.shape[-2:])
        columns = {
            "low_res": F.interpolate(low, size=size, mode="nearest"),
            "bicubic": bicubic_upsample(low, size),
            "samples": out,
            "real": image,
        }
        columns = {k: to_unit(v) for k, v in columns.items()}
        return {**columns, "comparison": torch.cat(list(columns.values()), dim=-1)}  # (n, C, H, 4W)


def bicubic_upsample(low_res: Tensor, size: tuple[int, int]) -> Tensor:
    """The baseline: bicubic interpolation (align_corners=False), clamped to [-1, 1]."""
    return F.interpolate(low_res, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)
