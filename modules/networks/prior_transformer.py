"""The unCLIP diffusion prior: a decoder-only Transformer that denoises CLIP image embeddings.

Ramesh et al. 2022 §2.2: "a decoder-only Transformer with a causal attention mask on a sequence
consisting of, in order: the encoded text, the CLIP text embedding, an embedding for the diffusion
timestep, the noised CLIP image embedding, and a final embedding whose output from the Transformer
is used to predict the unnoised CLIP image embedding". Sequence here (N = L + 4)::

    [caption tokens (L, padding masked), z_t, time, x_t = noised z_i, query] -> output at query

Caption positions use learned positional embeddings; the four trailing tokens have learned role
embeddings, so the result does not depend on how much padding the batch carries (the caller trims
tokens to the batch's longest caption: padding is never paid for beyond that). Classifier-free
guidance: a dropped sample (``drop_text``) has every caption token masked out and z_t replaced by a
learned null embedding. Blocks are pre-norm (GPT-2) with SDPA attention; the mask is causal and
hides invalid keys, every position always seeing itself so no softmax row is empty.

Two exact savings (profiled: the prior step is all Linear layers, so cost is proportional to the
positions computed). Only the query's output is read, so the last block computes its keys/values
for every position but everything else for the query alone (~1/depth of the work). And the caption
positions come first under a causal mask, so their keys/values never depend on x_t or t: without
gradients (sampling) they are computed once and reused while the captions, drop mask and weights
stay the same (checked by value each call), so a sampling step runs the 4 trailing positions only.
Being all GEMMs, it also gains most from running its linear layers in oneDNN on CPUs where MKL's
sgemm is slow (`modules/networks/linear.py`: 1.8x per training step on the AMD EPYC measured).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from modules.core.hparams import check_ranges
from modules.networks.linear import Linear
from modules.networks.transformer import KeysValues, TransformerStack
from modules.networks.unet_blocks import timestep_embedding


# Sizes of the priors' transformers (PriorConfig, ARPriorConfig), bounded where they enter.
TRANSFORMER_RANGES: dict[str, tuple[float, float]] = {
    "embed_dim": (1, 65536), "text_width": (1, 65536), "width": (1, 65536), "depth": (1, 512), "heads": (1, 1024),
    "mlp_ratio": (0.01, 64.0), "dropout": (0.0, 1.0), "max_text_len": (1, 4096),
}


@dataclass
class PriorConfig:
    """Prior Transformer size. ``embed_dim`` / ``text_width`` come from the CLIP model name.

    Parameters ≈ 12·width²·depth: width 2048 × depth 20 ≈ 1.0B (the paper's 1B prior; also the
    layout of the public Karlo/diffusers port: 32 heads × 64), depth 24 would give ≈ 1.2B.
    """

    embed_dim: int = 768  # D: CLIP embedding width (z_i, z_t)
    text_width: int = 768  # W: width of the CLIP text-token encodings
    width: int = 2048
    depth: int = 20
    heads: int = 32
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    max_text_len: int = 77
    use_checkpoint: bool = False

    def __post_init__(self) -> None:
        check_ranges("prior", self, TRANSFORMER_RANGES)
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")


class CaptionPrefix(nn.Module):
    """Projects caption token encodings (B, L, W) and z_t (B, D) to width; learned null z_t."""

    def __init__(self, text_width: int, embed_dim: int, width: int, max_text_len: int) -> None:
        super().__init__()
        self.tokens = Linear(text_width, width)
        self.pos = nn.Parameter(torch.randn(max_text_len, width) * 0.02)
        self.text_embed = Linear(embed_dim, width)
        self.null_text_embed = nn.Parameter(torch.randn(width) * 0.02)

    def forward(self, text_embed: Tensor, text_tokens: Tensor, text_mask: Tensor, drop: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(tokens (B, L, w), their validity (B, L), z_t token (B, w)); dropped rows see no caption."""
        length = text_tokens.shape[1]
        if length > self.pos.shape[0]:
            raise ValueError(f"caption has {length} tokens, the prior was built for {self.pos.shape[0]}")
        tokens = self.tokens(text_tokens) + self.pos[:length]  # (B, L, w)
        valid = text_mask.bool() & ~drop[:, None]  # (B, L)
        return tokens, valid, self.text_embed_token(text_embed, drop)

    def text_embed_token(self, text_embed: Tensor, drop: Tensor) -> Tensor:
        """z_t (B, D) -> (B, w); the learned null where dropped."""
        zt = self.text_embed(text_embed)
        return torch.where(drop[:, None], self.null_text_embed.to(zt.dtype), zt)


