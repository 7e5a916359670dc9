"""Noise schedules and timestep respacing, all in float64 numpy.

- Linear β schedule: Ho et al. 2020 (DDPM) §4, β from 1e-4 to 0.02 for T = 1000, rescaled by
  1000/T for other T (as in improved DDPM's code).
- Cosine schedule: Nichol & Dhariwal 2021 (improved DDPM) eq. 17,
  ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2), β_t = min(1 − ᾱ_t/ᾱ_{t−1}, 0.999).
- SNR shift: Hoogeboom et al. 2023 ("simple diffusion") §3.1, logSNR'(t) = logSNR(t) − 2 log s,
  i.e. SNR'(t) = SNR(t)/s² and ᾱ'_t = ᾱ_t / (ᾱ_t + s²(1 − ᾱ_t)): s > 1 spends every step at more
  noise (their s = d/64 for d-pixel images, whose redundant pixels survive more noise).
- Respacing: Nichol & Dhariwal 2021 §4 — a sub-sequence S of steps keeps ᾱ_{S_i} exactly by
  setting β'_i = 1 − ᾱ_{S_i}/ᾱ_{S_{i−1}} (ᾱ_{S_{−1}} = 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from enum import Enum

import numpy as np


class Schedule(str, Enum):
    """Named β schedules."""

    LINEAR = "linear"
    COSINE = "cosine"


def linear_betas(num_timesteps: int) -> np.ndarray:
    """DDPM linear schedule (Ho et al. 2020 §4), scaled so that T = 1000 gives 1e-4..0.02."""
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule (Nichol & Dhariwal 2021 eq. 17); β clipped at ``max_beta``."""

    def alpha_bar(u: np.ndarray) -> np.ndarray:  # u = t / T in [0, 1]
        return np.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2

    u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    abar = alpha_bar(u)
    betas = 1.0 - abar[1:] / abar[:-1]
    return np.minimum(betas, max_beta)


def betas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """β_i = 1 − ᾱ_i/ᾱ_{i−1} (ᾱ_{−1} = 1): the β sequence whose running product of (1 − β) is ᾱ."""
    return 1.0 - alphas_cumprod / np.concatenate([[1.0], alphas_cumprod[:-1]])


def shift_snr(betas: np.ndarray, shift: float) -> np.ndarray:
    """β' whose SNR'(t) = SNR(t)/shift² at every t (Hoogeboom et al. 2023 §3.1); shift 1 returns β."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if shift == 1.0:
        return betas
    abar = np.cumprod(1.0 - betas)
    return betas_from_alphas_cumprod(abar / (abar + shift**2 * (1.0 - abar)))


def make_betas(schedule: Schedule | str, num_timesteps: int, shift: float = 1.0) -> np.ndarray:
    """β_1..β_T (float64, shape (T,)) for a named schedule, SNR divided by shift² (`shift_snr`)."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    schedule = Schedule(schedule)
    betas = linear_betas(num_timesteps) if schedule is Schedule.LINEAR else cosine_betas(num_timesteps)
    return shift_snr(betas, shift)


def _evenly_spaced(start: int, size: int, count: int) -> list[int]:
    """``count`` indices in [start, start + size − 1], including both ends (count ≥ 2)."""
    if count == 1:
        return [start + size - 1]
    stride = (size - 1) / (count - 1)
    return [start + int(math.floor(i * stride + 0.5)) for i in range(count)]


def space_timesteps(num_timesteps: int, spec: int | str | Iterable[int]) -> list[int]:
    """Sorted original-step indices to keep when respacing a T-step process.

    ``spec`` is
      - an int N: N evenly spaced steps from 0 to T−1, always including the last step T−1;
      - a section string "10,15,20" (guided-diffusion): T split into equal sections, each
        section evenly spaced with its count (both section ends included);
      - "ddimN": the DDIM paper's uniform stride, ``range(0, T, stride)`` with exactly N steps;
      - an explicit iterable of step indices.
    """
    if isinstance(spec, str):
        spec = spec.strip()
        if spec.startswith("ddim"):
            count = int(spec[len("ddim"):])
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == count:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {count} strided steps from {num_timesteps}")
        counts = [int(c) for c in spec.split(",")]
        return _sectioned(num_timesteps, counts)
    if isinstance(spec, int):
        return _sectioned(num_timesteps, [spec])
    steps = sorted({int(s) for s in spec})
    if not steps or steps[0] < 0 or steps[-1] >= num_timesteps:
        raise ValueError(f"timesteps must lie in [0, {num_timesteps}), got {steps[:3]}...")
    return steps


def _sectioned(num_timesteps: int, counts: list[int]) -> list[int]:
    """Split [0, T) into len(counts) near-equal sections and space each one evenly."""
    base, extra = divmod(num_timesteps, len(counts))
    steps: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size}")
        steps += _evenly_spaced(start, size, count)
        start += size
    assert len(set(steps)) == len(steps), "respacing produced duplicate steps"
    return steps


def respaced_betas(
    alphas_cumprod: np.ndarray, use_timesteps: Iterable[int]
) -> tuple[np.ndarray, np.ndarray]:
    """β' for the kept steps, such that the respaced ᾱ'_i equals ᾱ_{S_i} exactly.

    Returns ``(new_betas (N,) float64, timestep_map (N,) int64)``; ``timestep_map[i]`` is the
    index in ``alphas_cumprod`` of respaced step i.
    """
    alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
    timestep_map = np.array(sorted({int(t) for t in use_timesteps}), dtype=np.int64)
    if timestep_map.size == 0 or timestep_map[0] < 0 or timestep_map[-1] >= len(alphas_cumprod):
        raise ValueError("use_timesteps must be a non-empty subset of range(len(alphas_cumprod))")
    return betas_from_alphas_cumprod(alphas_cumprod[timestep_map]), timestep_map
