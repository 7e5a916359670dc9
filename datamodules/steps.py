"""Small named WebDataset pipeline steps shared by every DataModule.

A pipeline reads as the list in `STYLE.md`:
shard list -> deterministic shuffle seeded by (seed, epoch) -> split by node -> split by worker
(those shard-level steps are in `datamodules.shards`)
-> tar to samples without throwing (count and skip) -> decode -> filter -> augment -> batch.

Each step is a callable `step(src) -> iterator`: a module-level generator function, or an
instance of a small class holding the step's settings. So a pipeline is
`wds.DataPipeline(step_a, step_b, ...)`, every step can be tested alone, and a whole pipeline
pickles: DataLoader workers started by `spawn` / `forkserver` (macOS, Windows, or Linux by
choice: `LoaderConfig.multiprocessing_context`) receive it by pickling. Steps that share a
`SkipCounter` still share it in the worker (pickle keeps shared references).
"""

from __future__ import annotations

import io
import itertools
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from datamodules.shards import worker_and_count
from modules.core.images import flatten_rgb

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
Sample = dict[str, Any]


class SkipCounter:
    """Counts skipped samples by reason; each batch carries the counts since the previous batch.

    Lives inside each loader worker, so the main process learns about skips through the batches
    (`batch["skipped"]`), never through shared state.
    """

    def __init__(self, log_first: int = 5) -> None:
        self.total: Counter[str] = Counter()
        self._reported: Counter[str] = Counter()
        self.log_first = log_first

    def skip(self, reason: str, where: str) -> None:
        self.total[reason] += 1
        if self.total[reason] <= self.log_first:
            log.warning("skipping sample %s: %s", where, reason)

    def delta(self) -> dict[str, int]:
        out = {k: v - self._reported[k] for k, v in self.total.items() if v != self._reported[k]}
        self._reported = Counter(self.total)
        return out


# ---------------------------------------------------------------------------------------------
class TarToSamples:
    """Open shards and group files by key; a truncated or unreadable tar is counted, not raised."""

    def __init__(self, counter: SkipCounter) -> None:
        self.counter, self.seen = counter, set[str]()

    def handler(self, exn: Exception) -> bool:
        # webdataset may report one broken shard twice (member read, then the tar stream):
        # count each shard once.
        text = str(exn)
        match = re.search(r"name='([^']+)'", text)
        shard = match.group(1) if match else text
        if shard not in self.seen:
            self.seen.add(shard)
            self.counter.skip("unreadable_tar", shard)
        return True

    def __call__(self, src: Iterable[Sample]) -> Iterator[Sample]:
        return wds.tariterators.tarfile_samples(src, handler=self.handler)


# ---------------------------------------------------------------------------------------------
# Sample-level steps
# ---------------------------------------------------------------------------------------------
@dataclass
class CaptionRules:
    """What counts as a usable caption."""

    max_bytes: int = 4096
    required: bool = True


class DecodeSamples:
    """Raw tar members -> {"key", "image": PIL RGB, "caption": str, **extra}.

    Images of any mode become 8-bit RGB by `modules.core.images.flatten_rgb`: transparent pixels
    composited on white, 16-bit grayscale scaled (not clipped) to 8 bits.

    Samples with a missing/undecodable image or a missing/empty/over-long/non-UTF-8 caption are
    skipped and counted by reason. `extra` names further members (e.g. embedding `.npy`s) to pass
    through as raw bytes for a later step to decode.
    """

    def __init__(self, counter: SkipCounter, rules: CaptionRules | None = None, extra: tuple[str, ...] = ()) -> None:
        self.counter, self.rules, self.extra = counter, rules or CaptionRules(), tuple(extra)

    def __call__(self, src: Iterable[Sample]) -> Iterator[Sample]:
        counter, rules = self.counter, self.rules
        for raw in src:
            key = raw.get("__key__", "?")
            where = f"{key} in {raw.get('__url__', '?')}"
            image_ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
            if image_ext is None:
                counter.skip("missing_image", where)
                continue
            try:
                with Image.open(io.BytesIO(raw[image_ext])) as im:
                    image = flatten_rgb(im)  # transparency on white, 16-bit scaled
            except Exception:  # PIL raises many types for bad bytes
                counter.skip("bad_image", where)
                continue
            caption = ""
            if "txt" in raw:
                if len(raw["txt"]) > rules.max_bytes:
                    counter.skip("caption_too_long", where)
                    continue
                try:
                    caption = raw["txt"].decode("utf-8").strip()
                except UnicodeDecodeError:
                    counter.skip("caption_not_utf8", where)
                    continue
            if rules.required and "txt" not in raw:
                counter.skip("missing_caption", where)
                continue
            if rules.required and not caption:
                counter.skip("empty_caption", where)
                continue
            sample: Sample = {"key": key, "image": image, "caption": caption}
            for name in self.extra:
                if name not in raw:
                    counter.skip(f"missing_{name}", where)
                    break
                sample[name] = raw[name]
            else:
                yield sample


