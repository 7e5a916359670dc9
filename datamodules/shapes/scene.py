"""Scenes of the shapes dataset: layout (bboxes that satisfy a relation) and drawing.

Geometry and drawing rules are documented in `datamodules/shapes/__init__.py`.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from datamodules.shapes.grammar import COLORS, Obj, Relation, Shape, describe

WHITE = (255, 255, 255)
SUPERSAMPLE = 4
MIN_SIDE_FRACTION, MAX_SIDE_FRACTION = 0.25, 0.45
MARGIN_FRACTION = 1 / 16  # the gap along a relation's axis, in canvas units (`margin_px`: S // 16 pixels)


def side_range(size: int) -> tuple[int, int]:
    """Inclusive range of bbox sides in pixels: [ceil(0.25 S), floor(0.45 S)]."""
    return math.ceil(MIN_SIDE_FRACTION * size), math.floor(MAX_SIDE_FRACTION * size)


def margin_px(size: int) -> int:
    """Minimum gap in pixels between two bboxes along their relation axis."""
    return max(1, size // 16)

# ----------------------------------------------------------------------------- geometry
def classify_relation(a: Sequence[int], b: Sequence[int], margin: int = 1) -> str | None:
    """The relation R with "A R B" under the module's rule, or None (bboxes [x0, y0, x1, y1])."""
    return _relation(a, b, margin, math.ceil(min(a[2] - a[0], b[2] - b[0]) / 2))


def follows_layout_rule(boxes: Sequence[Sequence[float]], relation: str | None) -> bool:
    """Whether boxes in [0, 1] of the canvas ([x0, y0, x1, y1]; one, or two with `relation` for "A R B")
    form a layout this module writes: every side in [MIN_SIDE_FRACTION, MAX_SIDE_FRACTION], and for two,
    `classify_relation`'s rule in canvas units (a gap of >= 1/16 along the relation's axis, an overlap of
    >= half the smaller width across it). Every `layout_scene` at a size that is a multiple of 16, divided
    by that size, follows it; the layout stage's plans are checked against it (`modules.stages.layout`)."""
    if len(boxes) not in (1, 2) or (len(boxes) == 2) != (relation is not None):
        return False
    eps = 1e-9  # pixels / size in floats
    lo, hi = MIN_SIDE_FRACTION - eps, MAX_SIDE_FRACTION + eps
    if not all(lo <= x1 - x0 <= hi and lo <= y1 - y0 <= hi for x0, y0, x1, y1 in boxes):
        return False
    if len(boxes) == 1:
        return True
    a, b = boxes
    return _relation(a, b, MARGIN_FRACTION - eps, min(a[2] - a[0], b[2] - b[0]) / 2 - eps) == relation


def _relation(a: Sequence[float], b: Sequence[float], margin: float, min_overlap: float) -> str | None:
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
