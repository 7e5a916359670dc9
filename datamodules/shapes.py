"""Built-in compositional shapes dataset, written as img2dataset-layout WebDataset shards.

Each sample is ``{key}.png`` (RGB, S x S, white background), ``{key}.txt`` (UTF-8 caption) and
``{key}.json`` (structured truth)::

    {"objects": [{"color": "red", "shape": "circle", "bbox": [x0, y0, x1, y1]}, ...],
     "relation": null | "to the left of" | "to the right of" | "above" | "below",
     "caption": ..., "template": "a photo of {}", "split": "train" | "val",
     "holdout": bool, "size": S}

Geometry (all integers, pixels of the final image). ``bbox`` is half-open: the object covers
columns ``x0 .. x1-1`` and rows ``y0 .. y1-1``; every bbox is square with side in
``[ceil(0.25 S), floor(0.45 S)]``. Shapes fill their bbox: ``square`` all of it, ``circle`` the
inscribed disc, ``triangle`` an isosceles triangle, apex up (top centre), base on the bottom edge.
Shapes are drawn at 4x with ``ImageDraw`` and box-downsampled (``Image.reduce``), so edges are
anti-aliased blends with white, every pixel fully inside a shape is its exact fill RGB and every
pixel outside all bboxes is exactly white.

Relation (first-named object = subject A, second = object B), e.g. "A to the left of B" iff
  (1) the gap along the relation axis is at least ``margin = max(1, S // 16)``:
      ``B.x0 - A.x1 >= margin`` (right of: ``A.x0 - B.x1``; above: ``B.y0 - A.y1``; below:
      ``A.y0 - B.y1``), and
  (2) the extents across the axis overlap by at least half the smaller side:
      ``min(A.y1, B.y1) - max(A.y0, B.y0) >= ceil(min(sA, sB) / 2)``.
Hence the bboxes never overlap and, for the centres, ``cx_B - cx_A > |cy_B - cy_A|`` (the centre
offset lies strictly within 45 degrees of the relation axis): exactly one relation holds.
Two objects in one image never share both colour and shape (no "a red circle left of a red
circle"; such a caption would also be true reversed).

Splits and holdout. ``--holdout red:circle`` keeps every sample containing a red circle out of
train; ``--holdout red:circle,blue:square`` keeps every sample containing both objects (either
order, any relation) out of train. Val is drawn from the full distribution, except that with
holdouts a fraction ``val_holdout_fraction`` (default 0.5) of val samples are probes built
around a held-out item chosen uniformly (an object alone or with a random partner; a combination
in random order and relation). ``truth["holdout"]`` marks every sample containing a held-out item.

Determinism: sample ``i`` of split ``s`` uses ``numpy.random.default_rng([seed, s_id, i])``;
tars are written with fixed metadata, sorted members and fixed PNG settings, so shards are
byte-identical across runs and worker counts.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import re
import tarfile
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw

from modules.files import write_text_atomic


class Shape(str, Enum):
    CIRCLE = "circle"
    SQUARE = "square"
    TRIANGLE = "triangle"


class Relation(str, Enum):
    LEFT = "to the left of"
    RIGHT = "to the right of"
    ABOVE = "above"
    BELOW = "below"


class Split(str, Enum):
    TRAIN = "train"
    VAL = "val"


COLORS: dict[str, tuple[int, int, int]] = {  # exact fill RGB
    "red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
    "yellow": (230, 200, 40), "purple": (140, 60, 180), "orange": (240, 130, 30)}
SHAPES: tuple[str, ...] = tuple(s.value for s in Shape)
RELATIONS: tuple[str, ...] = tuple(r.value for r in Relation)
TEMPLATES: tuple[str, ...] = ("{}", "a photo of {}", "a picture of {}", "an image of {}", "a drawing of {}")
WHITE = (255, 255, 255)
SUPERSAMPLE = 4
MIN_SIDE_FRACTION, MAX_SIDE_FRACTION = 0.25, 0.45
SPLIT_IDS = {Split.TRAIN: 0, Split.VAL: 1}
PNG_COMPRESS_LEVEL = 6
_TAR_FORMAT = tarfile.USTAR_FORMAT


class Obj(NamedTuple):
    """One object identity: a (colour, shape) pair."""

    color: str
    shape: str

    @classmethod
    def parse(cls, text: str) -> "Obj":
        color, _, shape = text.strip().partition(":")
        if color not in COLORS or shape not in SHAPES:
            raise ValueError(f"bad object {text!r}: expected COLOR:SHAPE with COLOR in "
                             f"{sorted(COLORS)} and SHAPE in {list(SHAPES)}")
        return cls(color, shape)


ALL_OBJECTS: tuple[Obj, ...] = tuple(Obj(c, s) for c in COLORS for s in SHAPES)


def side_range(size: int) -> tuple[int, int]:
    """Inclusive range of bbox sides in pixels: [ceil(0.25 S), floor(0.45 S)]."""
    return math.ceil(MIN_SIDE_FRACTION * size), math.floor(MAX_SIDE_FRACTION * size)


def margin_px(size: int) -> int:
    """Minimum gap in pixels between two bboxes along their relation axis."""
    return max(1, size // 16)


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


# ----------------------------------------------------------------------------- captions
def _phrase(obj: dict[str, Any]) -> str:
    article = "an" if obj["color"][0] in "aeiou" else "a"
    return f"{article} {obj['color']} {obj['shape']}"


def describe(truth: dict[str, Any]) -> str:
    """Caption of a truth dict: its template filled with "a red circle [REL a blue square]"."""
    objs = truth["objects"]
    phrase = _phrase(objs[0])
    if truth.get("relation"):
        phrase = f"{phrase} {truth['relation']} {_phrase(objs[1])}"
    return truth.get("template", "{}").format(phrase)


_OBJ_RE = rf"an? ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
_PHRASE_RE = re.compile(rf"{_OBJ_RE}(?: ({'|'.join(RELATIONS)}) {_OBJ_RE})?")


def parse_caption(caption: str) -> tuple[list[Obj], str | None, str]:
    """Inverse of ``describe``: (objects in caption order, relation or None, template)."""
    for template in sorted(TEMPLATES, key=len, reverse=True):
        prefix = template.replace("{}", "")
        if caption.startswith(prefix) and (m := _PHRASE_RE.fullmatch(caption[len(prefix):])):
            objs = [Obj(m[1], m[2])] + ([Obj(m[4], m[5])] if m[3] else [])
            return objs, m[3], template
    raise ValueError(f"caption not in the shapes grammar: {caption!r}")


# ----------------------------------------------------------------------------- geometry
def classify_relation(a: Sequence[int], b: Sequence[int], margin: int = 1) -> str | None:
    """The relation R with "A R B" under the module's rule, or None (bboxes [x0, y0, x1, y1])."""
    min_overlap = math.ceil(min(a[2] - a[0], b[2] - b[0]) / 2)
    overlap_y = min(a[3], b[3]) - max(a[1], b[1])
    overlap_x = min(a[2], b[2]) - max(a[0], b[0])
    if overlap_y >= min_overlap:
        if b[0] - a[2] >= margin:
            return Relation.LEFT.value
        if a[0] - b[2] >= margin:
            return Relation.RIGHT.value
    if overlap_x >= min_overlap:
        if b[1] - a[3] >= margin:
            return Relation.ABOVE.value
        if a[1] - b[3] >= margin:
            return Relation.BELOW.value
    return None


