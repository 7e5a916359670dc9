"""Tests of the built-in shapes dataset: determinism, pixel truth, relations, holdout, captions."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.shapes import dataset as writer
from datamodules.shapes import grammar, scene
from modules.cli import data as data_command
from datamodules.shapes.grammar import COLORS, RELATIONS, SHAPES, Obj
from datamodules.shapes.dataset import Holdout, ShapesConfig, Split

HOLDOUT = ("red:circle", "blue:square,green:triangle")
CONFIG = ShapesConfig(num_samples=200, size=48, seed=3, shard_size=60, holdout=HOLDOUT)


def _read_split(out: Path, split: str) -> list[dict]:
    """All samples of a split in key order: {"key", "image" (H, W, 3) uint8, "txt", "truth"}."""
    samples: dict[str, dict] = {}
    for shard in sorted(out.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                sample = samples.setdefault(key, {"key": key})
                if ext == "png":
                    sample["image"] = np.array(Image.open(io.BytesIO(data)))
                elif ext == "txt":
                    sample["txt"] = data.decode("utf-8")
                else:
                    sample["truth"] = json.loads(data)
    return [samples[k] for k in sorted(samples)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    writer.write_shapes_dataset(CONFIG, out, workers=1)
    return out


@pytest.fixture(scope="module")
def samples(dataset: Path) -> list[dict]:
    return _read_split(dataset, "train") + _read_split(dataset, "val")


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_byte_identical_across_runs_and_workers(dataset: Path, tmp_path: Path) -> None:
    reference = _shard_bytes(dataset)
    assert len([n for n in reference if n.endswith(".tar")]) == 4  # 180 train / 60 + 20 val
    for name, workers in (("again", 1), ("two_workers", 2)):
        writer.write_shapes_dataset(CONFIG, tmp_path / name, workers=workers)
        assert _shard_bytes(tmp_path / name) == reference
    other = ShapesConfig(**{**CONFIG.__dict__, "seed": CONFIG.seed + 1})
    writer.write_shapes_dataset(other, tmp_path / "other_seed", workers=2)
    assert _shard_bytes(tmp_path / "other_seed")["train-000000.tar"] != reference["train-000000.tar"]


def test_shard_layout_and_stats(dataset: Path, samples: list[dict]) -> None:
    stats = json.loads((dataset / "stats.json").read_text())
    assert stats["splits"]["train"]["num_samples"] == 180 and stats["splits"]["val"]["num_samples"] == 20
    assert stats["splits"]["train"]["pattern"] == "train-{000000..000002}.tar"
    assert stats["splits"]["val"]["pattern"] == "val-{000000..000000}.tar"
    assert stats["args"]["holdout"] == list(HOLDOUT) and stats["args"]["size"] == 48
    assert not list(dataset.glob("*.tmp"))
    with tarfile.open(dataset / "train-000001.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["000000060.json", "000000060.png", "000000060.txt"]
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert {(m.mtime, m.uid, m.gid, m.uname) for m in members} == {(0, 0, 0, "root")}
    assert all(s["image"].shape == (48, 48, 3) and s["image"].dtype == np.uint8 for s in samples)


def test_webdataset_reads_brace_pattern(dataset: Path) -> None:
    wds = pytest.importorskip("webdataset")
    stats = json.loads((dataset / "stats.json").read_text())
    pipeline = wds.WebDataset(str(dataset / stats["splits"]["train"]["pattern"]), shardshuffle=False)
    rows = list(pipeline.decode("pil").to_tuple("png", "txt", "json"))
    assert len(rows) == 180
    image, caption, truth = rows[7]
    assert image.size == (48, 48) and caption == truth["caption"]


def _coverage(patch: np.ndarray, fill: tuple[int, int, int]) -> float:
    """Mean ink fraction of a patch blending fill over white (1 = all fill, 0 = all white)."""
    white = np.array([255.0, 255.0, 255.0])
    ink = (white - patch.astype(np.float64)) / (white - np.array(fill, dtype=np.float64))
    return float(ink.mean())


def test_truth_matches_pixels(samples: list[dict]) -> None:
    expected_coverage = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
    named = {tuple(rgb): name for name, rgb in COLORS.items()}
    for s in samples:
        image, outside = s["image"], np.ones(s["image"].shape[:2], dtype=bool)
        for obj in s["truth"]["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            fill, patch = COLORS[obj["color"]], image[y0:y1, x0:x1]
            outside[y0:y1, x0:x1] = False
            assert (patch == fill).all(-1).any()
            colours_in_box = {named[tuple(p)] for p in patch.reshape(-1, 3).tolist() if tuple(p) in named}
            assert colours_in_box == {obj["color"]}
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            if obj["shape"] in ("circle", "square"):
                assert tuple(image[cy, cx]) == fill
            if obj["shape"] == "square":
                assert (patch == fill).all()
            else:  # anti-aliased edges: some pixels strictly between white and the fill
                assert (~(patch == fill).all(-1) & ~(patch == 255).all(-1)).any()
            assert _coverage(patch, fill) == pytest.approx(expected_coverage[obj["shape"]], abs=0.04)
        assert (image[outside] == 255).all()


def test_geometry_and_relations(samples: list[dict]) -> None:
    lo, hi = math.ceil(0.25 * 48), math.floor(0.45 * 48)
    margin = 3  # max(1, S // 16) at S = 48
    relations_seen = set()
    for s in samples:
        truth = s["truth"]
        for obj in truth["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            assert x1 - x0 == y1 - y0 and lo <= x1 - x0 <= hi
            assert 0 <= x0 and 0 <= y0 and x1 <= 48 and y1 <= 48
        if len(truth["objects"]) == 1:
            assert truth["relation"] is None
            continue
        a, b = (o["bbox"] for o in truth["objects"])
        gaps = (b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])
        assert max(gaps) >= margin  # disjoint bboxes, separated by the margin
        dx = (b[0] + b[2]) / 2 - (a[0] + a[2]) / 2  # centre of object minus centre of subject
        dy = (b[1] + b[3]) / 2 - (a[1] + a[3]) / 2
        rel = truth["relation"]
        relations_seen.add(rel)
        holds = {"to the left of": dx > abs(dy), "to the right of": -dx > abs(dy),
                 "above": dy > abs(dx), "below": -dy > abs(dx)}
        assert [r for r, ok in holds.items() if ok] == [rel]
        assert scene.classify_relation(a, b, margin) == rel
        assert scene.classify_relation(b, a, margin) != rel
        assert truth["objects"][0] != truth["objects"][1]
    assert relations_seen == set(RELATIONS)


@pytest.mark.parametrize("size", [32, 48, 64, 128])
def test_every_written_layout_follows_the_layout_rule_in_canvas_units(size: int) -> None:
    """`follows_layout_rule` (the check on the layout stage's plans) accepts every layout the writer
    makes, divided by the canvas size, and only for its own relation; it refuses boxes that touch or
    overlap, stand diagonally, or have a side outside the writer's range."""
    rng, colors = np.random.default_rng(size), list(COLORS)
    for i in range(300):
        objects = [Obj(colors[i % len(colors)], SHAPES[i % len(SHAPES)]),
                   Obj(colors[(i // 2) % len(colors)], SHAPES[(i // 3) % len(SHAPES)])][: 1 + i % 2]
        relation = RELATIONS[(i // 2) % len(RELATIONS)] if len(objects) == 2 else None
        boxes = [[v / size for v in o["bbox"]] for o in scene.layout_scene(rng, size, objects, relation)["objects"]]
        assert scene.follows_layout_rule(boxes, relation)
        if relation is not None:
            assert [r for r in RELATIONS if scene.follows_layout_rule(boxes, r)] == [relation]
            assert not scene.follows_layout_rule(boxes[::-1], relation)
    left = [0.1, 0.3, 0.4, 0.6]  # a side of 0.3
    assert scene.follows_layout_rule([left, [0.5, 0.35, 0.8, 0.65]], "to the left of")
    assert not scene.follows_layout_rule([left, [0.45, 0.35, 0.75, 0.65]], "to the left of")  # gap 0.05 < 1/16
    assert not scene.follows_layout_rule([left, [0.38, 0.35, 0.68, 0.65]], "to the left of")  # overlapping
    assert not scene.follows_layout_rule([left, [0.5, 0.5, 0.8, 0.8]], "to the left of")  # overlap across 0.1 < 0.15
    assert not scene.follows_layout_rule([left, [0.5, 0.35, 0.6, 0.45]], "to the left of")  # a side of 0.1
    assert not scene.follows_layout_rule([[0.1, 0.1, 0.6, 0.6]], None)  # a side of 0.5
    assert not scene.follows_layout_rule([left], "above") and not scene.follows_layout_rule([left, left], None)


def test_holdout_excluded_from_train_present_in_val(dataset: Path) -> None:
    def objs(s: dict) -> set[Obj]:
        return {Obj(o["color"], o["shape"]) for o in s["truth"]["objects"]}

    held_pair = {Obj("blue", "square"), Obj("green", "triangle")}
    train, val = _read_split(dataset, "train"), _read_split(dataset, "val")
    assert not any(Obj("red", "circle") in objs(s) or held_pair <= objs(s) for s in train)
    assert not any(s["truth"]["holdout"] for s in train)
    # the held-out parts still occur in train on their own: only the combination is excluded
    assert any(Obj("blue", "square") in objs(s) for s in train)
    assert any(Obj("green", "triangle") in objs(s) for s in train)
    probes = [s for s in val if s["truth"]["holdout"]]
    assert probes and all(Obj("red", "circle") in objs(s) or held_pair <= objs(s) for s in probes)
    assert all(Holdout.parse(HOLDOUT).excludes(list(objs(s))) == s["truth"]["holdout"] for s in val)


def test_caption_matches_truth(samples: list[dict]) -> None:
    templates = set()
    for s in samples:
        truth = s["truth"]
        assert s["txt"] == truth["caption"] == grammar.describe(truth)
        objects, relation, template = grammar.parse_caption(s["txt"])
        assert objects == [Obj(o["color"], o["shape"]) for o in truth["objects"]]
        assert relation == truth["relation"] and template == truth["template"]
        templates.add(template)
    assert templates == set(grammar.TEMPLATES)
    one_orange = {"objects": [{"color": "orange", "shape": "circle"}], "relation": None, "template": "a photo of {}"}
    assert grammar.describe(one_orange) == "a photo of an orange circle"
    two = {"objects": [{"color": "red", "shape": "square"}, {"color": "orange", "shape": "triangle"}],
           "relation": "to the right of"}
    assert grammar.describe(two) == "a red square to the right of an orange triangle"
    assert grammar.parse_caption("a photo of an orange triangle above a red square") == (
        [Obj("orange", "triangle"), Obj("red", "square")], "above", "a photo of {}")
    with pytest.raises(ValueError):
        grammar.parse_caption("a photo of a orange hexagon")


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_two_object_fraction(tmp_path: Path, fraction: float) -> None:
    config = ShapesConfig(num_samples=300, size=32, seed=0, shard_size=300, two_object_fraction=fraction)
    stats = writer.write_shapes_dataset(config, tmp_path, workers=1)
    two = sum(s["num_two_object"] for s in stats["splits"].values())
    counted = sum(len(s["truth"]["objects"]) == 2 for split in ("train", "val")
                  for s in _read_split(tmp_path, split))
    assert two == counted
    assert abs(two - fraction * 300) <= 4 * math.sqrt(300 * fraction * (1 - fraction)) + 1e-9


def test_render_sample_and_layout_api() -> None:
    rng = np.random.default_rng(0)
    image, truth = writer.render_sample(rng, 32, two_object_fraction=1.0, split=Split.VAL)
    assert image.size == (32, 32) and image.mode == "RGB" and len(truth["objects"]) == 2
    assert truth["split"] == "val" and truth["holdout"] is False
    truth = scene.layout_scene(rng, 32, [Obj("purple", "triangle"), Obj("yellow", "circle")], "below")
    assert truth["caption"] == "a purple triangle below a yellow circle"
    a, b = (o["bbox"] for o in truth["objects"])
    assert a[1] - b[3] >= scene.margin_px(32)
    assert set(SHAPES) == {"circle", "square", "triangle"} and len(COLORS) == 6


def test_cli_and_validation(tmp_path: Path) -> None:
    parser = data_command.add_shapes_arguments(__import__("argparse").ArgumentParser())
    defaults = parser.parse_args(["--out", str(tmp_path)])
    assert (defaults.size, defaults.shard_size, defaults.val_fraction, defaults.two_object_fraction) == (
        64, 1000, 0.1, 0.5)
    # an earlier, larger run into the same folder leaves no stale shards behind
    data_command.main(["shapes", "--out", str(tmp_path), "--num-samples", "30", "--size", "16", "--shard-size", "10",
                 "--workers", "1", "--val-fraction", "0"])
    data_command.main(["shapes", "--out", str(tmp_path), "--num-samples", "12", "--size", "16", "--shard-size", "10",
                 "--workers", "1", "--holdout", "red:square", "orange:circle,red:triangle"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "stats.json", "train-000000.tar", "train-000001.tar", "val-000000.tar"]
    for bad in (["red:hexagon"], ["red:circle,red:circle"], ["pink:circle"]):
        with pytest.raises(ValueError):
            writer.write_shapes_dataset(ShapesConfig(num_samples=4, size=16, holdout=tuple(bad)), tmp_path)
    every_object = tuple(f"{c}:{s}" for c in COLORS for s in SHAPES)
    with pytest.raises(ValueError):
        writer.write_shapes_dataset(ShapesConfig(num_samples=4, size=16, holdout=every_object), tmp_path)
