"""Stage 3: the unCLIP decoder P(x | z_i, y) (Ramesh et al. 2022 §2.1).

A GLIDE U-Net trained with DDPM's L_simple (Ho et al. 2020, Algorithm 1) on 64 px images,
conditioned on the CLIP image embedding z_i (added to the timestep embedding and projected to 4
context tokens) and the caption: the frozen CLIP's token encodings, or (`unet.text_vocab_size`) its
token ids through embeddings trained with the U-Net, as GLIDE's text encoder is. For classifier-free guidance z_i is
dropped 10% and the caption 50% of the time (learned null embeddings inside the U-Net).
With `condition_on_layout` the U-Net also reads the scene's layout, each object's phrase embedding
painted into its box (`modules.networks.layout`; boxes from the layout stage at sampling), dropped
`drop_layout_prob` of the time.
EMA of the weights is Lightning's `EMAWeightAveraging` callback, set in the experiment YAML.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from modules.core import draws, optim
from modules.core.errors import ConfigError
from modules.core.images import to_unit
from modules.stages.conditioning import ClipConditioner
from modules.diffusion.config import DiffusionConfig, SamplingConfig, noise, sample
from modules.stages.validation import log_fixed_timestep_losses
from modules.core.hparams import as_config, check_range, init_args, to_plain
from modules.stages.registry import class_path_of
from modules.networks.unet import UNet, UNetConfig
from modules.stages.text_encoders import TextConditioner, TextEncoderConfig, text_unet_kwargs

DROP_KEYS = ("drop_image", "drop_text", "drop_layout")
LAYOUT_KEYS = ("layout_boxes", "layout_embeds", "layout_mask")


class DecoderModule(pl.LightningModule):
    """Trains the decoder U-Net; `generate` samples images from CLIP conditioning.

    Args:
        unet: U-Net architecture; its `image_embed_dim` / `text_embed_dim` are filled in from the
            CLIP model so no width is typed twice.
        clip_model / clip_weights: the frozen CLIP (open_clip registry name, local weights file or
            CLIP-stage checkpoint) used when batches carry images instead of exported embeddings.
        text_encoder: a frozen text-only encoder used in place of CLIP (Imagen's base model:
            caption token encodings as context, pooled caption in the timestep embedding); needs
            `condition_on_image=False`. None: CLIP.
        condition_on_image / condition_on_text: switch either conditioning off.
        condition_on_layout: also condition on the layout (batches from `data.layout_slots`);
            dropped with `drop_layout_prob` (the null layout is the empty map).
        drop_image_prob / drop_text_prob: CFG dropout rates (paper: 10% and 50%).
        image_embed_noise: σ of Gaussian noise added to each component of the unit-norm z_i in
            training, renormalised after (conditioning augmentation; 0: none, as in the paper).
        val_timesteps: fixed timesteps at which the validation loss is measured.
    """

    def __init__(
        self,
        unet: UNetConfig | None = None,
        clip_model: str = "tiny-vit",
        clip_weights: str | None = None,
        text_encoder: TextEncoderConfig | None = None,
        condition_on_image: bool = True,
        condition_on_text: bool = True,
        condition_on_layout: bool = False,
        diffusion: DiffusionConfig | None = None,
        sampling: SamplingConfig | None = None,
        optimizer: optim.OptimConfig | None = None,
        drop_image_prob: float = 0.1,
        drop_text_prob: float = 0.5,
        drop_layout_prob: float = 0.1,
        image_embed_noise: float = 0.0,
        val_timesteps: tuple[int, ...] = (50, 250, 500, 750, 950),
        seed: int = 0,
    ) -> None:
        args = init_args(locals())
        check_range("model", "drop_image_prob", drop_image_prob, 0.0, 1.0)  # a CFG dropout rate
        check_range("model", "drop_text_prob", drop_text_prob, 0.0, 1.0)  # a CFG dropout rate
        check_range("model", "drop_layout_prob", drop_layout_prob, 0.0, 1.0)  # a CFG dropout rate
        super().__init__()
        unet_cfg, self.diffusion_cfg = as_config(UNetConfig, unet), as_config(DiffusionConfig, diffusion)
        self.sampling, self.optim_cfg = as_config(SamplingConfig, sampling), as_config(optim.OptimConfig, optimizer)
        if text_encoder is not None and condition_on_image:
            raise ValueError("a text_encoder gives no image embedding: set condition_on_image=False")
        self.conditioner: ClipConditioner | TextConditioner = (
            ClipConditioner(clip_model, clip_weights) if text_encoder is None
            else TextConditioner(as_config(TextEncoderConfig, text_encoder))
        )
        reads_ids = unet_cfg.text_vocab_size is not None  # GLIDE: the caption's token ids, embedded in the U-Net
        if reads_ids and (text_encoder is not None or not condition_on_text):
            raise ConfigError("unet.text_vocab_size: the U-Net embeds CLIP token ids; it needs condition_on_text "
                              "and no text_encoder")
        unet_cfg = dataclasses.replace(
            unet_cfg,
            image_embed_dim=self.conditioner.embed_dim if condition_on_image else None,
            text_embed_dim=self.conditioner.text_width if condition_on_text and not reads_ids else None,
            layout_dim=self.conditioner.embed_dim if condition_on_layout else None,
        )
        if condition_on_layout and text_encoder is not None:
            raise ConfigError("condition_on_layout: the phrases are embedded by CLIP; it needs no text_encoder")
        self.save_hyperparameters(to_plain({**args, "unet": unet_cfg, "_class_path": class_path_of(self)}))
        self.unet = UNet(unet_cfg)
        self.diffusion = self.diffusion_cfg.build()

    # -- training: DDPM Algorithm 1 + CFG dropout -------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x0 = batch["image"]  # (B, 3, H, W) in [-1, 1]
        cond = self.condition(batch, drop=True)
        t = self.diffusion.sample_timesteps(x0.shape[0], device=x0.device)  # t ~ U{0..T-1} (or ∝ w_t)
        loss = self.diffusion.training_loss(self.unet, x0, t, model_kwargs=cond)  # w_t ‖target − prediction‖²
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Loss at fixed timesteps with fixed noise, so validation curves are comparable."""
        x0, cond = batch["image"], self.condition(batch, drop=False)
        gen = torch.Generator(device="cpu").manual_seed(self.hparams.seed + batch_idx)
        log_fixed_timestep_losses(self, self.diffusion, self.unet, x0, cond, self.hparams.val_timesteps, gen)

    def configure_optimizers(self) -> dict[str, Any]:
        return optim.configure(self.unet, self.optim_cfg)

    # -- conditioning --------------------------------------------------------------------------
    def condition(self, batch: dict[str, Any], drop: bool) -> dict[str, Tensor]:
        """U-Net keyword arguments for a batch; with `drop`, CFG dropout masks drawn per sample."""
        cond = self.conditioner(batch)
        if self.hparams.condition_on_layout:
            if "layout_boxes" not in batch:
                raise ConfigError("condition_on_layout: batches carry no layout; set data.layout_slots")
            cond.update(self.conditioner.layout(batch, cond["text_tokens"].device))
        return self.unet_kwargs(cond, drop=drop)

    def unet_kwargs(self, cond: dict[str, Tensor], drop: bool = False) -> dict[str, Tensor]:
        """CLIP conditioning (`image_embed`, `text_tokens`, `text_mask`, and a layout's `layout_*` if
        any) -> U-Net kwargs. Without a layout, a layout-conditioned U-Net gets the null (empty) one."""
        hp = self.hparams
        kwargs: dict[str, Tensor] = {}
        ref = cond["image_embed"] if "image_embed" in cond else cond["text_tokens"]
        batch_size, device = ref.shape[0], ref.device
        if hp.condition_on_image:
            z_i = cond["image_embed"]
            if drop and hp.image_embed_noise:
                z_i = F.normalize(z_i + hp.image_embed_noise * draws.normal(z_i.shape, device=device), dim=-1)
            kwargs["image_embed"] = z_i
            kwargs["drop_image"] = draws.uniform((batch_size,), device=device) < (hp.drop_image_prob if drop else 0.0)
        if hp.condition_on_text:
            kwargs.update(text_unet_kwargs(cond, hp.drop_text_prob if drop else 0.0, self.unet.config.text_vocab_size))
        if hp.condition_on_layout and "layout_boxes" in cond:
            kwargs.update({k: cond[k] for k in LAYOUT_KEYS})
            kwargs["drop_layout"] = draws.uniform((batch_size,), device=device) < (hp.drop_layout_prob if drop else 0.0)
        return kwargs

    # -- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        cond: dict[str, Tensor],
        *,
        sampling: SamplingConfig | None = None,
        generator: torch.Generator | None = None,
        x_T: Tensor | None = None,
        progress: bool = False,
    ) -> Tensor:
        """Images (B, 3, S, S) in [-1, 1] from U-Net kwargs (see `condition`), guided per `sampling`."""
        cfg = sampling or self.sampling
        size, batch = self.unet.config.image_size, next(iter(cond.values())).shape[0]
        if x_T is None:
            x_T = noise((batch, self.unet.config.in_channels, size, size), generator, self.device)
        drop_keys = [k for k in DROP_KEYS if k in cond]
        return sample(
            self.diffusion, self.unet, x_T, cfg, model_kwargs=cond, drop_keys=drop_keys, generator=generator, progress=progress
        )

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any], n: int = 8, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Guided samples for the first `n` validation conditions, next to the real images."""
        batch = {k: v[:n] for k, v in batch.items() if isinstance(v, (Tensor, list))}
        cond = self.condition(batch, drop=False)
        gen = generator or torch.Generator(device="cpu").manual_seed(self.hparams.seed)
        images = self.generate(cond, generator=gen)
        return {"samples": to_unit(images), "real": to_unit(batch["image"]), "captions": list(batch.get("caption", []))}

