"""Deterministic compositional evaluator for the built-in shapes domain.

Reads an image, finds the coloured objects and names them, so generated images can be scored
against their prompt without a learned model:

1. colour: every pixel is assigned to the nearest palette colour (`datamodules.shapes.COLORS`)
   or to the white background, if it is within `max_color_distance` of it (RGB euclidean);
2. objects: connected components per colour, small fragments (anti-aliased edges, noise)
   dropped below `min_area_fraction` of the image, and so are slivers thinner than
   `min_thickness_fraction` of the image side: the 1-px seam of blended colour along a drawn
   object's edge (orange on white blends to yellow, red to orange), never an object (the domain's
   smallest side is a quarter of the image, `datamodules.shapes.scene.side_range`);
3. shape: the domain's shapes are axis-aligned and touch their box; the apex-up triangle has 3x
   its top half's pixels in its bottom half (ideally), a square fills all four corners of its box,
   the inscribed disc none (`_shape_of`);
4. relation between two objects: the dominant axis of the centre offset, as in the generator.

`evaluate_image(image, caption)` scores one image; `accuracy_table` aggregates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
from PIL import Image
from scipy import ndimage

from datamodules.shapes.grammar import COLORS, Obj, Relation, parse_caption

PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # (6, 3)
PALETTE_NAMES = list(COLORS)
WHITE = np.array([255, 255, 255], dtype=np.float32)


@dataclass(frozen=True)
class Detection:
    color: str
    shape: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (half-open)
    area: int

    @property
    def obj(self) -> Obj:
        return Obj(self.color, self.shape)

    @property
    def center(self) -> tuple[float, float]:
        return (self.bbox[0] + self.bbox[2]) / 2, (self.bbox[1] + self.bbox[3]) / 2


@dataclass
class EvaluatorConfig:
    max_color_distance: float = 90.0
    min_area_fraction: float = 0.01
    min_thickness_fraction: float = 1 / 16  # a component's bbox, both sides; 0: no sliver rule
    apex_mass_ratio: float = 1.8  # bottom half / top half pixels: a triangle (ideal 3; disc, square 1)
    corner_fraction: float = 0.25  # corner patches, as a fraction of the bbox's shorter side
    corner_min_fill: float = 0.5  # every corner patch this full: a square (a drawn disc's: 0.3)


def _as_array(image: Any) -> np.ndarray:
    """PIL image, (H, W, 3) uint8 array or (3, H, W) float tensor in [0, 1] -> (H, W, 3) float32."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if hasattr(image, "detach"):  # torch tensor (3, H, W) in [0, 1]
        return image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0
    arr = np.asarray(image, dtype=np.float32)
    return arr if arr.max() > 1.5 else arr * 255.0


def _shape_of(mask: np.ndarray, cfg: EvaluatorConfig) -> str:
    """Classify a component's pixels (cropped to its bbox): triangle by its apex-up mass, then square
    or circle by whether every corner patch of the box is at least half full.

    Not the fill ratio area / bbox-area (square 1, disc pi/4, triangle 1/2) that this replaced: a
    decoder's edge that falls between pixels fills part of one more row or column on each side,
    which cost a 22-px square 11% of its box, so it read as a circle, while each 6 x 6 corner patch
    stays more than half full. A disc cut by the canvas stays under the triangle's mass ratio (one
    without its bottom third, drawn at 16 to 64 px: 1.5). On the demo pipeline's 32-px images of a
    held-out prompt set (270, seed 2) the two rules disagreed on 16 images; looked at, this one was
    right on 8, the fill ratio on 4 (objects of 8 px and less), neither on 4.
    """
    h, half = mask.shape[0], mask.shape[0] // 2
    if half and mask[h - half:].sum() >= cfg.apex_mass_ratio * mask[:half].sum():
        return "triangle"
    k = max(1, round(cfg.corner_fraction * min(mask.shape)))
    corners = (mask[:k, :k], mask[:k, -k:], mask[-k:, :k], mask[-k:, -k:])
    return "square" if min(c.mean() for c in corners) >= cfg.corner_min_fill else "circle"


def detect_objects(image: Any, cfg: EvaluatorConfig | None = None) -> list[Detection]:
    """Coloured objects in an image, largest first."""
    cfg = cfg or EvaluatorConfig()
    rgb = _as_array(image)  # (H, W, 3)
    h, w, _ = rgb.shape
    dist = np.linalg.norm(rgb[:, :, None, :] - PALETTE[None, None], axis=-1)  # (H, W, 6)
    nearest = dist.argmin(-1)
    near_enough = dist.min(-1) <= cfg.max_color_distance
    background = np.linalg.norm(rgb - WHITE, axis=-1) < dist.min(-1)
    min_area = max(4, int(cfg.min_area_fraction * h * w))
    min_thickness = cfg.min_thickness_fraction * min(h, w)
    found: list[Detection] = []
    for c, name in enumerate(PALETTE_NAMES):
        mask = (nearest == c) & near_enough & ~background
        if mask.sum() < min_area:
            continue
        labels, n = ndimage.label(mask)
        for idx, sl in enumerate(ndimage.find_objects(labels), start=1):
            comp = labels[sl] == idx
            area = int(comp.sum())
            if area < min_area or min(comp.shape) < min_thickness:
                continue
            bbox = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
            found.append(Detection(name, _shape_of(comp, cfg), bbox, area))
    return sorted(found, key=lambda d: -d.area)


