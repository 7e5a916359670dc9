"""Hard-negative captions (NegCLIP) and the binding probes: exact on the shapes grammar, order
perturbations on free text, deterministic, and carried into training batches as tokens."""

from __future__ import annotations

import random

import pytest
import torch

from datamodules.image_text import ImageTextDataModule, LoaderConfig
from datamodules.negatives import ShapesNegatives, WordSwapNegatives, binding_foils
from datamodules.shapes.grammar import evaluation_captions, parse_caption
from modules.stages.clip import caption_content


def scene(text: str) -> tuple:
    """What a caption says, phrasing and template aside."""
    return caption_content(text)


@pytest.mark.parametrize("text", ["a red circle to the left of a blue square", "a photo of a green triangle above a green square",
                                  "a purple square", "an image of an orange circle below a red circle"])
def test_shapes_negatives_change_the_scene_and_keep_the_grammar(text: str) -> None:
    negatives = ShapesNegatives(num=8).negatives(text, random.Random(0))
    assert len(negatives) == 8
    for neg in negatives:
        parse_caption(neg)  # in the grammar
        assert scene(neg) != scene(text), neg  # never the same scene in other words


def test_the_positive_is_the_mirrored_phrasing_of_the_same_scene() -> None:
    gen = ShapesNegatives(num=1, rephrase_prob=1.0)
    text = "a red circle to the left of a blue square"
    assert gen.positive(text, random.Random(0)) == "a blue square to the right of a red circle"
    assert scene(gen.positive(text, random.Random(0))) == scene(text)
    assert ShapesNegatives(num=1).positive(text, random.Random(0)) == text  # rephrase_prob 0


def test_colour_swap_and_relation_reversal_are_among_the_negatives() -> None:
    text = "a red circle to the left of a blue square"
    pool = set(ShapesNegatives(num=200).negatives(text, random.Random(1)))
    assert {"a blue circle to the left of a red square", "a red circle to the right of a blue square",
            "a red square to the left of a blue circle"} <= pool
    assert binding_foils(text) == {"relation": "a red circle to the right of a blue square",
                                   "attribution": "a blue circle to the left of a red square"}
    assert binding_foils("a red circle") == {} and binding_foils("a dog on a mat") == {}
    assert "attribution" not in binding_foils("a red circle above a red square")  # a swap would change nothing


def test_word_swaps_for_free_text() -> None:
    gen = WordSwapNegatives(num=3)
    negs = gen.negatives("a white dog chasing a black cat", random.Random(0))
    assert negs and all(n == "a black dog chasing a white cat" for n in negs)  # the two attribute words swapped
    other = gen.negatives("a horse riding an astronaut", random.Random(0))
    assert all(sorted(n.split()) == sorted("a horse riding an astronaut".split()) and n != "a horse riding an astronaut" for n in other)
    with pytest.raises(ValueError, match="negatives.num"):
        WordSwapNegatives(num=0)


def test_training_batches_carry_negative_tokens_deterministically(tiny_shards) -> None:
    pattern, _ = tiny_shards

    def first_batch():
        dm = ImageTextDataModule(pattern, image_size=16, tokenizer="tiny-vit", shuffle_buffer=0,
                                 negatives=WordSwapNegatives(num=2), loader=LoaderConfig(batch_size=4, num_workers=0))
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))

    a, b = first_batch(), first_batch()
    assert a["negative_tokens"].shape[:2] == (4, 2) and a["negative_tokens"].shape[2] == a["tokens"].shape[1]
    assert torch.equal(a["negative_tokens"], b["negative_tokens"])
    assert dm_hparams_are_plain()


def dm_hparams_are_plain() -> bool:
    dm = ImageTextDataModule("x-{000000..000001}.tar", tokenizer=None, negatives=ShapesNegatives(num=2, rephrase_prob=0.5))
    return dm.hparams["negatives"] == {"class": "ShapesNegatives", "num": 2, "rephrase_prob": 0.5}


def test_evaluation_captions_cover_the_grammar() -> None:
    captions = evaluation_captions(num_single=180, num_pairs=180)
    assert len(captions) == 540 and len(set(captions)) >= 400  # 90 single captions exist (18 objects x 5 templates)
    parsed = [parse_caption(c) for c in captions]
    singles = [objs[0] for objs, rel, _ in parsed if rel is None]
    assert len(singles) == 180 and len(set(singles)) == 18 and all(singles.count(o) == 10 for o in set(singles))
    pairs = [(objs, rel) for objs, rel, _ in parsed if rel is not None]
    assert {rel for _, rel in pairs} == {"to the left of", "to the right of", "above", "below"}
    assert sum(objs[0].color == objs[1].color for objs, _ in pairs) >= 40  # same-colour pairs
    # both phrasings of every scene, next to each other
    assert all(scene(captions[180 + 2 * i]) == scene(captions[181 + 2 * i]) for i in range(180))
    assert evaluation_captions(num_single=180, num_pairs=180) == captions
