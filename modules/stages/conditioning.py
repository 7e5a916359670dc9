"""CLIP conditioning for the prior and decoder: precomputed from shards or encoded on the fly.

A batch either carries the exported embeddings (`image_embed`, `text_embed`, `text_tokens`,
`text_mask`) or raw `image` / `tokens`, which a frozen CLIP named in the YAML encodes here; the
token ids themselves are passed on as `text_ids` (trimmed like the token states) when present.
The frozen CLIP is kept outside the module tree: it is not trained, not averaged by EMA and not
saved in stage checkpoints (its own checkpoint path, in the saved config, records the lineage).
"""

from __future__ import annotations

from typing import Any, Sequence

import open_clip
import torch
from torch import Tensor

from modules.networks.clip import FrozenCLIP, register_project_configs

CONDITION_KEYS = ("image_embed", "text_embed", "text_tokens", "text_mask")


def clip_dims(model_name: str) -> tuple[int, int]:
    """(embedding width, text transformer width) of a registered open_clip architecture."""
    register_project_configs()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"unknown CLIP model {model_name!r}")
    return int(cfg["embed_dim"]), int(cfg["text_cfg"]["width"])


def trim_tokens(tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop padding columns beyond the longest caption in the batch: (B, L, W) -> (B, L', W)."""
    length = int(mask.sum(dim=1).max().item()) if mask.numel() else 0
    length = max(length, 1)
    return tokens[:, :length], mask[:, :length]


def finish_condition(cond: dict[str, Tensor], token_ids: Tensor | None = None) -> dict[str, Tensor]:
    """Caption conditioning as the stages take it: token states and mask trimmed to the longest
    caption, float32 encodings, a bool mask, and the caption's token ids (B, L) trimmed alike when
    given (`text_ids`, for a decoder that embeds them itself, as GLIDE's text encoder does)."""
    cond["text_tokens"], cond["text_mask"] = trim_tokens(cond["text_tokens"], cond["text_mask"].bool())
    if token_ids is not None:
        cond["text_ids"] = token_ids[:, : cond["text_mask"].shape[1]]
    return {k: v.float() if v.is_floating_point() else v for k, v in cond.items()}


def repeat_rows(cond: dict[str, Tensor], n: int) -> dict[str, Tensor]:
    """Each row repeated n times in place: [a, b] -> [a, a, b, b] (so rows reshape to (B, n, ...))."""
    return {k: v.repeat_interleave(n, dim=0) for k, v in cond.items()}


def best_of(keys: Tensor, text_embed: Tensor) -> Tensor:
    """Index (B,) of the candidate key (B, n, D) with the largest dot product with z_t (B, D): the
    prior's best-of-n over z_i (paper §2.2) and the pipeline's decoder reranking over CLIP(x)."""
    return torch.einsum("bnd,bd->bn", keys, text_embed.to(keys)).argmax(dim=1)


def phrase_embeddings(clip: FrozenCLIP, tokenizer: Any, phrases: Sequence[Sequence[str]], device: torch.device,
                      cache: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """CLIP text embeddings of each layout slot's phrase: (B, K, D) unit-norm, zeros where the phrase
    is "" (an empty slot), and the mask (B, K), True where a slot has a phrase. Rows must have equal
    K. Encoded in fp32 whatever autocast is active; `cache` (phrase -> (D,) on the CPU) is filled."""
    cache = {} if cache is None else cache
    missing = sorted({p for row in phrases for p in row if p and p not in cache})
    if missing:
        with torch.autocast(device.type, enabled=False):
            embeds = clip.encode_text(tokenizer(missing).to(device)).embed.float().cpu()
        cache.update(zip(missing, embeds))
    if len({len(row) for row in phrases}) > 1:
        raise ValueError("layout phrases: every row needs the same number of slots")
    batch, slots = len(phrases), len(phrases[0]) if phrases else 0
    out = torch.zeros(batch, slots, clip.embed_dim)
    mask = torch.zeros(batch, slots, dtype=torch.bool)
    for b, row in enumerate(phrases):
        for k, p in enumerate(row):
            if p:
                out[b, k], mask[b, k] = cache[p], True
    return out.to(device), mask.to(device)


class ClipConditioner:
    """Returns the CLIP conditioning of a batch, encoding with a frozen CLIP when needed."""

    def __init__(self, model_name: str, weights: str | None = None) -> None:
        self.model_name, self.weights = model_name, weights
        self.embed_dim, self.text_width = clip_dims(model_name)
        self._clip: FrozenCLIP | None = None
        self._phrases: dict[str, Tensor] = {}
        self._tokenizer: Any = None

    def encoder(self, device: torch.device) -> FrozenCLIP:
        if self._clip is None:
            self._clip = FrozenCLIP(self.model_name, self.weights)
        if self._clip.mean.device != device:
            self._clip = self._clip.to(device)
        return self._clip

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        if all(k in batch for k in CONDITION_KEYS):
            cond = {k: batch[k] for k in CONDITION_KEYS}
        else:
            device = batch["image"].device if "image" in batch else batch["tokens"].device
            clip = self.encoder(device)
            text = clip.encode_text(batch["tokens"])
            cond = {"text_embed": text.embed, "text_tokens": text.tokens, "text_mask": text.mask}
            if "image" in batch:
                cond["image_embed"] = clip.encode_image(batch["image"])
        return finish_condition(cond, batch.get("tokens"))

    def layout(self, batch: dict[str, Any], device: torch.device) -> dict[str, Tensor]:
        """The batch's layout as U-Net / layout-prior keywords: `layout_boxes` (B, K, 4), the phrases'
        CLIP embeddings `layout_embeds` (B, K, D) and `layout_mask` (B, K)."""
        embeds, mask = phrase_embeddings(self.encoder(device), self.tokenizer, batch["layout_phrases"], device,
                                         self._phrases)
        return {"layout_boxes": batch["layout_boxes"].float(), "layout_embeds": embeds, "layout_mask": mask}

    @property
    def tokenizer(self) -> Any:
        """The CLIP model's open_clip tokenizer, made once."""
        if self._tokenizer is None:
            self._tokenizer = open_clip.get_tokenizer(self.model_name)
        return self._tokenizer

    def encode_prompts(self, prompts: list[str], device: torch.device) -> dict[str, Tensor]:
        tokens = self.tokenizer(prompts).to(device)
        return self({"tokens": tokens})