class SampleShuffle:
    """Reservoir shuffle with an RNG seeded by (seed, rank, worker, epoch): deterministic per run,
    different every epoch. A pipeline step (`step(src) -> iterator`) with `set_epoch`."""

    def __init__(self, bufsize: int, seed: int, rank: int = 0) -> None:
        self.bufsize, self.seed, self.rank, self.epoch = bufsize, seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, src: Iterable[Sample]) -> Iterator[Sample]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        if self.bufsize <= 1:
            yield from src
            return
        wid, _ = worker_and_count()
        rng = random.Random(f"{self.seed}-{self.rank}-{wid}-{epoch}")
        buf: list[Sample] = []
        for sample in src:
            if len(buf) < self.bufsize:
                buf.append(sample)
                continue
            i = rng.randrange(self.bufsize)
            yield buf[i]
            buf[i] = sample
        rng.shuffle(buf)
        yield from buf


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the short side to `size` (bicubic, antialiased) and centre-crop a square."""
    w, h = image.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
        left, top = (nw - size) // 2, (nh - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB uint8 -> float tensor (3, H, W) in [-1, 1]."""
    arr = np.array(image, dtype=np.uint8)  # a writable copy
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def mirror_caption(text: str) -> str:
    """The caption of the horizontally mirrored image: the whole words "left" and "right" swapped,
    case kept ("to the left of" <-> "to the right of"; "bright", "leftover" untouched). A heuristic
    for free text: it also swaps "right" meaning "correct"."""

    def swap(match: re.Match[str]) -> str:
        word = match.group(0)
        other = "right" if word.lower() == "left" else "left"
        return other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other

    return _LEFT_RIGHT.sub(swap, text)


def mirror_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes (..., 4) [x0, y0, x1, y1] in [0, 1] of the horizontally flipped canvas: x -> 1 - x."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([1 - x1, y0, 1 - x0, y1], dim=-1)


class ImageTransform:
    """Resize / centre crop, optional horizontal flip, normalise to [-1, 1].

    A flipped sample's caption (and its hard negatives, if any) is mirrored with it
    (`mirror_caption`), so "A to the left of B" stays true of the flipped image; `mirror_captions=False`
    flips the image alone; layout boxes (`datamodules.layout`) are always mirrored with the image.
    Flips are off by default. Their RNG is keyed like `SampleShuffle`'s, by
    (seed, rank, worker, epoch): ranks, workers and epochs flip independently (`set_epoch`).
    """

    def __init__(self, size: int, hflip: bool = False, seed: int = 0, rank: int = 0,
                 mirror_captions: bool = True) -> None:
        self.size, self.hflip, self.seed, self.rank, self.epoch = size, hflip, seed, rank, 0
        self.mirror_captions = mirror_captions

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, src: Iterable[Sample]) -> Iterator[Sample]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        rng = random.Random(f"flip-{self.seed}-{self.rank}-{worker_and_count()[0]}-{epoch}")
        for sample in src:
            image = resize_center_crop(sample["image"], self.size)
            if self.hflip and rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
                if "layout_boxes" in sample:  # boxes follow the image, whatever the captions do
                    sample = {**sample, "layout_boxes": mirror_boxes(sample["layout_boxes"])}
                if self.mirror_captions:
                    sample = self._mirrored(sample)
            yield {**sample, "image": to_tensor(image)}

    @staticmethod
    def _mirrored(sample: Sample) -> Sample:
        out = dict(sample)
        if isinstance(out.get("caption"), str):
            out["caption"] = mirror_caption(out["caption"])
        if out.get("negatives") is not None:
            out["negatives"] = [mirror_caption(n) for n in out["negatives"]]
        return out