class PriorTransformer(nn.Module):
    """f(x_t, t, y) -> x̂_0: predicts the (scaled) unnoised image embedding, shape (B, D)."""

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        c = self.config = config
        self.prefix = CaptionPrefix(c.text_width, c.embed_dim, c.width, c.max_text_len)
        self.time_mlp = nn.Sequential(Linear(c.width, c.width), nn.SiLU(), Linear(c.width, c.width))
        self.x_proj = Linear(c.embed_dim, c.width)
        self.query = nn.Parameter(torch.randn(c.width) * 0.02)
        self.roles = nn.Parameter(torch.randn(4, c.width) * 0.02)  # [z_t, time, x_t, query]
        self.transformer = TransformerStack(c.width, c.depth, c.heads, c.mlp_ratio, c.dropout, c.use_checkpoint)
        self.out = Linear(c.width, c.embed_dim)
        self._prefix_memo = PrefixMemo()

    def forward(
        self,
        x_t: Tensor,  # (B, D) noised, scaled z_i
        t: Tensor,  # (B,) original timesteps
        *,
        text_embed: Tensor,  # (B, D) z_t
        text_tokens: Tensor,  # (B, L, W) caption token encodings
        text_mask: Tensor,  # (B, L) bool, True = real token
        drop_text: Tensor | None = None,  # (B,) bool, True = unconditional (learned null)
    ) -> Tensor:
        b = x_t.shape[0]
        drop = torch.zeros(b, dtype=torch.bool, device=x_t.device) if drop_text is None else drop_text.bool()
        ones = torch.ones(b, 4, dtype=torch.bool, device=x_t.device)
        if torch.is_grad_enabled() or (self.training and self.config.dropout > 0):  # no memo under fresh dropout
            tokens, valid, zt = self.prefix(text_embed, text_tokens, text_mask, drop)
            h = torch.cat([tokens, self._tail(x_t, t, zt)], dim=1)  # (B, L + 4, w)
            h = self.transformer(h, torch.cat([valid, ones], dim=1), queries=1)  # (B, 1, w)
        else:  # caption keys/values from the memo: only the 4 trailing positions run
            past, valid = self._prefix_memo.get(self, text_tokens, text_mask, drop)
            tail = self._tail(x_t, t, self.prefix.text_embed_token(text_embed, drop))  # (B, 4, w)
            h = self.transformer(tail, torch.cat([valid, ones], dim=1), queries=1, past=past)  # (B, 1, w)
        return self.out(h[:, -1])  # (B, D)

    def _tail(self, x_t: Tensor, t: Tensor, zt: Tensor) -> Tensor:
        """The positions after the caption: [z_t, time, x_t, query] + role embeddings, (B, 4, w)."""
        time = self.time_mlp(timestep_embedding(t, self.config.width).to(zt.dtype))  # (B, w)
        query = self.query.to(zt.dtype).expand(x_t.shape[0], -1)
        return torch.stack([zt, time, self.x_proj(x_t), query], dim=1) + self.roles

    def clear_caption_cache(self) -> None:
        """Forget memoised caption keys/values (needed after writes through `.data`, see `PrefixMemo`)."""
        self._prefix_memo = PrefixMemo()

    def caption_keys_values(self, text_tokens: Tensor, text_mask: Tensor, drop: Tensor) -> tuple[list[KeysValues], Tensor]:
        """Per-block caption keys/values and the caption's key validity (B, L)."""
        if text_tokens.shape[1] > self.prefix.pos.shape[0]:
            raise ValueError(f"caption has {text_tokens.shape[1]} tokens, the prior was built for {self.prefix.pos.shape[0]}")
        tokens = self.prefix.tokens(text_tokens) + self.prefix.pos[: text_tokens.shape[1]]  # (B, L, w)
        valid = text_mask.bool() & ~drop[:, None]
        return self.transformer.prefix_keys_values(tokens, valid), valid


class PrefixMemo:
    """The last caption keys/values a `PriorTransformer` computed without gradients.

    Reused only when captions, mask and drop mask are equal by value, and weights (storage and
    in-place version), autocast state and device are unchanged; otherwise recomputed. Writes
    through ``param.data`` (Lightning's EMA swap) change neither storage nor version: call
    `PriorTransformer.clear_caption_cache` after them (`PriorModule` does so per sampling call
    and validation step).
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.inputs: tuple[Tensor, Tensor, Tensor] | None = None
        self.value: tuple[list[KeysValues], Tensor] | None = None

    def get(self, net: PriorTransformer, text_tokens: Tensor, text_mask: Tensor, drop: Tensor) -> tuple[list[KeysValues], Tensor]:
        device = text_tokens.device.type
        key = (tuple((p.data_ptr(), p._version) for p in net.parameters()), torch.is_autocast_enabled(device),
               torch.get_autocast_dtype(device), text_tokens.device, text_tokens.dtype)
        inputs = (text_tokens, text_mask.bool(), drop)
        if self.value is None or key != self.key or not _all_equal(inputs, self.inputs):
            self.key, self.inputs, self.value = key, inputs, net.caption_keys_values(*inputs)
        return self.value


def _all_equal(a: tuple[Tensor, ...], b: tuple[Tensor, ...] | None) -> bool:
    return b is not None and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
