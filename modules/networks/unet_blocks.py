"""Building blocks of the GLIDE / ADM U-Net (Dhariwal & Nichol 2021, Nichol et al. 2021).

Every block takes ``(x, cond)`` where ``cond`` is a :class:`Conditioning`, so a U-Net stage is a
plain sequence of blocks and gradient checkpointing can wrap any of them uniformly.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from modules.networks.attention import attention
from modules.networks.linear import Conv1x1, Linear


class Conditioning(NamedTuple):
    """What every block may read besides its input feature map."""

    emb: Tensor  # (B, E) timestep (+ conditioning) embedding, SiLU already applied
    context: Optional[Tensor] = None  # (B, S, D_ctx) tokens the attention layers also attend to
    context_mask: Optional[Tensor] = None  # (B, S) bool, True = visible; None = all visible


class Resample(Enum):
    NONE = "none"
    UP = "up"
    DOWN = "down"


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017, §3.5).

    ``t``: (B,) timestep indices (0..999 for T = 1000). Returns (B, dim) float32: [cos | sin].
    """
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(max_period) / half)
    )  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))  # (B, dim)


def position_embedding_2d(height: int, width: int, dim: int, device: torch.device | None = None,
                          max_period: float = 10000.0) -> Tensor:
    """Fixed 2-D sinusoidal position embedding (H·W, dim), rows in raster order: the first half of
    the channels embeds the row index, the second half the column index, each as [cos | sin] of
    ``timestep_embedding`` (the ViT / MAE 2-D sin-cos form; Dosovitskiy et al. 2021, He et al. 2022).
    ``dim`` must be divisible by 4."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs dim divisible by 4, got {dim}")
    rows = torch.arange(height, device=device).repeat_interleave(width)  # (H·W,) raster order
    cols = torch.arange(width, device=device).repeat(height)
    return torch.cat([timestep_embedding(rows, dim // 2, max_period), timestep_embedding(cols, dim // 2, max_period)], dim=1)


def group_norm(channels: int, num_groups: int, affine: bool = True) -> nn.GroupNorm:
    """GroupNorm whose group count divides ``channels`` (gcd), so tiny widths work too."""
    return nn.GroupNorm(math.gcd(num_groups, channels), channels, affine=affine)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter: a residual branch starts as the identity (ADM, §3 of the paper)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last when ``x`` is laid out that way (and not also plain contiguous)."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _resample(x: Tensor, mode: Resample) -> Tensor:
    if mode is Resample.UP:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    if mode is Resample.DOWN:
        return F.avg_pool2d(x, kernel_size=2)
    return x


def _modulate(y: Tensor, scale: Optional[Tensor], shift: Optional[Tensor]) -> Tensor:
    """y·(1 + s) + b, or y without a modulation."""
    return y if scale is None else torch.addcmul(shift, y, 1.0 + scale)


class _RecomputedNormSiLU(torch.autograd.Function):
    """SiLU(GroupNorm(x)·(1 + s) + b) that keeps only x and the group statistics for backward and
    recomputes the normalised map there (one GroupNorm forward and two elementwise kernels): the
    same values and gradients as autograd's graph without its two activation-sized intermediates,
    and without `torch.utils.checkpoint`'s replay machinery."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], scale: Optional[Tensor],
                shift: Optional[Tensor], groups: int, eps: float) -> Tensor:
        N, C = x.shape[:2]
        ctx.norm_args = (N, C, x.numel() // max(N * C, 1), groups, eps)  # native_group_norm's N, C, HxW, group, eps
        y, mean, rstd = torch.native_group_norm(x, weight, bias, *ctx.norm_args)
        ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
        return F.silu(_modulate(y, scale, shift))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
        y = torch.native_group_norm(x, weight, bias, *ctx.norm_args)[0]
        z = _modulate(y, scale, shift)
        grad_z = torch.ops.aten.silu_backward(grad, z)
        grad_scale = grad_shift = None
        if scale is not None:
            grad_y = grad_z * (1.0 + scale)
            grad_scale = (grad_z * y).sum_to_size(scale.shape) if ctx.needs_input_grad[3] else None
            grad_shift = grad_z.sum_to_size(shift.shape) if ctx.needs_input_grad[4] else None
        else:
            grad_y = grad_z
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2]]
        grad_x, grad_w, grad_b = torch.ops.aten.native_group_norm_backward(
            grad_y.contiguous(memory_format=memory_format_of(x)), x, mean, rstd, weight, *ctx.norm_args[:4], mask)
        return grad_x, grad_w, grad_b, grad_scale, grad_shift, None, None


