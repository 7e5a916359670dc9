"""Classifier-free guidance and x̂_0 clipping.

- Classifier-free guidance (Ho & Salimans 2022; GLIDE / unCLIP):
  ε̂ = ε(x_t, ∅) + s·(ε(x_t, c) − ε(x_t, ∅)).
  For X0 and V objectives we guide the raw prediction channels directly, with no conversion.
  This is exactly guidance on ε: at fixed (x_t, t), ε is an affine function of x̂_0
  (ε = (x_t − √ᾱ x̂_0)/√(1 − ᾱ)) and of v (ε = √(1 − ᾱ) x_t + √ᾱ v), and the guidance weights
  (1 − s) + s sum to 1, so convert → guide → convert back gives the same result. Guiding the
  raw output also keeps the wrapper independent of the schedule tables and of respacing.
  Clipping of x̂_0 happens after guidance, in ``GaussianDiffusion.p_mean_variance``.
- Per-condition ("nested") guidance for a model with several droppable conditions c_1..c_K
  (InstructPix2Pix, Brooks et al. 2023 eq. 3, for K = 2): with ε_k the prediction given the first
  k conditions and the rest dropped, ε̂ = ε_0 + Σ_k s_k·(ε_k − ε_{k−1}). Equal scales telescope to
  classifier-free guidance on all conditions jointly; the unCLIP decoder's order is (z_i, caption),
  so s_2 weighs what the caption adds to the image embedding (binding, relations), and a layout
  decoder's s_3 what its plan adds (`SamplingConfig.text_guidance_scale`, `layout_guidance_scale`).
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
    guided; the variance channels come from the conditional half. This is nested guidance with
    all the drop keys as one condition.
    """
    return _nested(model_fn, [scale], [tuple(drop_keys)], variance)


def nested_guidance(
    model_fn: ModelFn, scales: Sequence[float], *, drop_keys: Sequence[str],
    variance: VarianceType = VarianceType.FIXED_SMALL,
) -> ModelFn:
    """Wrap ``model_fn(x, t, **kw)`` so it returns ε_0 + Σ_k scales[k-1]·(ε_k − ε_{k−1}).

    ``drop_keys`` (K boolean drop masks, in the order the conditions are added) and ``scales`` (K)
    pair up; ε_k keeps the first k conditions as given (a missing mask: kept) and drops the rest.
    One batched forward pass runs over the K + 1 settings [ε_K; ...; ε_0]. With learned variance
    only the first C channels are guided; the variance channels come from ε_K.
    """
    if len(scales) != len(drop_keys) or not drop_keys:
        raise ValueError(f"nested guidance: {len(scales)} scales for {len(drop_keys)} drop keys")
    return _nested(model_fn, scales, [(key,) for key in drop_keys], variance)


def _nested(model_fn: ModelFn, scales: Sequence[float], groups: Sequence[tuple[str, ...]],
            variance: VarianceType) -> ModelFn:
    """ε_0 + Σ_k scales[k-1]·(ε_k − ε_{k−1}), where condition k is the group of drop masks
    ``groups[k-1]`` and ε_k keeps the first k groups as given; one pass over [ε_K; ...; ε_0]."""
    dropped = {key for group in groups for key in group}

    def guided(x: Tensor, t: Tensor, **model_kwargs: Any) -> Tensor:
        batch, n = x.shape[0], len(groups) + 1
        kwargs = {k: _repeat(v, batch, n) for k, v in model_kwargs.items() if k not in dropped}
        ones = torch.ones(batch, dtype=torch.bool, device=x.device)
        for g, group in enumerate(groups):
            for key in group:
                given = model_kwargs.get(key)
                kept = ones.logical_not() if given is None else given.to(torch.bool)
                # setting j (j = K..0) keeps the first j groups: group g is kept iff g < j
                kwargs[key] = torch.cat([kept if g < j else ones for j in range(n - 1, -1, -1)])
        out = model_fn(_repeat(x, batch, n), _repeat(t, batch, n), **kwargs)
        eps = list(reversed(out.chunk(n)))  # eps[k] = ε_k
        var = None
        if variance is VarianceType.LEARNED_RANGE:
            var = eps[-1].chunk(2, dim=1)[1]
            eps = [e.chunk(2, dim=1)[0] for e in eps]
        guided_eps = eps[0]
        for k, scale in enumerate(scales, start=1):
            guided_eps = guided_eps + scale * (eps[k] - eps[k - 1])
        return guided_eps if var is None else torch.cat([guided_eps, var], dim=1)

    return guided


def _repeat(value: Any, batch: int, n: int) -> Any:
    """n stacked copies along dim 0 of tensors with a batch dimension; anything else unchanged."""
    if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value.repeat(n, *(1,) * (value.ndim - 1))
    return value


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
