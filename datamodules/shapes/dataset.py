"""The shapes dataset written as img2dataset-layout WebDataset shards: splits, holdouts, and
byte-identical tars for a seed (see `datamodules/shapes/__init__.py`)."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import re
import tarfile
from dataclasses import asdict, dataclass, field
from enum import Enum
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
from PIL import Image

from datamodules.shapes.grammar import ALL_OBJECTS, COLORS, RELATIONS, SHAPES, TEMPLATES, Obj
from datamodules.shapes.scene import draw_scene, layout_scene, margin_px, side_range
from modules.core.files import write_text_atomic


class Split(str, Enum):
    TRAIN = "train"
    VAL = "val"


SPLIT_IDS = {Split.TRAIN: 0, Split.VAL: 1}
PNG_COMPRESS_LEVEL = 6
_TAR_FORMAT = tarfile.USTAR_FORMAT


# ----------------------------------------------------------------------------- holdout
@dataclass(frozen=True)
class Holdout:
    """Held-out objects and object combinations (unordered pairs)."""

    objects: frozenset[Obj] = frozenset()
    pairs: frozenset[frozenset[Obj]] = frozenset()
    items: tuple[tuple[Obj, ...], ...] = ()  # parse order, one tuple per item (for val probes)

    @classmethod
    def parse(cls, items: Sequence[str] | None) -> "Holdout":
        parsed = []
        for item in items or ():
            objs = tuple(Obj.parse(t) for t in item.split(","))
            if len(objs) > 2 or len(set(objs)) != len(objs):
                raise ValueError(f"bad holdout {item!r}: one object or two distinct objects")
            parsed.append(objs)
        return cls(frozenset(o[0] for o in parsed if len(o) == 1),
                   frozenset(frozenset(o) for o in parsed if len(o) == 2), tuple(parsed))

    def excludes(self, objs: Sequence[Obj]) -> bool:
        """True when a scene with these objects contains a held-out object or combination."""
        return any(o in self.objects for o in objs) or frozenset(objs) in self.pairs


@lru_cache(maxsize=64)
def _choices(holdout: Holdout, exclude: bool) -> tuple[tuple[Obj, ...], tuple[tuple[Obj, Obj], ...]]:
    """Allowed single objects and ordered object pairs, holdouts removed when ``exclude``."""
    singles = tuple(o for o in ALL_OBJECTS if not (exclude and holdout.excludes([o])))
    pairs = tuple((a, b) for a in ALL_OBJECTS for b in ALL_OBJECTS
                  if a != b and not (exclude and holdout.excludes([a, b])))
    if not singles or not pairs:
        raise ValueError("holdout leaves no one-object or no two-object scene for train")
    return singles, pairs

def _probe_objects(rng: np.random.Generator, holdout: Holdout, two_object: bool) -> list[Obj]:
    """Objects of a val probe scene built around one held-out item chosen uniformly."""
    item = list(holdout.items[int(rng.integers(len(holdout.items)))])
    if len(item) == 1 and two_object:
        partners = [o for o in ALL_OBJECTS if o != item[0]]
        item.append(partners[int(rng.integers(len(partners)))])
    if len(item) == 2 and rng.random() < 0.5:
        item.reverse()
    return item


def render_sample(rng: np.random.Generator, size: int, *, two_object_fraction: float = 0.5,
                  holdout: Holdout | None = None, split: Split | str = Split.TRAIN,
                  val_holdout_fraction: float = 0.5) -> tuple[Image.Image, dict[str, Any]]:
    """Draw one random scene: (RGB image, truth dict). Train excludes holdouts (module doc)."""
    holdout, split = holdout or Holdout(), Split(split)
    probe = split == Split.VAL and bool(holdout.items) and rng.random() < val_holdout_fraction
    two_object = bool(rng.random() < two_object_fraction)
    if probe:
        objects = _probe_objects(rng, holdout, two_object)
    else:
        singles, pairs = _choices(holdout, split == Split.TRAIN)
        pool = pairs if two_object else singles
        chosen = pool[int(rng.integers(len(pool)))]
        objects = list(chosen) if two_object else [chosen]
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))] if len(objects) == 2 else None
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    truth = layout_scene(rng, size, objects, relation, template)
    truth["split"], truth["holdout"] = split.value, holdout.excludes(objects)
    return draw_scene(truth, size), truth


# ----------------------------------------------------------------------------- shards
@dataclass(frozen=True)
class ShapesConfig:
    """Everything that determines the shard bytes (worker count does not)."""

    num_samples: int = 20000
    size: int = 64
    seed: int = 0
    shard_size: int = 1000
    val_fraction: float = 0.1
    two_object_fraction: float = 0.5
    holdout: tuple[str, ...] = field(default_factory=tuple)
    val_holdout_fraction: float = 0.5

    def split_counts(self) -> dict[Split, int]:
        num_val = round(self.num_samples * self.val_fraction)
        return {Split.TRAIN: self.num_samples - num_val, Split.VAL: num_val}


class _ShardJob(NamedTuple):
    split: Split
    shard: int
    start: int  # first sample index within the split
    stop: int


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    tar.addfile(info, io.BytesIO(data))


def encode_sample(config: ShapesConfig, split: Split, index: int) -> tuple[dict[str, bytes], dict]:
    """Files of sample ``index`` of ``split`` as {extension: bytes}, plus its truth dict."""
    rng = np.random.default_rng([config.seed, SPLIT_IDS[split], index])
    image, truth = render_sample(rng, config.size, two_object_fraction=config.two_object_fraction,
                                 holdout=Holdout.parse(config.holdout), split=split,
                                 val_holdout_fraction=config.val_holdout_fraction)
    png = io.BytesIO()
    image.save(png, format="PNG", optimize=False, compress_level=PNG_COMPRESS_LEVEL)
    files = {"json": json.dumps(truth, sort_keys=True).encode("utf-8"), "png": png.getvalue(),
             "txt": truth["caption"].encode("utf-8")}
    return files, truth


def shard_name(split: Split, shard: int) -> str:
    return f"{Split(split).value}-{shard:06d}.tar"


def _write_shard(job: _ShardJob, config: ShapesConfig, out: Path) -> dict[str, int]:
    """Render samples [start, stop) of a split into one tar, atomically (tmp + os.replace)."""
    path = out / shard_name(job.split, job.shard)
    tmp = path.with_name(path.name + ".tmp")
    counts = {"num_samples": 0, "num_two_object": 0, "num_holdout": 0}
    try:
        with tarfile.open(tmp, "w", format=_TAR_FORMAT) as tar:
            for index in range(job.start, job.stop):
                files, truth = encode_sample(config, job.split, index)
                for ext in sorted(files):
                    _tar_member(tar, f"{index:09d}.{ext}", files[ext])
                counts["num_samples"] += 1
                counts["num_two_object"] += len(truth["objects"]) == 2
                counts["num_holdout"] += truth["holdout"]
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return counts


def _shard_jobs(config: ShapesConfig) -> list[_ShardJob]:
    return [_ShardJob(split, start // config.shard_size, start, min(start + config.shard_size, n))
            for split, n in config.split_counts().items() for start in range(0, n, config.shard_size)]


def _brace_pattern(split: Split, num_shards: int) -> str | None:
    if num_shards == 0:
        return None
    return f"{split.value}-{{{0:06d}..{num_shards - 1:06d}}}.tar"


def _validate(config: ShapesConfig) -> None:
    if config.num_samples < 0 or config.shard_size < 1:
        raise ValueError("need num_samples >= 0 and shard_size >= 1")
    for name in ("val_fraction", "two_object_fraction", "val_holdout_fraction"):
        if not 0.0 <= getattr(config, name) <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1]")
    layout_scene(np.random.default_rng(0), config.size, [ALL_OBJECTS[0]])  # size check
    _choices(Holdout.parse(config.holdout), True)  # holdout syntax and feasibility check


def _remove_stale_shards(out: Path, jobs: list[_ShardJob]) -> None:
    """Delete this generator's shard files from an earlier, larger run into the same folder."""
    keep = {shard_name(j.split, j.shard) for j in jobs}
    for path in out.iterdir():
        if re.fullmatch(r"(train|val)-\d{6}\.tar(\.tmp)?", path.name) and path.name not in keep:
            path.unlink()


