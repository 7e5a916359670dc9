"""CLIP through open_clip: model registry, safe weight loading, and the frozen encoder that later
stages condition on.

Architectures are data: the project's small configs live as JSON in `clip_configs/` and are
registered with open_clip's registry next to the standard names (ViT-B-32, ViT-L-14, ViT-H-14).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

CONFIG_DIR = Path(__file__).parent / "clip_configs"
_registered = False


def register_project_configs() -> None:
    """Add `clip_configs/*.json` to open_clip's model registry (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def create_clip(model_name: str, pretrained: str | None = None) -> nn.Module:
    """An open_clip model by registry name; `pretrained` is a LOCAL weight file (never a hub tag)."""
    register_project_configs()
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown CLIP model {model_name!r}; known: {', '.join(open_clip.list_models()[:8])}, ...")
    model = open_clip.create_model(model_name, pretrained=None)
    if pretrained:
        load_clip_weights(model, pretrained)
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from safetensors or `torch.load(weights_only=True)` only -- never arbitrary pickle.

    Accepts open_clip's `open_clip_pytorch_model.bin` / `.safetensors`, training checkpoints with a
    `state_dict` key (open_clip's or Lightning's), and strips `module.` / `model.` prefixes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle that needs arbitrary code, or not a torch file at all
            raise ValueError(f"refusing to load {path}: not loadable with weights_only=True ({type(exc).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    for prefix in ("module.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_clip_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local checkpoint into `model`; one clear line when it does not fit the architecture."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        detail = (
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
            f"{len(mismatched)} with other shapes (e.g. {mismatched[:2]})"
        )
        raise ValueError(f"weights in {path} do not fit the named CLIP architecture: {detail}")
    model.load_state_dict(state)


@dataclass
class TextEncoding:
    """CLIP text outputs the prior and decoder condition on."""

    embed: torch.Tensor  # (B, D) unit-norm z_t
    tokens: torch.Tensor  # (B, L, W) last-layer hidden states (after ln_final)
    mask: torch.Tensor  # (B, L) bool, True for real tokens (SOT .. EOT)


class FrozenCLIP(nn.Module):
    """A CLIP model used as a fixed encoder: eval mode, no gradients, inputs in [-1, 1].

    `encode_image` resizes to the model's resolution and applies its normalisation; both
    encoders return unit-norm embeddings, as unCLIP's prior and decoder expect.
    """

    def __init__(self, model_name: str, pretrained: str | None = None) -> None:
        super().__init__()
        self.model_name = model_name
        self.model = create_clip(model_name, pretrained)
        self.model.requires_grad_(False)
        self.model.eval()
        visual = self.model.visual
        size = visual.image_size
        self.image_size = size if isinstance(size, int) else size[0]
        mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "FrozenCLIP":
        return super().train(False)  # always frozen

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[-1])

    @property
    def text_width(self) -> int:
        return int(self.model.ln_final.normalized_shape[0])

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> CLIP input (B, 3, S, S), normalised."""
        x = (images.float() + 1) / 2
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True, align_corners=False)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(self.preprocess(images)).float(), dim=-1)  # (B, D)

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> TextEncoding:
        m = self.model
        x = m.token_embedding(tokens) + m.positional_embedding  # (B, L, W)
        x = m.transformer(x, attn_mask=m.attn_mask)
        x = m.ln_final(x)  # (B, L, W)
        eot = tokens.argmax(dim=-1)  # the EOT id is the largest in CLIP's vocabulary
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]  # (B, W)
        embed = pooled @ m.text_projection if not isinstance(m.text_projection, nn.Linear) else m.text_projection(pooled)
        mask = torch.arange(tokens.shape[1], device=tokens.device)[None] <= eot[:, None]
        return TextEncoding(F.normalize(embed.float(), dim=-1), x.float(), mask)