def norm_modulate_silu(norm: nn.GroupNorm, h: Tensor, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                       recompute: bool = False) -> Tensor:
    """SiLU(GroupNorm(h)·(1 + s) + b): ADM's adaptive group norm (§3) and the activation after it
    (without s, b: SiLU(GroupNorm(h))). ``recompute`` keeps only h for backward (less memory);
    under autocast, whose GroupNorm precision differs by device, through `checkpoint` instead."""
    if recompute and torch.is_grad_enabled():
        if torch.is_autocast_enabled(h.device.type):
            return checkpoint(norm_modulate_silu, norm, h, scale, shift, use_reentrant=False)
        return _RecomputedNormSiLU.apply(h, norm.weight, norm.bias, scale, shift, norm.num_groups, norm.eps)
    return F.silu(_modulate(norm(h), scale, shift))


class ResBlock(nn.Module):
    """Residual block with adaptive group norm (ADM §3): GroupNorm(h)·(1 + s) + b, where
    (s, b) = Linear(emb).

    ``resample`` makes it a BigGAN-style up/down-sampling block (``resblock_updown``). The last
    conv is zero-initialised so the block starts as its skip connection. ``recompute_norms``
    recomputes both norm + SiLU steps in backward instead of keeping their outputs (less memory).
    """

    def __init__(
        self,
        channels: int,
        out_channels: int,
        emb_dim: int,
        *,
        dropout: float = 0.0,
        num_groups: int = 32,
        resample: Resample = Resample.NONE,
        recompute_norms: bool = False,
    ) -> None:
        super().__init__()
        self.resample, self.recompute_norms = resample, recompute_norms
        self.in_norm = group_norm(channels, num_groups)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.emb_proj = Linear(emb_dim, 2 * out_channels)  # -> (scale, shift)
        # The affine part of this norm is carried by the bias of emb_proj, so none here.
        self.out_norm = group_norm(out_channels, num_groups, affine=False)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = (
            nn.Identity() if channels == out_channels else Conv1x1(channels, out_channels)
        )

    def forward(self, x: Tensor, cond: Conditioning) -> Tensor:
        h = norm_modulate_silu(self.in_norm, x, recompute=self.recompute_norms)  # (B, C, H, W)
        h = self.in_conv(_resample(h, self.resample))  # (B, C_out, H', W')
        x = _resample(x, self.resample)
        scale, shift = self.emb_proj(cond.emb)[..., None, None].chunk(2, dim=1)  # (B, C_out, 1, 1)
        h = norm_modulate_silu(self.out_norm, h, scale, shift, recompute=self.recompute_norms)
        h = self.out_conv(self.dropout(h))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H·W positions, GLIDE style.

    With ``context_dim`` set, each layer projects the context tokens to its own keys/values and
    concatenates them in front of the spatial keys/values, so every position attends to
    [context tokens, all positions]. Spatial keys are always visible, hence no softmax row is
    ever fully masked. Heads have ``num_head_channels`` channels each (at least one head).

    ``self_attention=False`` makes it a cross-attention block: positions attend to the context
    tokens only (Stable Diffusion's and Imagen's text cross-attention), which costs H·W·S instead
    of (H·W)² and so can run at the high resolutions where the objects' shapes are drawn. The
    context always has a visible token (the image tokens, or the null caption), so no row is
    fully masked.

    ``positions=True`` adds a fixed 2-D sin-cos position embedding (``position_embedding_2d``) to
    the normalised spatial tokens before q/k/v, as a ViT does to its patches. Without it, GLIDE's
    attention is equivariant to any permutation of the positions: a position cannot tell whether
    another one lies to its left or above it, which is what a prompted relation asks for.
    """

    def __init__(
        self,
        channels: int,
        *,
        num_head_channels: int = 64,
        num_groups: int = 32,
        context_dim: Optional[int] = None,
        self_attention: bool = True,
        positions: bool = False,
    ) -> None:
        super().__init__()
        if positions and channels % 4:
            raise ValueError(f"a 2-D position embedding needs channels divisible by 4, got {channels}")
        self.positions = positions
        self.num_heads = max(1, channels // num_head_channels)
        if channels % self.num_heads:
            raise ValueError(f"{channels} channels do not split into {self.num_heads} heads")
        if not (self_attention or context_dim):
            raise ValueError("a cross-attention block (self_attention=False) needs a context_dim")
        self.self_attention = self_attention
        self.norm = group_norm(channels, num_groups)
        self.qkv = Linear(channels, (3 if self_attention else 1) * channels)  # q, k, v (or q only)
        self.context_kv = Linear(context_dim, 2 * channels) if context_dim else None
        self.proj = zero_module(Linear(channels, channels))

    def forward(self, x: Tensor, cond: Conditioning) -> Tensor:
        B, C, H, W = x.shape
        T, nh = H * W, self.num_heads
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(B, T, C)  # (B, T, C); a view if NHWC
        if self.positions:
            tokens = tokens + position_embedding_2d(H, W, C, x.device).to(tokens.dtype)
        if self.self_attention:
            q, k, v = self.qkv(tokens).view(B, T, 3, nh, C // nh).permute(2, 0, 3, 1, 4)  # each (B, nh, T, d)
        else:
            if cond.context is None:
                raise ValueError("a cross-attention block needs the context tokens")
            q, k, v = self.qkv(tokens).view(B, T, nh, C // nh).transpose(1, 2), None, None  # q (B, nh, T, d)
        mask = None
        if self.context_kv is not None and cond.context is not None:
            S, spatial = cond.context.shape[1], T if self.self_attention else 0
            ck, cv = self.context_kv(cond.context).view(B, S, 2, nh, C // nh).permute(2, 0, 3, 1, 4)
            k = ck if k is None else torch.cat([ck, k], dim=2)  # (B, nh, S [+ T], d)
            v = cv if v is None else torch.cat([cv, v], dim=2)
            if cond.context_mask is not None:
                mask = F.pad(cond.context_mask, (0, spatial), value=True)[:, None, None, :]  # (B,1,1,S [+ T])
        out = attention(q, k, v, attn_mask=mask)  # (B, nh, T, d)
        out = self.proj(out.transpose(1, 2).reshape(B, T, C))  # (B, T, C)
        out = out.view(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W), channels_last strides
        return x + out.contiguous(memory_format=memory_format_of(x))


class Downsample(nn.Module):
    """Stride-2 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, cond: Conditioning) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 convolution (ADM).

    ``conv_first`` swaps the two, as Imagen's Efficient U-Net does (Saharia et al. 2022, App. B.1):
    the same convolution runs at the low resolution, a quarter of the FLOPs, same parameters.
    """

    def __init__(self, channels: int, conv_first: bool = False) -> None:
        super().__init__()
        self.conv_first = conv_first
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, cond: Conditioning) -> Tensor:
        if self.conv_first:
            return F.interpolate(self.conv(x), scale_factor=2.0, mode="nearest")
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class CondSequential(nn.Sequential):
    """A U-Net stage: blocks applied in order, each given the same :class:`Conditioning`."""

    def forward(self, x: Tensor, cond: Conditioning) -> Tensor:  # type: ignore[override]
        for block in self:
            x = block(x, cond)
        return x
