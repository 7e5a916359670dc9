"""The shapes grammar: colours, shapes, relations and caption templates; captions from a scene
description and back (`describe` / `parse_caption`).

Shared by the shard writer, the CLIP stage's zero-shot probe, the compositional evaluator and the
demo, so that every one of them reads and writes the same language.
"""

from __future__ import annotations

import random
import re
from enum import Enum
from typing import Any, NamedTuple


class Shape(str, Enum):
    CIRCLE = "circle"
    SQUARE = "square"
    TRIANGLE = "triangle"


class Relation(str, Enum):
    LEFT = "to the left of"
    RIGHT = "to the right of"
    ABOVE = "above"
    BELOW = "below"


COLORS: dict[str, tuple[int, int, int]] = {  # exact fill RGB
    "red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
    "yellow": (230, 200, 40), "purple": (140, 60, 180), "orange": (240, 130, 30)}
SHAPES: tuple[str, ...] = tuple(s.value for s in Shape)
RELATIONS: tuple[str, ...] = tuple(r.value for r in Relation)
TEMPLATES: tuple[str, ...] = ("{}", "a photo of {}", "a picture of {}", "an image of {}", "a drawing of {}")


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


# ----------------------------------------------------------------------------- captions
def phrase(obj: dict[str, Any]) -> str:
    """One object's noun phrase: "a red circle", "an orange square"."""
    article = "an" if obj["color"][0] in "aeiou" else "a"
    return f"{article} {obj['color']} {obj['shape']}"


def describe(truth: dict[str, Any]) -> str:
    """Caption of a truth dict: its template filled with "a red circle [REL a blue square]"."""
    objs = truth["objects"]
    text = phrase(objs[0])
    if truth.get("relation"):
        text = f"{text} {truth['relation']} {phrase(objs[1])}"
    return truth.get("template", "{}").format(text)


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


# ----------------------------------------------------------------------------- evaluation prompts
INVERSE: dict[str, str] = {
    Relation.LEFT.value: Relation.RIGHT.value, Relation.RIGHT.value: Relation.LEFT.value,
    Relation.ABOVE.value: Relation.BELOW.value, Relation.BELOW.value: Relation.ABOVE.value,
}


def caption(objects: list[Obj], relation: str | None = None, template: str = "{}") -> str:
    """The grammar's caption of one object, or of two objects and a relation."""
    truth = {"objects": [o._asdict() for o in objects], "relation": relation, "template": template}
    return describe(truth)


def evaluation_captions(num_single: int = 180, num_pairs: int = 180, seed: int = 0) -> list[str]:
    """A deterministic prompt set that covers the grammar: every colour-shape pair equally often
    alone (`num_single`, templates cycled), and `num_pairs` two-object scenes each asked in both
    phrasings ("A left of B" and "B right of A"), the four relations equally often, with
    same-colour pairs among them (every sixth scene). `2 * num_pairs` two-object captions."""
    rng = random.Random(seed)
    singles = [caption([ALL_OBJECTS[i % len(ALL_OBJECTS)]], None, TEMPLATES[(i // len(ALL_OBJECTS)) % len(TEMPLATES)])
               for i in range(num_single)]
    pairs = [(a, b) for a in ALL_OBJECTS for b in ALL_OBJECTS if a != b]
    same_colour = [(a, b) for a, b in pairs if a.color == b.color]
    doubles: list[str] = []
    for i in range(num_pairs):
        a, b = rng.choice(same_colour if i % 6 == 5 else pairs)
        relation = RELATIONS[i % len(RELATIONS)]
        template = TEMPLATES[rng.randrange(len(TEMPLATES))]
        doubles += [caption([a, b], relation, template), caption([b, a], INVERSE[relation], template)]
    return singles + doubles
