"""Pre-norm (GPT-2) Transformer blocks shared by the priors and the decoder's caption encoder.

`TransformerStack` runs causally (the priors, Ramesh et al. 2022 §2.2) or bidirectionally (the
decoder's GLIDE-style caption encoder, Nichol et al. 2021 §2.3); either way invalid (padding) keys
are hidden and every position sees itself, so no softmax row is empty. Attention goes through
`modules/networks/attention.py` (SDPA, or bf16 batched GEMMs for short CPU sequences).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from modules.networks.attention import attention
from modules.networks.linear import Linear, linear


def causal_key_mask(key_valid: Tensor, causal: bool = True) -> Tensor:
    """Attention mask (B, 1, N, N), True = attend: key j ≤ query i (any j if not ``causal``) and
    valid, or j = i.

    ``key_valid`` (B, N) bool. The diagonal keeps every row non-empty (an all-masked softmax row is
    NaN in SDPA, and NaN values leak through zero weights); rows of invalid positions compute
    garbage that no valid position reads.
    """
    n = key_valid.shape[1]
    order = torch.ones(n, n, dtype=torch.bool, device=key_valid.device)  # (N, N)
    order = order.tril() if causal else order
    eye = torch.eye(n, dtype=torch.bool, device=key_valid.device)
    return ((order & key_valid[:, None, :]) | eye)[:, None]  # (B, 1, N, N)


KeysValues = tuple[Tensor, Tensor]  # (k, v), each (B, H, P, Dh)


class SelfAttention(nn.Module):
    """Multi-head self-attention through SDPA (`modules/networks/attention.py`).

    ``past``: keys/values of earlier positions, prepended to this input's (the mask then covers
    P + N keys). ``queries``: compute outputs for the last ``queries`` positions only (their
    mask rows only).
    """

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = Linear(width, 3 * width)
        self.proj = Linear(width, width)

    def _split(self, x: Tensor) -> Tensor:
        b, n, w = x.shape
        return x.view(b, n, self.heads, w // self.heads).transpose(1, 2)  # (B, H, N, Dh)

    def keys_values(self, x: Tensor) -> KeysValues:
        w = x.shape[-1]
        k, v = linear(x, self.qkv.weight[w:], self.qkv.bias[w:]).chunk(2, dim=-1)  # (B, N, w) each
        return self._split(k), self._split(v)

    def forward(self, x: Tensor, mask: Tensor, past: Optional[KeysValues] = None, queries: Optional[int] = None) -> Tensor:
        b, n, w = x.shape
        if queries is None and past is None:
            q, k, v = self.qkv(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, N, Dh)
        else:
            k, v = self.keys_values(x)
            x_q = x if queries is None else x[:, n - queries:]
            q = self._split(linear(x_q, self.qkv.weight[:w], self.qkv.bias[:w]))  # (B, H, Q, Dh)
            if past is not None:
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, H, P + N, Dh)
        p = self.dropout if self.training else 0.0
        y = attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, Q, Dh)
        return self.proj(y.transpose(1, 2).reshape(b, -1, w))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.mlp = nn.Sequential(Linear(width, hidden), nn.GELU(), Linear(hidden, width), nn.Dropout(dropout))

    def forward(self, x: Tensor, mask: Tensor, past: Optional[KeysValues] = None, queries: Optional[int] = None) -> Tensor:
        """x (B, N, w) -> (B, N or queries, w); see `SelfAttention` for ``past`` / ``queries``."""
        h = self.attn(self.ln1(x), mask, past, queries)
        x = (x if queries is None else x[:, x.shape[1] - queries:]) + h
        return x + self.mlp(self.ln2(x))


class TransformerStack(nn.Module):
    """``depth`` blocks and a final LayerNorm, GPT-2 initialisation (residual outputs / √(2·depth)).
    ``causal=False``: every position attends to every valid one (an encoder, as GLIDE's text
    transformer); `prefix_keys_values` and ``past`` are causal-only."""

    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float, dropout: float, use_checkpoint: bool,
                 causal: bool = True) -> None:
        super().__init__()
        self.causal = causal
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.use_checkpoint = use_checkpoint
        for name, p in self.named_parameters():
            if p.ndim == 2:
                std = 0.02 / math.sqrt(2 * depth) if name.endswith(("attn.proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, x: Tensor, key_valid: Tensor, queries: Optional[int] = None,
                past: Optional[list[KeysValues]] = None) -> Tensor:
        """x (B, N, w) -> (B, N, w), or the last ``queries`` positions only (the last block then
        computes nothing else for the others). ``past``: per-block keys/values of P earlier
        positions (see `prefix_keys_values`); then ``key_valid`` (B, P + N) covers them too."""
        n = x.shape[1]
        if past is not None and not self.causal:
            raise ValueError("past keys/values need a causal stack")
        mask = causal_key_mask(key_valid, self.causal)[:, :, -n:]  # (B, 1, N, P + N)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            kv = past[i] if past is not None else None
            q = queries if i == last else None
            rows = mask if q is None else mask[:, :, -q:]
            if self.use_checkpoint and self.training:
                x = checkpoint(block, x, rows, kv, q, use_reentrant=False)
            else:
                x = block(x, rows, kv, q)
        return self.norm(x)

    def prefix_keys_values(self, x: Tensor, key_valid: Tensor) -> list[KeysValues]:
        """Per-block keys/values of a prefix x (B, P, w) that attends causally to itself only."""
        mask = causal_key_mask(key_valid)
        out: list[KeysValues] = []
        for i, block in enumerate(self.blocks):
            out.append(block.attn.keys_values(block.ln1(x)))
            if i < len(self.blocks) - 1:
                x = block(x, mask)
        return out
