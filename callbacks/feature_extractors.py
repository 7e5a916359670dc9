"""Image features for FID / KID / Inception Score.

Two sources, both torch-fidelity `FeatureExtractorBase`s (`forward(uint8 (B, 3, H, W)) -> tuple`
of the requested features), so one object serves torch-fidelity's `calculate_metrics` and the
project's torchmetrics-based `FidelityMetrics`:

- the standard Inception-v3 FID network (TF 2015-12-05 weights, torch-fidelity's port) loaded from
  a LOCAL file named in the config -- never downloaded;
- otherwise the project's CLIP image encoder ("FID_CLIP", Kynkaanniemi et al. 2023), whose
  Inception-Score logits are zero-shot logits over a list of class prompts.

`LoadedExtractor.description` says which one was used; every report carries it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import Tensor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from modules.networks.clip import FrozenCLIP

log = logging.getLogger(__name__)

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's port of the TF FID weights
INCEPTION_NAME = "inception-v3-compat"
CLIP_EXTRACTOR_NAME = "unclip-clip"
LOGITS = "logits_unbiased"  # the feature torch-fidelity's Inception Score reads


class FeatureSource(str, Enum):
    INCEPTION = "inception-v3"
    CLIP = "clip"


@dataclass
class FeatureConfig:
    """Which features the metrics use.

    inception_weights: local `weights-inception-2015-12-05-6726825d.pth` (standard FID); when None,
        the CLIP image encoder below is used instead.
    clip_model / clip_weights: open_clip registry name and LOCAL weights (a CLIP-stage checkpoint);
        also the CLIP of the CLIP score.
    class_prompts: class names for the CLIP Inception Score (zero-shot logits); None: no IS with CLIP.
    """

    inception_weights: str | None = None
    clip_model: str = "tiny-vit"
    clip_weights: str | None = None
    class_prompts: list[str] | None = field(default=None)


class ClipFeatureExtractor(FeatureExtractorBase):
    """CLIP image embeddings ("clip", (B, D), unit norm) and zero-shot logits ("logits_unbiased",
    (B, K) = exp(logit_scale) * z_i . z_t(class k)) for torch-fidelity.

    Built by torch-fidelity as `cls(name, features_list, **kwargs)`: then the CLIP comes from the
    kwargs `unclip_clip_model` / `feature_extractor_weights_path` and `unclip_class_prompts`.
    """

    def __init__(
        self,
        name: str,
        features_list: list[str],
        clip: FrozenCLIP | None = None,
        class_prompts: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, features_list)
        if clip is None:
            clip = FrozenCLIP(kwargs.get("unclip_clip_model", "tiny-vit"), kwargs.get("feature_extractor_weights_path"))
            class_prompts = class_prompts or kwargs.get("unclip_class_prompts")
        self.clip = clip
        self.class_prompts = list(class_prompts or [])
        if LOGITS in features_list and not self.class_prompts:
            raise ValueError("CLIP Inception-Score logits need class prompts (FeatureConfig.class_prompts)")
        embeds = torch.zeros(0, clip.embed_dim)
        if self.class_prompts:
            tokens = open_clip.get_tokenizer(clip.model_name)(self.class_prompts).to(clip.mean.device)
            embeds = clip.encode_text(tokens).embed  # (K, D)
        self.register_buffer("class_embeds", embeds, persistent=False)
        self.logit_scale = float(clip.model.logit_scale.exp())

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("clip", LOGITS)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return LOGITS if metric == "isc" else "clip"

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    @property
    def feature_dim(self) -> int:
        return self.clip.embed_dim

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        embed = self.clip.encode_image(x.float() / 127.5 - 1)  # (B, D) unit norm
        out = {"clip": embed}
        if LOGITS in self.features_list:
            out[LOGITS] = self.logit_scale * embed @ self.class_embeds.T  # (B, K)
        return tuple(out[name] for name in self.features_list)


def register_clip_extractor() -> str:
    """Register `ClipFeatureExtractor` with torch-fidelity (idempotent); returns its name.

    Then e.g. `torch_fidelity.calculate_metrics(..., feature_extractor="unclip-clip",
    unclip_clip_model="tiny-vit", feature_extractor_weights_path=<CLIP checkpoint>)`.
    """
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if CLIP_EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(CLIP_EXTRACTOR_NAME, ClipFeatureExtractor)
    return CLIP_EXTRACTOR_NAME


@dataclass
class LoadedExtractor:
    """A feature extractor with what the metrics need to know about it."""

    module: FeatureExtractorBase
    source: FeatureSource
    description: str
    feature_dim: int
    has_logits: bool

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Images (B, 3, H, W) in [0, 1] -> (features (B, D) float64, logits (B, K) or None)."""
        x = (images.clamp(0, 1) * 255).round().to(torch.uint8)  # torch-fidelity's input convention
        out = self.module(x.to(next(self.module.parameters()).device))
        features = out[0].reshape(x.shape[0], -1).double()
        return features, (out[1].double() if self.has_logits else None)

    def to(self, device: torch.device) -> "LoadedExtractor":
        self.module.to(device)
        return self


def load_inception(path: str | Path, key: str, with_logits: bool = True) -> FeatureExtractorBase:
    """torch-fidelity's Inception-v3 from a local file, checked loadable with weights_only=True first."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key} = {path}: no such file (the standard FID weights are {INCEPTION_FILE})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # arbitrary pickle, or not a torch file
        raise ValueError(f"{key} = {path}: not loadable with weights_only=True ({type(exc).__name__})") from None
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise ValueError(f"{key} = {path}: not an Inception-v3 FID state dict (no 'fc.weight')")
    del state
    # torch-fidelity re-reads the file itself; it has just been verified to hold plain tensors.
    features = ["2048", LOGITS] if with_logits else ["2048"]
    return FeatureExtractorInceptionV3(INCEPTION_NAME, features, feature_extractor_weights_path=str(path))


def build_extractor(
    cfg: FeatureConfig,
    *,
    key: str = "features.inception_weights",
    clip: FrozenCLIP | None = None,
    class_prompts: list[str] | None = None,
) -> LoadedExtractor:
    """Inception-v3 when `cfg.inception_weights` is set, else CLIP features (one log line says so).

    `key` names the config entry in messages; `clip` reuses an already built CLIP encoder;
    `class_prompts` (else `cfg.class_prompts`) are the CLIP Inception-Score classes.
    """
    if cfg.inception_weights:
        module = load_inception(cfg.inception_weights, key)
        desc = f"Inception-v3 FID network (pool3, 2048-d; IS from its 1008 logits), weights {cfg.inception_weights}"
        return LoadedExtractor(module, FeatureSource.INCEPTION, desc, 2048, True)
    log.info(
        "FID features: `%s` is not set (a local %s gives standard FID); using CLIP %s image features (FID_CLIP)",
        key, INCEPTION_FILE, cfg.clip_model,
    )
    clip = clip or FrozenCLIP(cfg.clip_model, cfg.clip_weights)
    prompts = class_prompts or cfg.class_prompts
    features = ["clip", LOGITS] if prompts else ["clip"]
    module = ClipFeatureExtractor(CLIP_EXTRACTOR_NAME, features, clip=clip, class_prompts=prompts)
    weights = cfg.clip_weights or "random init (no clip_weights: features are not comparable across runs)"
    desc = f"CLIP {clip.model_name} image encoder ({clip.embed_dim}-d, FID_CLIP), weights {weights}"
    if prompts:
        desc += f"; IS from zero-shot logits over {len(prompts)} class prompts"
    return LoadedExtractor(module, FeatureSource.CLIP, desc, clip.embed_dim, bool(prompts))
