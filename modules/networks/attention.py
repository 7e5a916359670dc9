"""Scaled dot-product attention, with short bf16 sequences on CPU computed by bf16 batched GEMMs.

torch's CPU flash-attention kernel is slow for short key sequences on one thread, in bf16 most of all,
backward included (forward + backward, causal mask): (64, 8 heads, 81 keys, 64) 105 ms in bf16, 53 in
fp32; bf16 wins over fp32 only from ~256 keys on. Below that its per-block small GEMMs cost more than
the work. So under bf16 on CPU, attention over at most `BMM_MAX_KEYS` keys runs as the math
formulation on whole batches: S = baddbmm(mask bias, q, kᵀ, alpha=1/√d) and O = bmm(softmax(S), v),
bf16 GEMMs with fp32 accumulation in oneDNN, the softmax computed in fp32 (bf16 in and out): the
numerics of autocast's bf16 attention. Measured (EPYC, one thread, fwd + bwd) against the fp32 flash
kernel on upcast inputs: (64, 8, 81, 64) causal 26.6 vs 52.8 ms; (64, 8, 40, 64) 10.3 vs 18.7;
(8, 3, 64, 64) 0.73 vs 1.28; (8, 8, 256, 64) causal 16.5 vs 44.4. The prior's 81-token sequence and
the U-Net's 8 px attention take this path; everything else calls `F.scaled_dot_product_attention`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

BMM_MAX_KEYS = 256


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p)``: q (B, H, Q, d), k and v
    (B, H, K, d) -> (B, H, Q, d) in q's dtype."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and k.shape[-2] <= BMM_MAX_KEYS:
        return _attention_bmm(q, k, v, attn_mask, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


def _attention_bmm(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], dropout_p: float) -> Tensor:
    """The math formulation over (batch·heads) matrices: q (..., Q, d), k (..., K, d), v (..., K, dv);
    a bool ``attn_mask`` (True = attend) or an additive float one, broadcastable to (..., Q, K)."""
    *batch, nq, d = q.shape
    nk, dv = k.shape[-2], v.shape[-1]
    q3, k3, v3 = q.reshape(-1, nq, d), k.reshape(-1, nk, d), v.reshape(-1, nk, dv)  # (B·H, ·, ·)
    if attn_mask is None:
        bias, beta = q3.new_zeros(1, 1, 1), 0.0
    else:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~attn_mask, float("-inf"))
        bias, beta = attn_mask.to(q.dtype).expand(*batch, nq, nk).reshape(-1, nq, nk), 1.0
    scores = torch.baddbmm(bias, q3, k3.transpose(1, 2), beta=beta, alpha=1 / math.sqrt(d))  # (B·H, Q, K)
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    return torch.bmm(weights, v3).view(*batch, nq, dv)