def relation_between(a: Detection, b: Detection) -> str:
    """"A R B" from the dominant axis of the centre offset (image y grows downwards)."""
    dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
    if abs(dx) >= abs(dy):
        return Relation.LEFT.value if dx > 0 else Relation.RIGHT.value
    return Relation.ABOVE.value if dy > 0 else Relation.BELOW.value


def evaluate_image(image: Any, caption: str, cfg: EvaluatorConfig | None = None) -> dict[str, Any]:
    """Score one image against its shapes caption.

    `objects_correct`: the detected objects are exactly the caption's (colour and shape);
    `relation_correct`: for two objects, the relation between the detected subject and object
    is the caption's; `correct`: both (single-object captions need only the objects).
    """
    expected, relation, _ = parse_caption(caption)
    detections = detect_objects(image, cfg)
    detected = [d.obj for d in detections]
    objects_correct = sorted(detected) == sorted(expected)
    relation_correct = None
    if relation is not None:
        relation_correct = False
        if objects_correct:
            subject = next(d for d in detections if d.obj == expected[0])
            other = next(d for d in detections if d.obj == expected[1])
            relation_correct = relation_between(subject, other) == relation
    correct = objects_correct and (relation_correct is not False)
    return {
        "caption": caption,
        "num_objects": len(expected),
        "detected": [f"{o.color} {o.shape}" for o in detected],
        "objects_correct": objects_correct,
        "relation_correct": relation_correct,
        "correct": correct,
        **geneval_checks(expected, relation, detections),
    }


def _contains(found: list[Any], wanted: list[Any]) -> bool:
    """Every item of `wanted` is in `found`, counted with multiplicity."""
    rest = list(found)
    for item in wanted:
        if item not in rest:
            return False
        rest.remove(item)
    return True


def geneval_checks(expected: list[Obj], relation: str | None, detections: list[Detection]) -> dict[str, Any]:
    """The looser GenEval checks (Ghosh et al. 2023), where extra objects are allowed:
    `shapes_present` (the prompted shapes, any colour: GenEval's object presence),
    `colors_bound` (the prompted colour-shape pairs: "colors" for one object, "color
    attribution" for two), `position_correct` (the prompted shapes in the prompted relation,
    colour ignored unless two prompted objects share a shape)."""
    shapes_present = _contains([d.shape for d in detections], [o.shape for o in expected])
    colors_bound = _contains([d.obj for d in detections], expected)
    position = None
    if relation is not None:
        position = False
        a, b = expected
        key = (lambda d: d.obj) if a.shape == b.shape else (lambda d: d.shape)
        want_a, want_b = (a, b) if a.shape == b.shape else (a.shape, b.shape)
        subject = next((d for d in detections if key(d) == want_a), None)
        other = next((d for d in detections if key(d) == want_b and d is not subject), None)
        if subject is not None and other is not None:
            position = relation_between(subject, other) == relation
    return {"shapes_present": shapes_present, "colors_bound": colors_bound, "position_correct": position}


def _fraction(rows: list[dict[str, Any]], key: str) -> float | None:
    """The share of `rows` whose `key` is true (None without rows)."""
    return float(np.mean([bool(r[key]) for r in rows])) if rows else None


def accuracy_table(results: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Single-object accuracy (colour and shape right), two-object accuracy (both objects and
    the relation right), and two-object object-only accuracy (binding without the relation)."""
    results = list(results)
    single = [r for r in results if r["num_objects"] == 1]
    double = [r for r in results if r["num_objects"] == 2]
    frac = _fraction
    return {
        "n_single": len(single),
        "n_two": len(double),
        "single_object_accuracy": frac(single, "correct"),
        "two_object_accuracy": frac(double, "correct"),
        "two_object_objects_accuracy": frac(double, "objects_correct"),
        "overall_accuracy": frac(results, "correct"),
        "geneval": geneval_table(single, double),
    }


def geneval_table(single: list[dict[str, Any]], double: list[dict[str, Any]]) -> dict[str, float | None]:
    """GenEval's task scores on this domain (Ghosh et al. 2023, github.com/djghosh13/geneval; no
    counting task): single object, two objects present, colours, position, colour attribution,
    and overall = their mean. For scale, DALL·E 2 scores .94 / .66 / .77 / .10 / .19 there."""
    frac = _fraction
    scores = {
        "single_object": frac(single, "shapes_present"),
        "two_object": frac(double, "shapes_present"),
        "colors": frac(single, "colors_bound"),
        "position": frac(double, "position_correct"),
        "color_attribution": frac(double, "colors_bound"),
    }
    known = [v for v in scores.values() if v is not None]
    return {**scores, "overall": float(np.mean(known)) if known else None}