class TakeStrided:
    """Fixed-size evaluation split: the first `limit` samples in shard order, dealt out round
    robin over ranks x workers so every sample is seen exactly once whatever the topology."""

    def __init__(self, limit: int, rank: int = 0, world_size: int = 1) -> None:
        self.limit, self.rank, self.world_size = limit, rank, world_size

    def __call__(self, src: Iterable[Sample]) -> Iterator[Sample]:
        wid, nw = worker_and_count()
        slot, slots = self.rank * nw + wid, self.world_size * nw
        for i, sample in enumerate(itertools.islice(src, self.limit)):
            if i % slots == slot:
                yield sample


def shape_signature(sample: Sample) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The shapes a batch must agree on: 1-D tensors whole, longer ones after their first dim
    (a caption's token encodings (L, W) may differ in L, never in W)."""
    return tuple(
        (name, tuple(v.shape) if v.ndim <= 1 else tuple(v.shape[1:]))
        for name, v in sorted(sample.items())
        if isinstance(v, torch.Tensor)
    )


class ShapeGuard:
    """Drops samples whose tensor shapes disagree with the stream's (a wrong-size embedding would
    otherwise crash the collate). The reference is the most common signature of the first
    `window` samples; a later sample is dropped when a field it shares with the reference has
    another shape (fields it lacks are other steps' business). Counted as `wrong_shape_<field>`."""

    def __init__(self, counter: SkipCounter, window: int) -> None:
        self.counter, self.window = counter, max(1, window)
        self.reference: dict[str, tuple[int, ...]] | None = None

    def _keep(self, sample: Sample) -> bool:
        assert self.reference is not None
        for name, shape in shape_signature(sample):
            if self.reference.get(name, shape) != shape:
                self.counter.skip(f"wrong_shape_{name}", str(sample.get("key", "?")))
                return False
        return True

    def __call__(self, src: Iterable[Sample]) -> Iterator[Sample]:
        pending: list[Sample] = []
        for sample in src:
            if self.reference is not None:
                if self._keep(sample):
                    yield sample
                continue
            pending.append(sample)
            if len(pending) == self.window:
                yield from self._settle(pending)
                pending = []
        yield from self._settle(pending)

    def _settle(self, pending: list[Sample]) -> Iterator[Sample]:
        if not pending:
            return
        if self.reference is None:
            self.reference = dict(Counter(shape_signature(s) for s in pending).most_common(1)[0][0])
        yield from (s for s in pending if self._keep(s))


class BatchSamples:
    """Group samples into batches of `batch_size`, collated. Samples whose tensor shapes disagree
    with the stream's are dropped first (`ShapeGuard`); those drops are added to the batch's
    `skipped` counts, so every DataModule reports them without knowing about them. Without
    `partial`, a last incomplete batch is dropped (its skip counts travel with the batch before)."""

    def __init__(self, batch_size: int, collate: Callable[[list[Sample]], Sample], partial: bool = True) -> None:
        self.batch_size, self.collate, self.partial = batch_size, collate, partial

    def __call__(self, src: Iterable[Sample]) -> Iterator[Sample]:
        batch_size, collate, partial = self.batch_size, self.collate, self.partial
        counter = SkipCounter()

        def emit(samples: list[Sample]) -> Sample:
            batch = collate(samples)
            extra = counter.delta()
            if extra and isinstance(batch, dict):
                merged = Counter(batch.get("skipped") or {})
                merged.update(extra)
                batch["skipped"] = dict(merged)
            return batch

        # Each batch is collated only once the next one is full (or the stream has ended), so
        # skips met after the last batch of a pass still reach the main process with it.
        held: list[Sample] | None = None
        batch: list[Sample] = []
        for sample in ShapeGuard(counter, batch_size)(src):
            batch.append(sample)
            if len(batch) == batch_size:
                if held is not None:
                    yield emit(held)
                held, batch = batch, []
        if batch and partial:
            if held is not None:
                yield emit(held)
            held = batch
        if held is not None:
            yield emit(held)


def stack_fields(samples: list[Sample]) -> Sample:
    """Collate a list of sample dicts: tensors are stacked, everything else becomes a list."""
    out: Sample = {}
    for name in samples[0]:
        values = [s[name] for s in samples]
        out[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out
