"""Hard-negative captions for contrastive training (NegCLIP; Yuksekgonul et al. 2023, "When and why
vision-language models behave like bags-of-words, and what to do about it").

A CLIP trained on captions alone can match "a red circle to the left of a blue square" to an image
of a blue circle left of a red square: nothing in a random batch asks it to tell them apart. NegCLIP
adds, for every caption, captions with the same words in a wrong composition as extra negatives,
and trains on both phrasings of a scene as positives. Here that is a pluggable part of the image /
caption DataModule (`ImageTextDataModule(negatives=...)`): a `CaptionNegatives` turns a caption into
`num` hard negatives and, optionally, another phrasing of the same content (the positive used in
place of the caption). Two implementations:

- `ShapesNegatives`: exact, grammar-based, for the built-in shapes data (colours swapped between
  the objects, shapes swapped, the relation reversed, one attribute changed); the positive is the
  mirrored phrasing ("A left of B" -> "B right of A").
- `WordSwapNegatives`: for free text, NegCLIP's word-order perturbations: two words of one kind
  (adjectives from a colour / size list, or any two content words) swapped. No positive.

Everything is a pure function of (caption, `random.Random`), so the pipeline step that applies it
(`AddNegatives`, seeded per sample) gives the same negatives in every run and worker layout.
"""

from __future__ import annotations

import random
import re
import zlib
from typing import Iterable, Iterator

from datamodules.shapes.grammar import ALL_OBJECTS, COLORS, INVERSE, RELATIONS, SHAPES, Obj, caption, parse_caption
from datamodules.steps import Sample


class CaptionNegatives:
    """Base class (the YAML `class_path` of `negatives:`): `num` hard negatives per caption."""

    def __init__(self, num: int = 3, rephrase_prob: float = 0.0) -> None:
        if num < 1:
            raise ValueError(f"negatives.num: must be at least 1, got {num}")
        if not 0.0 <= rephrase_prob <= 1.0:
            raise ValueError(f"negatives.rephrase_prob: must lie in [0, 1], got {rephrase_prob}")
        self.num, self.rephrase_prob = num, rephrase_prob

    def negatives(self, text: str, rng: random.Random) -> list[str]:
        """`num` captions that use the caption's words but describe another scene."""
        raise NotImplementedError

    def positive(self, text: str, rng: random.Random) -> str:
        """Another phrasing of the same content (default: the caption itself)."""
        return text


class ShapesNegatives(CaptionNegatives):
    """Grammar-exact negatives for shapes captions (a caption outside the grammar gets word swaps).

    Two objects: colours swapped between them, shapes swapped, the relation reversed (same
    phrasing order, so only the relation word changes meaning), and one object's colour or shape
    changed; one object: its colour or its shape changed. Never the same scene in other words.
    """

    def negatives(self, text: str, rng: random.Random) -> list[str]:
        try:
            objects, relation, template = parse_caption(text)
        except ValueError:
            return WordSwapNegatives(self.num).negatives(text, rng)
        pool = _scene_negatives(objects, relation)
        pool = [c for c in dict.fromkeys(caption(objs, rel, template) for objs, rel in pool) if c != text]
        return [pool[rng.randrange(len(pool))] for _ in range(self.num)]

    def positive(self, text: str, rng: random.Random) -> str:
        if self.rephrase_prob == 0.0 or rng.random() >= self.rephrase_prob:
            return text
        try:
            objects, relation, template = parse_caption(text)
        except ValueError:
            return text
        if relation is None:
            return text
        return caption([objects[1], objects[0]], INVERSE[relation], template)


