"""ImageTextDataModule: round trip, bad samples, sharding over ranks x workers, pickled pipelines
and spawned workers, errors."""

from __future__ import annotations

import itertools
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import shards, steps
from datamodules.image_text import ImageTextDataModule, LoaderConfig
from tests.conftest import png_bytes, sample_members, write_tar


def _dm(pattern: str, loader: dict | None = None, **kw) -> ImageTextDataModule:
    """A set-up DataModule: batch 4, no loader workers unless `loader` says otherwise."""
    args = dict(train_shards=pattern, val_shards=pattern, image_size=16, tokenizer=None,
                loader=LoaderConfig(**{"batch_size": 4, "num_workers": 0, **(loader or {})}))
    args.update(kw)
    dm = ImageTextDataModule(**args)
    dm.setup("fit")
    return dm


def _keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


def test_round_trip_exact_captions_and_pixels(tiny_shards):
    pattern, truth = tiny_shards
    dm = _dm(pattern, val_samples=100, loader=dict(val_batch_size=5))
    seen = 0
    for batch in dm.val_dataloader():
        for key, image, caption in zip(batch["key"], batch["image"], batch["caption"]):
            arr, want = truth[key]
            assert caption == want
            back = ((image + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
            np.testing.assert_array_equal(back, arr)
            seen += 1
    assert seen == len(truth)


def test_tokens_are_open_clip_ids(tiny_shards):
    pattern, truth = tiny_shards
    dm = _dm(pattern, tokenizer="ViT-B-32", val_samples=4)
    batch = next(iter(dm.val_dataloader()))
    assert batch["tokens"].shape == (4, 77) and batch["tokens"].dtype == torch.long
    assert (batch["tokens"][:, 0] == 49406).all()  # start-of-text


@pytest.mark.parametrize("pickled", [False, True], ids=["as_built", "pickled"])
def test_bad_samples_skipped_and_counted(tmp_path: Path, pickled: bool):
    """Each bad sample is skipped and counted once; a pickled pipeline (what a spawned worker
    runs) still reports the counts, so its stages still share one counter."""
    good = np.full((16, 16, 3), 7, np.uint8)
    members = sample_members("a", good, "fine")
    members += [("b.png", b"not a png at all"), ("b.txt", b"bad image")]
    members += [("c.png", png_bytes(good))]  # no caption
    members += [("d.png", png_bytes(good)), ("d.txt", b"   ")]
    members += [("e.png", png_bytes(good)), ("e.txt", b"\xff\xfe\xfa")]
    members += [("f.png", png_bytes(good)), ("f.txt", b"x" * 100_000)]
    members += sample_members("g", good, "also fine")
    write_tar(tmp_path / "s-000000.tar", members)
    # A truncated shard: the first sample survives, the rest is cut mid-member.
    write_tar(tmp_path / "s-000001.tar", sample_members("h", good, "before the cut") + sample_members("i", good, "lost"))
    data = (tmp_path / "s-000001.tar").read_bytes()
    cut = data.find(b"i.png") + 512 + 40  # inside the second sample's PNG bytes
    (tmp_path / "s-000001.tar").write_bytes(data[:cut])
    dm = _dm(str(tmp_path / "s-{000000..000001}.tar"), shuffle_buffer=0, loader=dict(batch_size=1))
    loader = dm.train_dataloader()
    skipped: dict[str, int] = {}
    keys = []
    for batch in pickle.loads(pickle.dumps(loader.dataset)) if pickled else loader:
        keys += batch["key"]
        for reason, n in batch["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    assert sorted(keys) == ["a", "g", "h"]
    assert skipped.get("bad_image") == 1
    assert skipped.get("missing_caption") == 1
    assert skipped.get("empty_caption") == 1
    assert skipped.get("caption_not_utf8") == 1
    assert skipped.get("caption_too_long") == 1
    assert skipped.get("unreadable_tar") == 1


def test_every_sample_once_per_epoch_over_ranks_and_workers(tiny_shards):
    pattern, truth = tiny_shards
    per_epoch: list[list[str]] = []
    for epoch in range(2):
        keys: list[str] = []
        for rank in range(2):
            dm = ImageTextDataModule(pattern, image_size=16, tokenizer=None, seed=3, loader=LoaderConfig(batch_size=1, num_workers=2))
            dm.setup("fit")
            dm.rank, dm.world_size = rank, 2
            loader = dm.train_dataloader()
            loader.epoch = epoch
            rank_keys = _keys(loader)
            assert rank_keys, "each rank must get samples"
            keys += rank_keys
        assert sorted(keys) == sorted(truth), "every sample exactly once per epoch"
        per_epoch.append(keys)
    assert per_epoch[0] != per_epoch[1], "the (seed, epoch) shuffle changes the order between epochs"


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_spawned_workers_give_the_forked_batches(tiny_shards, method: str):
    """The pipeline pickles, tokenizer and all: loader workers started by `spawn` or a forkserver
    yield exactly the batches forked ones do (keys, pixels, tokens)."""
    pattern, _ = tiny_shards
    runs = {}
    for context in (None, method):
        dm = _dm(pattern, tokenizer="ViT-B-32", seed=1, shuffle_buffer=4, loader=dict(num_workers=2, multiprocessing_context=context))
        runs[context] = list(dm.train_dataloader())
    forked, spawned = runs[None], runs[method]
    assert len(forked) == len(spawned) == 6  # 2 workers x 2 shards x 6 samples / batch 4
    for a, b in zip(forked, spawned):
        assert a["key"] == b["key"]
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
        torch.testing.assert_close(a["tokens"], b["tokens"], rtol=0, atol=0)


def test_unknown_start_method_is_one_clear_error():
    with pytest.raises(ValueError, match="multiprocessing_context: 'threads'"):
        LoaderConfig(multiprocessing_context="threads")


def test_shard_order_deterministic_in_seed_and_epoch():
    urls = [f"u{i}" for i in range(10)]
    a = shards.ShardList(urls, seed=1)
    first = [d["url"] for d in a]
    second = [d["url"] for d in a]  # epoch advanced
    b = shards.ShardList(urls, seed=1)
    assert [d["url"] for d in b] == first
    assert first != second and sorted(first) == sorted(urls)


def test_resampled_mode_yields_fixed_epoch_length(tiny_shards):
    pattern, _ = tiny_shards
    dm = _dm(pattern, resampled=True, epoch_samples=12, loader=dict(batch_size=3, num_workers=0))
    batches = list(dm.train_dataloader())
    assert len(batches) == 4 and all(len(b["key"]) == 3 for b in batches)


def test_pattern_matching_nothing_is_one_clear_error(tmp_path: Path):
    pattern = str(tmp_path / "nothing-{000000..000003}.tar")
    with pytest.raises(shards.ShardPatternError, match="nothing-"):
        _dm(pattern)
    with pytest.raises(shards.ShardPatternError, match="pipe:"):
        shards.expand_shards("pipe:curl http://example/x.tar")


def test_mirror_caption_swaps_left_and_right_words_only() -> None:
    from datamodules.steps import mirror_caption

    assert mirror_caption("a red circle to the left of a blue square") == "a red circle to the right of a blue square"
    assert mirror_caption("Right of the LEFT door, a bright leftover") == "Left of the RIGHT door, a bright leftover"
    for text in ("a red circle above a blue square", "left right left", "no relation here"):
        assert mirror_caption(mirror_caption(text)) == text  # an involution


def test_flipped_shapes_scenes_keep_true_captions() -> None:
    """hflip with mirrored captions: every flipped two-object scene's caption still names the
    relation the evaluator reads off the flipped image (and its negatives are mirrored too);
    without mirroring the flipped left/right captions are false."""
    from datamodules.shapes.grammar import Obj, caption, parse_caption
    from datamodules.shapes.scene import draw_scene, layout_scene
    from datamodules.steps import ImageTransform
    from modules.evaluation.shapes_evaluator import detect_objects, relation_between

    a, b = Obj("red", "circle"), Obj("blue", "triangle")
    samples = []
    for i, relation in enumerate(["to the left of", "to the right of", "above", "below"] * 6):
        truth = layout_scene(np.random.default_rng(i), 32, [a, b], relation)
        samples.append({"image": draw_scene(truth, 32), "key": str(i), "caption": caption([a, b], relation),
                        "negatives": [caption([b, a], relation)]})

    def relations(transform: ImageTransform) -> list[tuple[str, str, list[str]]]:
        out = []
        for s in transform(iter(samples)):
            found = detect_objects((s["image"] + 1) / 2)
            subject = next(d for d in found if d.color == "red")
            other = next(d for d in found if d.color == "blue")
            out.append((relation_between(subject, other), parse_caption(s["caption"])[1], s["negatives"]))
        return out

    mirrored = relations(ImageTransform(32, hflip=True, seed=0))
    assert all(seen == said for seen, said, _ in mirrored)
    flipped_lr = [(seen, negs) for seen, said, negs in mirrored if seen in ("to the left of", "to the right of")]
    asked = [parse_caption(s["caption"])[1] for s in samples]
    assert any(before != seen for before, (seen, _, _) in zip(asked, mirrored))  # some scenes were flipped
    assert all(negs == [caption([b, a], seen)] for seen, negs in flipped_lr)
    plain = relations(ImageTransform(32, hflip=True, seed=0, mirror_captions=False))
    assert any(seen != said for seen, said, _ in plain)


def test_flips_are_keyed_by_rank_worker_and_epoch() -> None:
    """hflip draws differ between epochs and ranks, and repeat for the same (seed, rank, epoch)."""
    from PIL import Image as PILImage

    from datamodules.steps import ImageTransform

    arr = np.zeros((8, 8, 3), dtype=np.uint8)
    arr[:, :4] = 255  # bright left half: a flip moves it right
    samples = [{"image": PILImage.fromarray(arr), "key": str(i)} for i in range(64)]

    def pattern(transform: ImageTransform) -> list[bool]:
        return [bool(s["image"][0, 0, -1] > 0) for s in transform(iter(samples))]  # right column bright = flipped

    rank0, rank1 = ImageTransform(8, hflip=True, seed=0, rank=0), ImageTransform(8, hflip=True, seed=0, rank=1)
    epoch0, epoch1 = pattern(rank0), pattern(rank0)  # each call is the next epoch
    assert 10 < sum(epoch0) < 54 and epoch0 != epoch1
    assert pattern(rank1) != epoch0
    again = ImageTransform(8, hflip=True, seed=0, rank=0)
    again.set_epoch(1)
    assert pattern(again) == epoch1
    assert not any(pattern(ImageTransform(8, hflip=False)))
