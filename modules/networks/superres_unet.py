"""The unCLIP upsampler U-Net (paper §2.1 "upsamplers"; guided-diffusion's ``SuperResModel``).

The low-resolution conditioning image is resized to the noisy input's size and concatenated to
it channel-wise; the noise-conditioning-augmentation level is embedded like a timestep and
added to the timestep embedding. Without attention (the default) the network is fully
convolutional: it is trained on random crops and run at the full size.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.core.hparams import coerce_fields
from modules.networks.linear import Linear
from modules.networks.unet import UNet, UNetConfig
from modules.networks.unet_blocks import timestep_embedding


class Interpolation(str, Enum):
    """How the low-resolution image is resized to the target size."""

    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


@dataclass
class SuperResUNetConfig(UNetConfig):
    """UNetConfig with upsampler defaults: no attention, no caption / image conditioning.

    ``low_res_channels`` defaults to ``in_channels``. ``aug_scale`` maps the augmentation level in
    [0, 1] onto the timestep range before the sinusoidal embedding (1000 for T = 1000). In YAML
    (jsonargparse) the interpolation is given by member name: `interpolation: BICUBIC`.
    """

    attention_resolutions: tuple[int, ...] = ()
    low_res_channels: Optional[int] = None
    interpolation: Interpolation = Interpolation.BICUBIC
    aug_scale: float = 1000.0

    def __post_init__(self) -> None:
        super().__post_init__()
        coerce_fields(self)  # enum names (checkpoints, YAML) or values
        if self.low_res_channels is None:
            self.low_res_channels = self.in_channels


class SuperResUNet(UNet):
    """UNet conditioned on a low-res image (concatenated) and its corruption level (embedded).

    ``forward(x, t, *, low_res, aug_level=None, **cond)``: x (B, C, H, W) noisy high-res image,
    low_res (B, C_low, h, w), aug_level (B,) in [0, 1] (None = 0, i.e. uncorrupted); ``cond`` are
    UNet's conditioning keywords (only usable when enabled in the config).
    """

    config: SuperResUNetConfig

    def __init__(self, config: SuperResUNetConfig) -> None:
        super().__init__(config)
        mc, emb_dim = config.model_channels, config.time_embed_dim
        self.aug_embed = nn.Sequential(
            Linear(mc, emb_dim), nn.SiLU(), Linear(emb_dim, emb_dim)
        )

    def _input_channels(self) -> int:
        return self.config.in_channels + self.config.low_res_channels

    def upsample_low_res(self, low_res: Tensor, size: tuple[int, int]) -> Tensor:
        """(B, C, h, w) -> (B, C, H, W) with the configured interpolation."""
        if tuple(low_res.shape[-2:]) == tuple(size):
            return low_res
        mode = self.config.interpolation.value
        align = None if mode == Interpolation.NEAREST.value else False
        return F.interpolate(low_res, size=size, mode=mode, align_corners=align)

    def forward(  # type: ignore[override]
        self,
        x: Tensor,  # (B, C, H, W)
        t: Tensor,  # (B,)
        *,
        low_res: Tensor,  # (B, C_low, h, w)
        aug_level: Optional[Tensor] = None,  # (B,) in [0, 1]
        **cond: Optional[Tensor],
    ) -> Tensor:
        if aug_level is None:
            aug_level = torch.zeros(x.shape[0], device=x.device)
        aug = timestep_embedding(aug_level * self.config.aug_scale, self.config.model_channels)
        emb = self.embed_timestep(t) + self.aug_embed(aug.to(self.aug_embed[0].weight.dtype))
        h = torch.cat([x, self.upsample_low_res(low_res, x.shape[-2:]).to(x.dtype)], dim=1)
        return self.run_body(h, self.conditioner(emb, **cond))
