"""Shard-level WebDataset steps: which tar files a rank and a loader worker read.

Shard patterns (brace ranges, globs) expand to files here; `ShardList` shuffles them per
(seed, epoch), `ResampledShards` samples them with replacement; `SplitByNode` and
`split_by_worker` deal them out to ranks and loader workers, and `check_even_split` refuses a
split that would leave one rank short (and hang the others). The sample-level steps that follow
(tar to samples, decode, shuffle, transform, batch) are in `datamodules.steps`.
"""

from __future__ import annotations

import glob
import itertools
import os
import random
from typing import Any, Iterable, Iterator

import torch.distributed as dist
from braceexpand import braceexpand
from torch.utils.data import IterableDataset, get_worker_info

from modules.core.errors import DataError

Sample = dict[str, Any]


class ShardPatternError(DataError):
    """A shard pattern that names no readable file (one clear line, no traceback)."""


def expand_shards(patterns: str | Iterable[str], *, allow_pipe: bool = False) -> list[str]:
    """Expand brace/glob patterns to an ordered list of existing shard paths.

    `pipe:` URLs run shell commands and are refused unless `allow_pipe` is set explicitly.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    urls: list[str] = []
    for pattern in patterns:
        if pattern.startswith("pipe:"):
            if not allow_pipe:
                raise ShardPatternError(f"refusing shard URL {pattern!r}: 'pipe:' runs a shell command; set allow_pipe: true to allow it")
            urls.append(pattern)
            continue
        matched: list[str] = []
        for path in braceexpand(os.path.expanduser(pattern)):
            hits = sorted(glob.glob(path)) if glob.has_magic(path) else ([path] if os.path.isfile(path) else [])
            matched.extend(hits)
        if not matched:
            raise ShardPatternError(f"no shard file matches pattern {pattern!r}")
        urls.extend(matched)
    return urls


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def worker_and_count() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class ShardList(IterableDataset):
    """Shard URLs, shuffled by a `random.Random((seed, epoch))`; the epoch advances per pass.

    `set_epoch` is called from the main process before each epoch (non-persistent workers get a
    fresh copy); persistent workers keep their copy and advance it themselves, so both agree.
    With `shuffle=False` the order is the given one.
    """

    def __init__(self, urls: list[str], seed: int = 0, shuffle: bool = True) -> None:
        super().__init__()
        self.urls, self.seed, self.shuffle, self.epoch = list(urls), seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Sample]:
        urls = list(self.urls)
        if self.shuffle:
            random.Random(f"{self.seed}-{self.epoch}").shuffle(urls)
        self.epoch += 1
        for url in urls:
            yield {"url": url}


class ResampledShards(IterableDataset):
    """Endless sampling of shards with replacement (multi-epoch / DDP-safe mode).

    The stream is a function of (seed, epoch) only, so a pass can be replayed exactly (resume)
    and every epoch draws new shards. (webdataset's `ResampledShards` keeps its epoch counter in
    the dataset copy each non-persistent loader worker receives, so it repeats the same stream
    every epoch.) Loader workers all run this stream and `split_by_worker` deals it out.
    """

    def __init__(self, urls: list[str], seed: int = 0) -> None:
        super().__init__()
        if not urls:
            raise ShardPatternError("no shards to resample")
        self.urls, self.seed, self.epoch = list(urls), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Sample]:
        rng = random.Random(f"resample-{self.seed}-{self.epoch}")
        self.epoch += 1
        while True:
            yield {"url": rng.choice(self.urls)}


class SplitByNode:
    """Keep every `world_size`-th item starting at `rank` (taken in the main process: loader
    workers must not query torch.distributed themselves)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def __call__(self, src: Iterable[Sample]) -> Iterator[Sample]:
        return itertools.islice(src, self.rank, None, self.world_size)


def check_even_split(urls: list[str], world_size: int, key: str = "data.train_shards") -> None:
    """Without resampling, rank r reads shards r, r + W, ...: with a shard count that is not a
    multiple of the world size one rank runs out first and the others wait for it in the next
    collective (DALLE2-pytorch's PR #121 hang). Refuse that before training, in one line."""
    if world_size > 1 and len(urls) % world_size:
        raise ShardPatternError(
            f"{key}: {len(urls)} shards cannot be dealt evenly over {world_size} ranks (one would run out first and "
            f"hang the others); use resampled: true (with epoch_samples) or a multiple of {world_size} shards of equal size")


def split_by_worker(src: Iterable[Sample]) -> Iterator[Sample]:
    """Keep every `num_workers`-th item starting at this DataLoader worker's id."""
    wid, n = worker_and_count()
    return itertools.islice(src, wid, None, n)
