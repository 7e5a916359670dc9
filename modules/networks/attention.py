"""Scaled dot-product attention, with short bf16 sequences on CPU computed in fp32.

torch's CPU flash-attention kernel is much slower in bf16 than in fp32 for short key sequences,
backward included (one thread, forward + backward, causal mask): (64, 8 heads, 81 keys, 64) 105 vs
64 ms; (64, 8, 40, 64) 56 vs 18 ms; (8, 3, 64, 64) 2.9 vs 1.2 ms; it breaks even at 256 keys and bf16
wins at 1024 (115 vs 158 ms). So under bf16 on CPU, attention over at most `FP32_MAX_KEYS` keys
upcasts q, k, v, runs in fp32 (more accurate as well) and casts the result back. The prior's 81-token
sequence and the U-Net's 8 px attention take this path; everything else calls
`F.scaled_dot_product_attention` unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

FP32_MAX_KEYS = 256


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p)``: q (B, H, Q, d), k and v
    (B, H, K, d) -> (B, H, Q, d) in q's dtype."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and k.shape[-2] <= FP32_MAX_KEYS:
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask, dropout_p=dropout_p)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