def _place_pair(rng: np.random.Generator, size: int, side_a: int, side_b: int,
                relation: Relation) -> tuple[list[int], list[int]]:
    """Bboxes of subject A and object B such that "A relation B" holds (module rule)."""
    subject_first = relation in (Relation.LEFT, Relation.ABOVE)  # first = left / top
    s1, s2 = (side_a, side_b) if subject_first else (side_b, side_a)
    gap = int(rng.integers(margin_px(size), size - s1 - s2, endpoint=True))
    along1 = int(rng.integers(0, size - (s1 + gap + s2), endpoint=True))
    along2 = along1 + s1 + gap
    min_overlap = math.ceil(min(s1, s2) / 2)
    across1 = int(rng.integers(0, size - s1, endpoint=True))
    lo, hi = max(0, across1 + min_overlap - s2), min(size - s2, across1 + s1 - min_overlap)
    across2 = int(rng.integers(lo, hi, endpoint=True))
    horizontal = relation in (Relation.LEFT, Relation.RIGHT)
    boxes = []
    for along, across, side in ((along1, across1, s1), (along2, across2, s2)):
        x0, y0 = (along, across) if horizontal else (across, along)
        boxes.append([x0, y0, x0 + side, y0 + side])
    first, second = boxes
    return (first, second) if subject_first else (second, first)


