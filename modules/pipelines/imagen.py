"""`ImagenPipeline`: caption -> frozen text encoder -> text-conditional base model -> upsamplers.

The Imagen cascade (Saharia et al. 2022): no CLIP prior and no image embedding. The base model
is a `DecoderModule` with `condition_on_image=False` and a `text_encoder` (or CLIP's text
tower); the upsamplers are `SuperResModule`s, text-conditioned when their config enables it.
The frozen text encoder is not stored: the stages' hyperparameters name it (a local directory or
the packaged MiniLM), as in their training checkpoints.

The directory format is `UnCLIPPipeline`'s (`pipeline.json` + one `.safetensors` per stage,
allow-listed stage classes, atomic writes) with format name `imagen-pipeline`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from modules.core.images import to_unit
from modules.diffusion.config import SamplingConfig
from modules.core.errors import PipelineError
from modules.pipelines.store import (
    atomic_directory,
    load_stage,
    load_stage_checkpoint,
    read_spec,
    save_stage,
    upsampler_entries,
)
from modules.stages.registry import STAGE_CLASSES, StageKind

FORMAT, VERSION = "imagen-pipeline", 1


@dataclass
class ImagenGenerateConfig:
    """Knobs of `ImagenPipeline.generate` (None: the stage's own sampling config / aug level)."""

    base_sampling: SamplingConfig | None = None
    upsampler_sampling: list[SamplingConfig | None] = field(default_factory=list)
    upsampler_aug_level: list[float | None] = field(default_factory=list)
    batch_size: int = 16


def _nth(values: list[Any], i: int) -> Any:
    return values[i] if i < len(values) else None


def upsampler_text(upsampler: nn.Module, prompts: list[str], device: torch.device) -> dict[str, Tensor] | None:
    """An upsampler's own caption conditioning, or None when it is not text-conditioned."""
    conditioner = getattr(upsampler, "conditioner", None)
    return conditioner.encode_prompts(prompts, device) if conditioner is not None else None


class ImagenPipeline(nn.Module):
    """The Imagen cascade assembled from trained stages (all frozen, eval mode)."""

    def __init__(self, base: nn.Module, upsamplers: list[nn.Module] | None = None) -> None:
        super().__init__()
        if base.hparams.get("condition_on_image", True):
            raise PipelineError("an Imagen base model conditions on text alone (condition_on_image=False)")
        self.base = base
        self.upsamplers = nn.ModuleList(upsamplers or [])
        self.requires_grad_(False).eval()

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    # -- persistence -----------------------------------------------------------------------------
    @classmethod
    def from_checkpoints(cls, base: str, upsamplers: list[str] | None = None) -> ImagenPipeline:
        """From Lightning checkpoints (loaded with `weights_only=True`; EMA weights if averaged)."""
        return cls(
            load_stage_checkpoint(StageKind.DECODER, base, STAGE_CLASSES[StageKind.DECODER][0]),
            [load_stage_checkpoint(StageKind.UPSAMPLER, p, STAGE_CLASSES[StageKind.UPSAMPLER][0]) for p in upsamplers or []],
        )

    def save(self, directory: str | Path) -> Path:
        with atomic_directory(directory) as tmp:
            spec: dict[str, Any] = {"format": FORMAT, "version": VERSION, "base": save_stage(self.base, tmp, "base")}
            spec["upsamplers"] = [save_stage(m, tmp, f"upsampler{i}") for i, m in enumerate(self.upsamplers)]
            (tmp / "pipeline.json").write_text(json.dumps(spec, indent=2))
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> ImagenPipeline:
        directory = Path(directory)
        spec, spec_path = read_spec(directory, FORMAT, VERSION, required=("base",))
        base = load_stage(StageKind.DECODER, spec["base"], directory, spec_path)
        ups = [load_stage(StageKind.UPSAMPLER, e, directory, spec_path) for e in upsampler_entries(spec, spec_path)]
        return cls(base, ups).to(device)

    # -- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> dict[str, Tensor]:
        """The base model's caption conditioning: `text_embed` (B, D), `text_tokens` (B, L, W), `text_mask` (B, L)."""
        return self.base.conditioner.encode_prompts(prompts, self.device)

    @torch.no_grad()
    def cascade(self, prompts: list[str], cfg: ImagenGenerateConfig, generator: torch.Generator | None) -> Tensor:
        """Base sample then each upsampler: (B, 3, S, S) in [-1, 1] at the final resolution."""
        kwargs = self.base.unet_kwargs(self.encode_text(prompts), drop=False)
        x = self.base.generate(kwargs, sampling=cfg.base_sampling, generator=generator)  # (B, 3, s, s)
        for i, up in enumerate(self.upsamplers):
            text = upsampler_text(up, prompts, self.device)
            x = up.generate(x, sampling=_nth(cfg.upsampler_sampling, i), aug_level=_nth(cfg.upsampler_aug_level, i),
                            generator=generator, **({"text": text} if text is not None else {}))
        return x

    @torch.no_grad()
    def generate(self, prompts: list[str], num_images: int = 1, *, seed: int = 0,
                 config: ImagenGenerateConfig | None = None) -> Tensor:
        """(len(prompts) * num_images, 3, S, S) in [0, 1], prompt-major order, seeded."""
        cfg = config or ImagenGenerateConfig()
        if not prompts or any(not p.strip() for p in prompts):
            raise ValueError("prompts must be non-empty strings")
        expanded = [p for p in prompts for _ in range(num_images)]
        generator = torch.Generator(device="cpu").manual_seed(seed)
        out = [self.cascade(expanded[i : i + cfg.batch_size], cfg, generator) for i in range(0, len(expanded), cfg.batch_size)]
        return to_unit(torch.cat(out))
