"""Classifier-free guidance and x̂_0 clipping.

- Classifier-free guidance (Ho & Salimans 2022; GLIDE / unCLIP):
  ε̂ = ε(x_t, ∅) + s·(ε(x_t, c) − ε(x_t, ∅)).
  For X0 and V objectives we guide the raw prediction channels directly, with no conversion.
  This is exactly guidance on ε: at fixed (x_t, t), ε is an affine function of x̂_0
  (ε = (x_t − √ᾱ x̂_0)/√(1 − ᾱ)) and of v (ε = √(1 − ᾱ) x_t + √ᾱ v), and the guidance weights
  (1 − s) + s sum to 1, so convert → guide → convert back gives the same result. Guiding the
  raw output also keeps the wrapper independent of the schedule tables and of respacing.
  Clipping of x̂_0 happens after guidance, in ``GaussianDiffusion.p_mean_variance``.
- Static clipping of x̂_0 to [−1, 1] (DDPM's sampler) and dynamic thresholding (Imagen,
  Saharia et al. 2022 §2.3): s = max(1, p-th percentile of |x̂_0| per sample),
  x̂_0 ← clamp(x̂_0, −s, s)/s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .gaussian import ModelFn, VarianceType


def _double(value: Any, batch: int) -> Any:
    """[v; v] for tensors with a batch dimension; anything else passes through unchanged."""
    if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return torch.cat([value, value], dim=0)
    return value


def classifier_free_guidance(
    model_fn: ModelFn, scale: float, *, drop_keys: Sequence[str],
    variance: VarianceType = VarianceType.FIXED_SMALL,
) -> ModelFn:
    """Wrap ``model_fn(x, t, **kw)`` so it returns uncond + scale·(cond − uncond).

    One batched forward pass runs over [cond; uncond]: every tensor kwarg with a batch dimension
    is duplicated, and the boolean drop masks named in ``drop_keys`` (e.g.
    ``("drop_image", "drop_text")``, shape (B,), True = use the learned null embedding) are set
    all-True for the uncond half (the cond half keeps the given masks, or all-False if absent).
    With learned variance (2C output channels on dim 1) only the first C prediction channels are
    guided; the variance channels come from the conditional half.
    """

    def guided(x: Tensor, t: Tensor, **model_kwargs: Any) -> Tensor:
        batch = x.shape[0]
        kwargs = {k: _double(v, batch) for k, v in model_kwargs.items() if k not in drop_keys}
        for key in drop_keys:
            cond_mask = model_kwargs.get(key)
            if cond_mask is None:
                cond_mask = torch.zeros(batch, dtype=torch.bool, device=x.device)
            kwargs[key] = torch.cat([cond_mask.to(torch.bool), torch.ones_like(cond_mask, dtype=torch.bool)])
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), **kwargs)  # (2B, ...)
        cond, uncond = out[:batch], out[batch:]
        if variance is VarianceType.LEARNED_RANGE:
            cond_pred, cond_var = cond.chunk(2, dim=1)
            uncond_pred, _ = uncond.chunk(2, dim=1)
            return torch.cat([uncond_pred + scale * (cond_pred - uncond_pred), cond_var], dim=1)
        return uncond + scale * (cond - uncond)

    return guided


def static_clip(x0: Tensor) -> Tensor:
    """Clamp x̂_0 to the data range [−1, 1]."""
    return x0.clamp(-1.0, 1.0)


def dynamic_threshold(x0: Tensor, percentile: float = 0.995) -> Tensor:
    """Imagen dynamic thresholding (Saharia et al. 2022 §2.3), per sample.

    s = max(1, quantile(|x̂_0|, percentile)); returns clamp(x̂_0, −s, s)/s. Use
    ``functools.partial(dynamic_threshold, percentile=p)`` as ``clip=`` for another p.
    """
    flat = x0.reshape(x0.shape[0], -1).abs()  # (B, N)
    if flat.dtype not in (torch.float32, torch.float64):  # quantile needs float32/64
        flat = flat.float()
    s = torch.quantile(flat, percentile, dim=1).clamp(min=1.0).to(x0.dtype)  # (B,)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return torch.maximum(torch.minimum(x0, s), -s) / s
