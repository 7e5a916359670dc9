"""Training-time random draws keyed by (seed, step) and dealt to data-parallel ranks by row.

Every per-sample draw of a training step (timesteps t, noise ε, CFG drop masks, upsampler crops,
corruption levels and BSR parameters) goes through `uniform`, `normal` or `integers`. Inside a
training step (`begin_step` ... `end_step`, driven by `callbacks.checkpointing.RNGState`) the
k-th draw of step n is made for the GLOBAL batch, from a fresh generator seeded by
`key_seed("draws", seed, n, k)`, and each rank keeps its own rows:

    draw_k(n) = R_k(n)[r·B : (r+1)·B],   R_k(n) ~ generator(seed, n, k) with shape (W·B, ...)

for rank r of W ranks with local batch B (dimension 0 of the requested shape; a scalar draw is
one value per global batch, the same on every rank). So

- ranks draw different values (different rows of one global draw);
- a W-rank run draws exactly what a 1-process run with batch W·B draws at the same step (the
  concatenation of the rank slices), on the same device type;
- a resumed run draws what the uninterrupted run drew: the values depend only on (seed, n, k) and
  n is Lightning's checkpointed batch progress, so no generator state needs saving.

Large rows are drawn row by row instead: when one sample's draw has at least `ROW_KEYED_NUMEL`
numbers (images' noise), global row g = r·B + i comes from its own generator keyed by
(seed, n, k, g), so a rank draws its own B rows only. Which path a draw takes depends on the
per-sample shape alone, never on W, so the 1-process equality holds on both paths.

Costs: small rows (t, masks, levels, embedding noise): each rank draws W·B rows and keeps B, i.e.
W times the random numbers of its own batch (the other rows are freed at once), one generator per
draw. Large rows: B generators per draw and exactly the rank's own numbers, so a 1024 px
upsampler on 64 GPUs never materialises the global batch's noise (that would be 64x its own).
Assumptions: every rank runs the same sequence of draws with the same local batch size (training
batches are full on every rank: `BatchSamples(partial=False)`), which also means no draw may
depend on a rank's data. Outside a training step (validation, sampling, unit tests) the draws
come from the plain global torch generator of `device`, as `torch.rand` etc. would; an explicit
`generator` always wins and draws on its own device.
Not covered: randomness inside networks (`nn.Dropout`, attention dropout) uses the global
generator, which `RNGState` seeds per (seed, rank, step): different per rank, but not equal to
a 1-process run. The tiny configs set dropout to 0.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

Device = torch.device | str | None
ROW_KEYED_NUMEL = 4096  # numbers per sample from which every row gets its own generator
DrawFn = Callable[..., Tensor]  # fn(shape, *, generator, device) -> Tensor


def key_seed(*parts: object) -> int:
    """A 63-bit seed from a key ("unclip/part0/part1/..."), stable across processes and runs."""
    digest = hashlib.blake2b("/".join(["unclip", *map(str, parts)]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass
class StepDraws:
    """The draws of training step `step` on data-parallel `rank` of `world_size`.

    `drawn`: when a list, every local draw of the step is appended to it (tests, debugging).
    """

    seed: int
    step: int
    rank: int = 0
    world_size: int = 1
    calls: int = 0  # draws made so far in this step
    drawn: list[Tensor] | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a world of {self.world_size}")

    def draw(self, fn: DrawFn, shape: Sequence[int], device: torch.device | str) -> Tensor:
        """This rank's rows of the step's next global draw: fn((W·B, ...)) sliced to [r·B, (r+1)·B).

        A scalar shape () is one value for the whole global batch: the same on every rank.
        """
        key = ("draws", self.seed, self.step, self.calls)
        self.calls += 1
        generator = torch.Generator(device=device).manual_seed(key_seed(*key))
        if not shape:
            out = fn((), generator=generator, device=device)
        elif math.prod(shape[1:]) >= ROW_KEYED_NUMEL:
            first = self.rank * int(shape[0])
            rows = [fn(tuple(shape[1:]), generator=torch.Generator(device=device).manual_seed(key_seed(*key, first + i)),
                       device=device) for i in range(int(shape[0]))]
            out = torch.stack(rows)  # (B, ...): global rows [r·B, (r+1)·B)
        else:
            local = int(shape[0])
            full = fn((local * self.world_size, *shape[1:]), generator=generator, device=device)  # (W·B, ...)
            rows = full[self.rank * local : (self.rank + 1) * local]
            out = rows.clone() if self.world_size > 1 else rows  # do not keep the other ranks' rows alive
        if self.drawn is not None:
            self.drawn.append(out.detach().cpu())
        return out


_active: StepDraws | None = None


def begin_step(seed: int, step: int, rank: int = 0, world_size: int = 1) -> StepDraws:
    """Route the draws to training step `step` (until `end_step`); returns its `StepDraws`."""
    global _active
    _active = StepDraws(seed, step, rank, world_size)
    return _active


def end_step() -> None:
    """Back to the global torch generator (validation, sampling)."""
    global _active
    _active = None


def active() -> StepDraws | None:
    """The training step's draws, or None outside a training step."""
    return _active


def _draw(fn: DrawFn, shape: Sequence[int], device: Device, generator: torch.Generator | None) -> Tensor:
    shape = tuple(int(s) for s in shape)
    if generator is not None:  # explicit: on the generator's device (reproducible across devices)
        out = fn(shape, generator=generator, device=generator.device)
        return out.to(device) if device is not None else out
    device = torch.device(device) if device is not None else torch.device("cpu")
    if _active is None:
        return fn(shape, generator=None, device=device)
    return _active.draw(fn, shape, device)


def uniform(shape: Sequence[int], *, device: Device = None, generator: torch.Generator | None = None) -> Tensor:
    """U[0, 1) of `shape` (dimension 0: the local batch), float32."""
    return _draw(lambda s, **kw: torch.rand(s, **kw), shape, device, generator)


def normal(
    shape: Sequence[int], *, device: Device = None, dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> Tensor:
    """N(0, I) of `shape` (dimension 0: the local batch)."""
    return _draw(lambda s, **kw: torch.randn(s, dtype=dtype, **kw), shape, device, generator)


def integers(
    low: int, high: int, shape: Sequence[int], *, device: Device = None, generator: torch.Generator | None = None,
) -> Tensor:
    """Uniform integers in [low, high) of `shape` (dimension 0: the local batch), int64."""
    return _draw(lambda s, **kw: torch.randint(low, high, s, **kw), shape, device, generator)
