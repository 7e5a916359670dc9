"""What the stages' `generate` methods take and return, so pipelines can type their stages.

Every stage samples with the same two keywords, a `SamplingConfig` (None: the stage's own) and a
`torch.Generator`, and returns one tensor:

| stage     | `cond`                                              | returns                                |
|-----------|-----------------------------------------------------|----------------------------------------|
| prior     | `text_embed` (B, D), `text_tokens` (B, L, W), `text_mask` (B, L) | z_i (B, D), unit norm      |
| decoder   | U-Net kwargs from `unet_kwargs` (z_i, caption tokens) | images (B, 3, S, S) in [-1, 1]       |
| upsampler | the low-resolution image (B, 3, s, s) in [-1, 1]    | images (B, 3, S, S) in [-1, 1]         |
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

C = TypeVar("C", contravariant=True)


@runtime_checkable
class GenerativeStage(Protocol[C]):
    """A trained stage that samples from its conditional distribution."""

    def generate(self, cond: C, /, *, sampling: Any = None, generator: torch.Generator | None = None) -> Tensor: ...


@runtime_checkable
class PriorStage(GenerativeStage[dict[str, Tensor]], Protocol):
    """P(z_i | y): best of `num_candidates` samples by dot product with z_t (paper §2.2)."""

    def generate(self, cond: dict[str, Tensor], /, *, sampling: Any = None, generator: torch.Generator | None = None,
                 num_candidates: int | None = None) -> Tensor: ...


@runtime_checkable
class DecoderStage(GenerativeStage[dict[str, Tensor]], Protocol):
    """P(x | z_i, y) at the base resolution; `x_T` fixes the starting noise (DDIM inversion)."""

    sampling: Any

    def unet_kwargs(self, cond: dict[str, Tensor], drop: bool = False) -> dict[str, Tensor]: ...

    def generate(self, cond: dict[str, Tensor], /, *, sampling: Any = None, generator: torch.Generator | None = None,
                 x_T: Tensor | None = None) -> Tensor: ...


@runtime_checkable
class UpsamplerStage(GenerativeStage[Tensor], Protocol):
    """P(x_high | x_low): a diffusion upsampler (paper §2, Table 3)."""