def _scene_negatives(objects: list[Obj], relation: str | None) -> list[tuple[list[Obj], str | None]]:
    """(objects, relation) of scenes that differ from the given one in composition."""
    if relation is None:
        (obj,) = objects
        return [([Obj(c, obj.shape)], None) for c in COLORS if c != obj.color] + \
               [([Obj(obj.color, s)], None) for s in SHAPES if s != obj.shape]
    a, b = objects
    out: list[tuple[list[Obj], str | None]] = []
    if a.color != b.color:
        out.append(([Obj(b.color, a.shape), Obj(a.color, b.shape)], relation))  # colours swapped
    if a.shape != b.shape:
        out.append(([Obj(a.color, b.shape), Obj(b.color, a.shape)], relation))  # shapes swapped
    out.append(([a, b], INVERSE[relation]))  # relation reversed
    others = [r for r in RELATIONS if r not in (relation, INVERSE[relation])]
    out += [([a, b], r) for r in others]  # the other axis
    for i in range(2):
        for o in ALL_OBJECTS:
            if o not in objects and (o.color == objects[i].color or o.shape == objects[i].shape):
                pair = [o, b] if i == 0 else [a, o]
                out.append((pair, relation))  # one attribute of one object changed
    return out


def binding_foils(text: str) -> dict[str, str]:
    """ARO-style probes of a two-object shapes caption (Yuksekgonul et al. 2023): the same words
    with the colours swapped between the objects (`attribution`) and with the relation reversed
    (`relation`); empty for other captions. A model that binds prefers the caption to both."""
    try:
        objects, relation, template = parse_caption(text)
    except ValueError:
        return {}
    if relation is None:
        return {}
    a, b = objects
    foils = {"relation": caption([a, b], INVERSE[relation], template)}
    if a.color != b.color:
        foils["attribution"] = caption([Obj(b.color, a.shape), Obj(a.color, b.shape)], relation, template)
    return foils


# Words whose order carries meaning in free captions (NegCLIP swaps within such classes).
ATTRIBUTE_WORDS = frozenset([*COLORS, "white", "black", "brown", "pink", "grey", "gray", "gold", "silver",
                             "big", "small", "large", "little", "tall", "short", "young", "old", "wooden", "metal"])
STOP_WORDS = frozenset("a an the of on in at to with and or is are its it this that from by for near next".split())
_WORD = re.compile(r"[A-Za-z]+")


class WordSwapNegatives(CaptionNegatives):
    """NegCLIP-style order perturbations for any caption: two attribute words swapped when the
    caption has two different ones, otherwise two different content words swapped. A caption with
    fewer than two content words gets a word-reversed copy (still a different string)."""

    def negatives(self, text: str, rng: random.Random) -> list[str]:
        spans = [(m.start(), m.end(), m.group()) for m in _WORD.finditer(text)]
        content = [s for s in spans if s[2].lower() not in STOP_WORDS]
        attributes = [s for s in content if s[2].lower() in ATTRIBUTE_WORDS]
        out = []
        for _ in range(self.num):
            group = attributes if len({s[2].lower() for s in attributes}) >= 2 else content
            pairs = [(x, y) for i, x in enumerate(group) for y in group[i + 1:] if x[2].lower() != y[2].lower()]
            if not pairs:
                out.append(" ".join(reversed(text.split())))
                continue
            x, y = pairs[rng.randrange(len(pairs))]
            out.append(text[: x[0]] + y[2] + text[x[1] : y[0]] + x[2] + text[y[1] :])
        return out


class AddNegatives:
    """Pipeline step: `sample["caption"]` replaced by its positive phrasing and
    `sample["negatives"]` set to its hard negatives, drawn from a generator seeded by (seed, the
    sample's key, its position in this worker's stream): deterministic for a run, and a sample
    seen again later in the stream gets other negatives."""

    def __init__(self, negatives: CaptionNegatives, seed: int) -> None:
        self.negatives, self.seed = negatives, seed

    def __call__(self, src: Iterable[Sample]) -> Iterator[Sample]:
        for position, sample in enumerate(src):
            key = zlib.crc32(f"{sample['key']}/{position}".encode())
            rng = random.Random(self.seed * 1_000_003 + key)
            sample["caption"] = self.negatives.positive(sample["caption"], rng)
            sample["negatives"] = self.negatives.negatives(sample["caption"], rng)
            yield sample
