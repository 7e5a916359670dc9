"""EMA of the weights with a warm-up of the decay, for runs of any length.

Lightning's `EMAWeightAveraging` applies a fixed decay from the first step:
W_n = β W_{n-1} + (1 - β) θ_n, with W_1 = θ_1, the weights after one optimizer step (torch's
`get_ema_avg_fn`). The weight left on those barely trained weights after n steps is β^(n-1): with
the demo's β = 0.995 that is 0.995^399 = 13.5% of the decoder the pipeline samples from after its
400 steps, and the rest is an average whose window (1 / (1 - β) = 200 steps) is half the run.

`WarmupEMA` uses β_n = min(β, (1 + n) / (10 + n)), the warm-up of TensorFlow's
`ExponentialMovingAverage(num_updates=n)` (also diffusers' `EMAModel`): early on the average follows
the weights closely (β_1 = 0.18, β_10 = 0.58), the window grows with the run (about n / 9 steps,
so the average covers the last ~10% of it), and after ~2000 steps (β = 0.995) it is the plain EMA.
Everything else (checkpointing the averaged and current weights, resuming, swapping the average in
for validation and at the end of training) is Lightning's.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import Tensor


def warmup_decay(decay: float, num_updates: int) -> float:
    """β_n = min(β, (1 + n) / (10 + n)) for the n-th update of the average (n ≥ 1)."""
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates))


def warmup_ema_multi_avg_fn(decay: float):
    """`AveragedModel.multi_avg_fn`: W <- β_n W + (1 - β_n) θ over all tensors at once (foreach lerp)."""

    def update(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor | int) -> None:
        if not averaged[0].is_floating_point():  # AveragedModel groups by dtype: integer buffers are copied
            torch._foreach_copy_(averaged, current)
            return
        beta = warmup_decay(decay, int(num_averaged))
        torch._foreach_lerp_(averaged, current, 1.0 - beta)

    return update


class WarmupEMA(EMAWeightAveraging):
    """`EMAWeightAveraging` whose decay warms up as min(decay, (1 + n) / (10 + n)).

    Args:
        decay: the decay the warm-up reaches (the paper's 0.9999 at scale; 0.995 in the demo).
        Other arguments are `EMAWeightAveraging`'s.
    """

    def __init__(
        self,
        device: Optional[Union[torch.device, str, int]] = None,
        use_buffers: bool = True,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: Optional[int] = None,
        update_starting_at_epoch: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"WarmupEMA.decay must be in [0, 1), got {decay}")
        super().__init__(device, use_buffers, decay, update_every_n_steps, update_starting_at_step,
                         update_starting_at_epoch, **kwargs)
        self._kwargs["avg_fn"] = None
        self._kwargs["multi_avg_fn"] = warmup_ema_multi_avg_fn(decay)