def layout_scene(rng: np.random.Generator, size: int, objects: Sequence[Obj],
                 relation: str | None = None, template: str = "{}") -> dict[str, Any]:
    """Truth dict for given objects (1, or 2 with a relation): random sides and positions."""
    lo, hi = side_range(size)
    if lo < 1 or 2 * hi + margin_px(size) > size:
        raise ValueError(f"size {size} too small for the shapes layout")
    sides = [int(s) for s in rng.integers(lo, hi, size=len(objects), endpoint=True)]
    if len(objects) == 1:
        x0, y0 = (int(v) for v in rng.integers(0, size - sides[0], size=2, endpoint=True))
        boxes = [[x0, y0, x0 + sides[0], y0 + sides[0]]]
    elif len(objects) == 2 and relation is not None:
        boxes = list(_place_pair(rng, size, sides[0], sides[1], Relation(relation)))
    else:
        raise ValueError("expected one object, or two objects and a relation")
    truth = {"objects": [{"color": o.color, "shape": o.shape, "bbox": b} for o, b in zip(objects, boxes)],
             "relation": None if len(objects) == 1 else Relation(relation).value,
             "template": template, "size": size}
    truth["caption"] = describe(truth)
    return truth


# ----------------------------------------------------------------------------- drawing
@lru_cache(maxsize=4096)
def _tile(shape: str, color: str, side: int) -> Image.Image:
    """One object filling a side x side tile: drawn at 4x, box-downsampled (exact interior)."""
    n = side * SUPERSAMPLE
    tile = Image.new("RGB", (n, n), WHITE)
    draw, fill = ImageDraw.Draw(tile), COLORS[color]
    if shape == Shape.CIRCLE:
        draw.ellipse([0, 0, n - 1, n - 1], fill=fill)
    elif shape == Shape.SQUARE:
        draw.rectangle([0, 0, n - 1, n - 1], fill=fill)
    elif shape == Shape.TRIANGLE:  # apex up: 2-px flat top keeps it symmetric on the even grid
        draw.polygon([(n // 2 - 1, 0), (n // 2, 0), (n - 1, n - 1), (0, n - 1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return tile.reduce(SUPERSAMPLE)


def draw_scene(truth: dict[str, Any], size: int) -> Image.Image:
    """Render a truth dict onto a white size x size RGB canvas."""
    canvas = Image.new("RGB", (size, size), WHITE)
    for obj in truth["objects"]:
        x0, y0, x1, _ = obj["bbox"]
        canvas.paste(_tile(obj["shape"], obj["color"], x1 - x0), (x0, y0))
    return canvas


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


# ----------------------------------------------------------------------------- CLI
def add_shapes_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``unclip data shapes`` (defaults from ``ShapesConfig``)."""
    d = ShapesConfig()
    parser.add_argument("--out", required=True, type=Path, help="output folder for shards and stats.json")
    parser.add_argument("--num-samples", type=int, default=d.num_samples, help="train + val samples")
    parser.add_argument("--size", type=int, default=d.size, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--shard-size", type=int, default=d.shard_size, help="samples per .tar")
    parser.add_argument("--val-fraction", type=float, default=d.val_fraction)
    parser.add_argument("--two-object-fraction", type=float, default=d.two_object_fraction)
    parser.add_argument("--holdout", nargs="+", default=[], metavar="ITEM",
                        help="COLOR:SHAPE or COLOR:SHAPE,COLOR:SHAPE kept out of train")
    parser.add_argument("--val-holdout-fraction", type=float, default=d.val_holdout_fraction,
                        help="with --holdout: fraction of val samples built around a held-out item")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (whole shards each)")
    return parser


def run_shapes(args: argparse.Namespace) -> None:
    """Generate the dataset from parsed ``add_shapes_arguments`` options and print a summary."""
    config = ShapesConfig(num_samples=args.num_samples, size=args.size, seed=args.seed,
                          shard_size=args.shard_size, val_fraction=args.val_fraction,
                          two_object_fraction=args.two_object_fraction, holdout=tuple(args.holdout),
                          val_holdout_fraction=args.val_holdout_fraction)
    start = time.perf_counter()
    stats = write_shapes_dataset(config, args.out, workers=args.workers)
    seconds = time.perf_counter() - start
    parts = [f"{s}: {v['num_samples']} samples in {v['pattern']}" for s, v in stats["splits"].items()]
    print(f"shapes -> {args.out} ({'; '.join(parts)}) in {seconds:.1f} s, "
          f"{config.num_samples / max(seconds, 1e-9):.0f} samples/s")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m datamodules.shapes", description=__doc__.split("\n")[0])
    run_shapes(add_shapes_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    main()
