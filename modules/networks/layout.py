"""Layouts: object boxes with phrase embeddings, as a spatial map for the decoder and as the
target of the layout prior.

A layout is K slots per image: ``boxes`` (B, K, 4) as [x0, y0, x1, y1] in [0, 1] of the square
canvas (y down), the CLIP text embedding of each slot's phrase ``embeds`` (B, K, D), and ``mask``
(B, K), True where a slot holds an object. unCLIP's decoder sees where things are only through z_i
and the caption, and binds neither (paper §7); here the layout reaches it as a map: each phrase's
embedding painted into its box (`paint`), projected and added to the U-Net's first feature map, the
way GLIGEN (Li et al. 2023) grounds phrases in boxes and LLM-grounded diffusion (Lian et al. 2023)
plans the boxes from the prompt first. The boxes come from `LayoutPrior`, a diffusion model over
the K boxes conditioned on the caption's scene graph (the phrases and the relation between them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from modules.core.hparams import check_range
from modules.networks.linear import Linear
from modules.networks.transformer import TransformerStack
from modules.networks.unet_blocks import timestep_embedding


def box_coverage(boxes: Tensor, size: int) -> Tensor:
    """Fraction of each pixel of a size x size grid that each box covers: (B, K, 4) -> (B, K, S, S).

    Pixel (i, j) spans [j/S, (j+1)/S] x [i/S, (i+1)/S]; the overlap is separable, so the coverage
    is the product of the overlaps along x and y (exact for axis-aligned boxes; sums to area · S²).
    """
    edges = torch.arange(size + 1, device=boxes.device, dtype=boxes.dtype) / size  # (S + 1,)
    lo, hi = edges[:-1], edges[1:]

    def overlap(a: Tensor, b: Tensor) -> Tensor:  # (B, K) box extent -> (B, K, S) covered fraction
        return (torch.minimum(b[..., None], hi) - torch.maximum(a[..., None], lo)).clamp(min=0) * size

    x0, y0, x1, y1 = boxes.unbind(-1)
    return overlap(y0, y1)[..., :, None] * overlap(x0, x1)[..., None, :]


def paint(boxes: Tensor, embeds: Tensor, mask: Tensor, size: int) -> Tensor:
    """The layout map (B, D + 1, S, S): Σ_k coverage_k · √D · e_k, and the total coverage.

    Unit-norm embeddings are scaled by √D so each channel has unit second moment inside a box (as
    the prior scales z_i); empty slots (mask False) paint nothing, so an all-empty layout is the
    zero map, which is also the decoder's null layout for classifier-free guidance.
    """
    cover = box_coverage(boxes, size) * mask[..., None, None].to(boxes.dtype)  # (B, K, S, S)
    scale = math.sqrt(embeds.shape[-1])
    painted = torch.einsum("bkhw,bkd->bdhw", cover, embeds.to(cover.dtype) * scale)
    return torch.cat([painted, cover.sum(1, keepdim=True)], dim=1)


class LayoutEncoder(nn.Module):
    """Layout -> (B, C, S, S) features added to the U-Net's conv_in output (a 1x1 projection of
    `paint`'s map, without bias). A dropped or absent layout paints nothing, so its features are zero:
    the null layout of classifier-free guidance is exactly "no layout"."""

    def __init__(self, embed_dim: int, channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(embed_dim + 1, channels, 1, bias=False)

    def forward(self, boxes: Tensor, embeds: Tensor, mask: Tensor, size: int,
                drop: Optional[Tensor] = None) -> Tensor:
        if drop is not None:
            mask = mask & ~drop[:, None]
        return self.proj(paint(boxes.float(), embeds.float(), mask, size).to(self.proj.weight.dtype))


# ---------------------------------------------------------------------------------------------- prior
@dataclass
class LayoutPriorConfig:
    """The layout prior's Transformer over ``max_objects`` box slots. It reads the caption's scene graph,
    as sg2im does (Johnson et al. 2018): each slot's phrase embedding (the frozen CLIP's, ``embed_dim``)
    and the relation between slot 0 and slot 1, one of ``num_relations`` (id 0: none), as learned
    subject / object role embeddings. Not the caption's CLIP token states: they barely tell "left" from
    "right" (an MLP on their mean explains 3% of the variance of where the first object is, which the
    relation alone explains 39% of; issue 21)."""

    max_objects: int = 2
    width: int = 128
    depth: int = 3
    heads: int = 4
    num_relations: int = 4
    embed_dim: Optional[int] = None

    def __post_init__(self) -> None:
        check_range("layout", "max_objects", self.max_objects, 2, 64)
        check_range("layout", "width", self.width, 1, 8192)
        check_range("layout", "depth", self.depth, 1, 64)
        check_range("layout", "heads", self.heads, 1, 256)
        check_range("layout", "num_relations", self.num_relations, 1, 4096)
        if self.width % self.heads:
            raise ValueError(f"layout.width: {self.width} is not divisible by heads {self.heads}")


class LayoutPrior(nn.Module):
    """Denoiser of K boxes (B, K, 4) given t, the slots' phrase embeddings and the relation.

    Tokens: one per slot, noisy box + phrase embedding + slot index + timestep, plus on slot 0 the
    relation's subject embedding and on slot 1 its object embedding (relation id 0, none, adds
    nothing); every valid slot attends to every other, so each box is placed knowing the other's.
    Output: the diffusion target per slot (B, K, 4).
    """

    def __init__(self, config: LayoutPriorConfig) -> None:
        super().__init__()
        c = self.config = config
        if c.embed_dim is None:
            raise ValueError("LayoutPriorConfig: embed_dim must be set (from the CLIP)")
        w = c.width
        self.box_in = Linear(4, w)
        self.phrase_in = Linear(c.embed_dim, w)
        self.slot = nn.Parameter(torch.randn(c.max_objects, w) * 0.02)
        self.time_embed = nn.Sequential(Linear(w, w), nn.SiLU(), Linear(w, w))
        self.relation_roles = nn.Parameter(torch.randn(2, c.num_relations + 1, w) * 0.5)  # (subject/object, id, w)
        with torch.no_grad():
            self.relation_roles[:, 0] = 0.0  # id 0: no relation
        self.transformer = TransformerStack(w, c.depth, c.heads, 4.0, 0.0, False, causal=False)
        self.out = Linear(w, 4)

    def forward(self, x: Tensor, t: Tensor, *, phrase_embeds: Tensor, slot_mask: Tensor, relation: Tensor) -> Tensor:
        k = x.shape[1]
        if k != self.config.max_objects:
            raise ValueError(f"layout prior: {k} slots, the network has max_objects {self.config.max_objects}")
        if relation.numel() and (int(relation.min()) < 0 or int(relation.max()) > self.config.num_relations):
            raise ValueError(f"layout prior: relation ids must lie in [0, {self.config.num_relations}]")
        time = self.time_embed(timestep_embedding(t, self.config.width).to(x.dtype))  # (B, w)
        phrases = phrase_embeds * math.sqrt(phrase_embeds.shape[-1])
        h = self.box_in(x) + self.phrase_in(phrases.to(x.dtype)) + self.slot + time[:, None]  # (B, K, w)
        roles = self.relation_roles[:, relation.long()].transpose(0, 1).to(h.dtype)  # (B, 2, w)
        h = h + torch.cat([roles, roles.new_zeros(h.shape[0], k - 2, h.shape[-1])], dim=1)
        return self.out(self.transformer(h, slot_mask.bool()))  # (B, K, 4)
