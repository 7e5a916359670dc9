"""Object layouts from each sample's `{key}.json`: boxes and phrases for layout-grounded training.

The json names its objects as the shapes shards write them (`{"objects": [{"bbox": [x0, y0, x1, y1],
"color": ..., "shape": ...}, ...]}`, pixels of the stored image), or with a free-text `"phrase"`
per object instead of colour and shape (grounding data such as COCO boxes with their captions'
noun phrases). `ReadLayout` turns it into the fields the layout prior and a layout-conditioned
decoder read: `layout_boxes` (K, 4) in [0, 1] of the centre-cropped square the image transform
cuts (`steps.resize_center_crop`), `layout_mask` (K,), `layout_phrases` (K strings, "" for an
empty slot) and `layout_relation` (the json's `relation` between the first two objects, "" if none).
A sample whose json is missing or malformed is skipped and counted, its key and field named in the
log.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator

import torch

from datamodules.shapes.grammar import phrase
from datamodules.steps import Sample, SkipCounter


def object_phrase(obj: dict[str, Any], where: str) -> str:
    """An object's phrase: its `phrase`, or the shapes grammar's from `color` and `shape`."""
    text = obj.get("phrase")
    if text is None and isinstance(obj.get("color"), str) and isinstance(obj.get("shape"), str):
        text = phrase(obj)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: needs a non-empty string 'phrase', or strings 'color' and 'shape'")
    return text.strip()


def layout_from_json(raw: bytes, width: int, height: int, slots: int) -> tuple[torch.Tensor, torch.Tensor, list[str], str]:
    """(boxes (K, 4) in the centre crop's [0, 1] coordinates, mask (K,), phrases, relation) from json
    bytes describing an image of width x height pixels; raises ValueError naming the bad field."""
    try:
        truth = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"json: not valid UTF-8 JSON ({exc})") from None
    objects = truth.get("objects") if isinstance(truth, dict) else None
    if not isinstance(objects, list) or not objects:
        raise ValueError("json.objects: expected a non-empty list of objects")
    if len(objects) > slots:
        raise ValueError(f"json.objects: {len(objects)} objects, more than layout_slots {slots}")
    relation = truth.get("relation") or ""
    if not isinstance(relation, str) or (relation and len(objects) < 2):
        raise ValueError("json.relation: expected a string relating the first two objects, or null")
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    boxes, mask, phrases = torch.zeros(slots, 4), torch.zeros(slots, dtype=torch.bool), [""] * slots
    for k, obj in enumerate(objects):
        where = f"json.objects[{k}]"
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected an object")
        bbox = obj.get("bbox")
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
            raise ValueError(f"{where}.bbox: expected [x0, y0, x1, y1] in pixels")
        x0, y0, x1, y1 = (float(v) for v in bbox)
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(f"{where}.bbox: {bbox} is not a box inside the {width}x{height} image")
        box = torch.tensor([(x0 - left) / side, (y0 - top) / side, (x1 - left) / side, (y1 - top) / side])
        boxes[k], mask[k], phrases[k] = box.clamp(0.0, 1.0), True, object_phrase(obj, where)
    return boxes, mask, phrases, relation.strip()


class ReadLayout:
    """Pipeline step: the raw `json` member -> `layout_boxes`, `layout_mask`, `layout_phrases`
    and `layout_relation` (see the module docstring); runs before the image transform, on the decoded
    full-size image."""

    def __init__(self, counter: SkipCounter, slots: int) -> None:
        self.counter, self.slots = counter, slots

    def __call__(self, src: Iterable[Sample]) -> Iterator[Sample]:
        for sample in src:
            raw = sample.pop("json")
            try:
                boxes, mask, phrases, relation = layout_from_json(raw, *sample["image"].size, self.slots)
            except ValueError as exc:
                self.counter.skip("bad_layout", f"{sample.get('key', '?')}: {exc}")
                continue
            yield {**sample, "layout_boxes": boxes, "layout_mask": mask, "layout_phrases": phrases,
                   "layout_relation": relation}