def write_shapes_dataset(config: ShapesConfig, out: str | os.PathLike, workers: int | None = None) -> dict:
    """Write all train/val shards and ``stats.json`` into ``out``; returns the stats dict."""
    _validate(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = _shard_jobs(config)
    _remove_stale_shards(out, jobs)
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    run = partial(_write_shard, config=config, out=out)
    if workers == 1:
        results = [run(job) for job in jobs]
    else:  # fork: workers need no re-import of the (possibly torch-heavy) parent entry point
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        with ctx.Pool(workers) as pool:
            results = pool.map(run, jobs, chunksize=1)
    splits = {}
    for split in Split:
        mine = [r for j, r in zip(jobs, results) if j.split == split]
        totals = {k: sum(r[k] for r in mine) for k in ("num_samples", "num_two_object", "num_holdout")}
        splits[split.value] = {**totals, "num_shards": len(mine), "pattern": _brace_pattern(split, len(mine))}
    lo, hi = side_range(config.size)
    stats = {"splits": splits, "args": asdict(config), "colors": COLORS, "shapes": SHAPES,
             "relations": RELATIONS, "templates": TEMPLATES, "side_range_px": [lo, hi],
             "margin_px": margin_px(config.size),
             "val_contents": "full distribution; with holdouts, a val_holdout_fraction of val "
                             "samples are probes containing a held-out item (truth['holdout'])"}
    write_text_atomic(out / "stats.json", json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return stats
