"""Shared fixtures: hermetic, tiny, CPU-only."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Processes the tests start (`unclip` subprocesses) share the cores with the other pytest worker: there idle
# OpenMP threads should sleep, not spin (README). Set after torch loaded OpenMP, so it reaches only children.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _finish_wandb_runs():
    """Every `unclip fit` logs to an offline W&B run by default; a run left open by one test would
    be reused by the next in the same process. A real CLI process ends its run when it exits."""
    yield
    import sys

    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def sample_members(key: str, arr: np.ndarray, caption: str) -> list[tuple[str, bytes]]:
    return [
        (f"{key}.png", png_bytes(arr)),
        (f"{key}.txt", caption.encode()),
        (f"{key}.json", json.dumps({"key": key}).encode()),
    ]


@pytest.fixture
def tiny_shards(tmp_path: Path):
    """4 shards x 6 samples of 16 px random images; returns (pattern, {key: (array, caption)})."""
    rng = np.random.default_rng(0)
    truth: dict[str, tuple[np.ndarray, str]] = {}
    for s in range(4):
        members: list[tuple[str, bytes]] = []
        for i in range(6):
            key = f"{s:04d}{i:05d}"
            arr = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            caption = f"caption number {s * 6 + i}"
            truth[key] = (arr, caption)
            members += sample_members(key, arr, caption)
        write_tar(tmp_path / f"train-{s:06d}.tar", members)
    return str(tmp_path / "train-{000000..000003}.tar"), truth
