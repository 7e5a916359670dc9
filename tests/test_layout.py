"""Layouts: box coverage and painting, json -> boxes (crop, flip, bad input), the layout-conditioned
U-Net and decoder, the layout stage, and a pipeline that plans layouts (round trip)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from datamodules.image_text import ImageTextDataModule, LoaderConfig
from datamodules.layout import ReadLayout, layout_from_json
from datamodules.shapes.dataset import ShapesConfig, write_shapes_dataset
from datamodules.shapes.scene import draw_scene, layout_scene
from datamodules.shapes.grammar import Obj
from datamodules.steps import ImageTransform, SkipCounter, mirror_boxes
from modules.core.errors import ConfigError, PipelineError, UserError
from modules.networks.clip import FrozenCLIP
from modules.networks.layout import LayoutPriorConfig, box_coverage, paint
from modules.networks.unet import UNet, UNetConfig
from modules.pipelines.unclip import GenerateConfig, UnCLIPPipeline
from modules.stages.decoder import DecoderModule
from modules.stages.layout import LayoutModule, boxes_to_x0, x0_to_boxes


def _reference_coverage(box: list[float], size: int, sub: int = 64) -> torch.Tensor:
    """Coverage by supersampling: the share of sub x sub points per pixel inside the box."""
    n = size * sub
    centres = (torch.arange(n) + 0.5) / n
    inside_x = (centres >= box[0]) & (centres < box[2])
    inside_y = (centres >= box[1]) & (centres < box[3])
    grid = (inside_y[:, None] & inside_x[None, :]).float()
    return grid.view(size, sub, size, sub).mean(dim=(1, 3))


def test_box_coverage_is_the_exact_pixel_overlap():
    boxes = torch.tensor([[[0.1, 0.25, 0.6, 0.9], [0.0, 0.0, 1.0, 0.5]]])
    cover = box_coverage(boxes, 8)
    assert cover.shape == (1, 2, 8, 8)
    for k in range(2):
        torch.testing.assert_close(cover[0, k], _reference_coverage(boxes[0, k].tolist(), 8), atol=1 / 64, rtol=0)
        x0, y0, x1, y1 = boxes[0, k].tolist()
        torch.testing.assert_close(cover[0, k].sum(), torch.tensor((x1 - x0) * (y1 - y0) * 64))


def test_paint_puts_each_phrase_in_its_box_and_an_empty_layout_is_zero():
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])
    embeds = torch.nn.functional.normalize(torch.randn(1, 2, 16), dim=-1)
    mask = torch.tensor([[True, True]])
    m = paint(boxes, embeds, mask, 4)
    assert m.shape == (1, 17, 4, 4)
    torch.testing.assert_close(m[0, :16, 0, 0], embeds[0, 0] * 4.0)  # √16 · e inside the first box
    torch.testing.assert_close(m[0, :16, 3, 3], embeds[0, 1] * 4.0)
    assert m[0, :16, 0, 3].abs().max() == 0 and m[0, 16].sum() == 8  # off-box zero; total coverage 2 x 4 px
    assert paint(boxes, embeds, torch.zeros_like(mask), 4).abs().max() == 0


def _json(objects: list[dict]) -> bytes:
    return json.dumps({"objects": objects}).encode()


def test_layout_from_json_normalises_to_the_centre_crop_and_names_bad_fields():
    raw = json.dumps({"objects": [{"bbox": [30, 10, 50, 30], "color": "red", "shape": "circle"},
                                  {"bbox": [60, 0, 70, 10], "phrase": "a dog"}], "relation": "to the left of"}).encode()
    boxes, mask, phrases, relation = layout_from_json(raw, 80, 40, 3)  # crop: x in [20, 60]
    assert relation == "to the left of"
    torch.testing.assert_close(boxes[0], torch.tensor([0.25, 0.25, 0.75, 0.75]))
    torch.testing.assert_close(boxes[1], torch.tensor([1.0, 0.0, 1.0, 0.25]))  # clipped by the crop
    assert mask.tolist() == [True, True, False] and phrases == ["a red circle", "a dog", ""]
    bad = [
        (b"{not json", "json: not valid"),
        (_json([]), "json.objects: expected a non-empty list"),
        (_json([{"bbox": [0, 0, 5], "phrase": "x"}]), "json.objects[0].bbox: expected"),
        (_json([{"bbox": [0, 0, 500, 5], "phrase": "x"}]), "json.objects[0].bbox: [0, 0, 500, 5] is not a box inside"),
        (_json([{"bbox": [0, 0, 5, 5]}]), "json.objects[0]: needs a non-empty string 'phrase'"),
        (_json([{"bbox": [0, 0, 5, 5], "phrase": "x"}] * 4), "4 objects, more than layout_slots 3"),
        (json.dumps({"objects": [{"bbox": [0, 0, 5, 5], "phrase": "x"}], "relation": "above"}).encode(), "json.relation"),
    ]
    for raw, message in bad:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            layout_from_json(raw, 80, 40, 3)


def test_read_layout_skips_a_bad_sample_and_keeps_the_rest():
    image = Image.new("RGB", (32, 32))
    good = {"key": "a", "image": image, "json": _json([{"bbox": [0, 0, 16, 16], "phrase": "x"}])}
    bad = {"key": "b", "image": image, "json": b"[]"}
    counter = SkipCounter()
    out = list(ReadLayout(counter, 2)([bad, good]))
    assert [s["key"] for s in out] == ["a"] and counter.total["bad_layout"] == 1 and "json" not in out[0]


def test_flipped_boxes_cover_the_flipped_object():
    truth = layout_scene(np.random.default_rng(3), 32, [Obj("red", "square")])
    image = draw_scene(truth, 32)
    boxes, mask, phrases, _ = layout_from_json(json.dumps(truth).encode(), 32, 32, 1)
    transform = ImageTransform(32, hflip=True, seed=0)
    samples = [{"key": str(i), "image": image, "caption": "a red square", "layout_boxes": boxes, "layout_mask": mask,
                "layout_phrases": phrases} for i in range(8)]
    flipped = 0
    for s in transform(samples):
        red = (s["image"][0] > 0.5) & (s["image"][1] < 0)  # the red object's pixels
        ys, xs = torch.nonzero(red, as_tuple=True)
        drawn = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) / 32
        torch.testing.assert_close(s["layout_boxes"][0], drawn)
        flipped += not torch.equal(s["layout_boxes"], boxes)
    assert 0 < flipped < 8
    torch.testing.assert_close(mirror_boxes(mirror_boxes(boxes)), boxes)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(ShapesConfig(num_samples=40, size=32, shard_size=20, val_fraction=0.5), root, workers=1)
    return root


def _data(shards: Path, **kw) -> ImageTextDataModule:
    dm = ImageTextDataModule(train_shards=str(shards / "train-*.tar"), val_shards=str(shards / "val-*.tar"),
                             image_size=16, tokenizer="tiny-vit", layout_slots=2, val_samples=20,
                             loader=LoaderConfig(batch_size=10, num_workers=0), **kw)
    dm.setup("fit")
    return dm


def test_datamodule_batches_carry_the_json_truth_as_layouts(shards: Path):
    batch = next(iter(_data(shards).val_dataloader()))
    assert batch["layout_boxes"].shape == (10, 2, 4) and batch["layout_mask"].shape == (10, 2)
    for caption, boxes, mask, phrases, relation in zip(batch["caption"], batch["layout_boxes"], batch["layout_mask"],
                                                       batch["layout_phrases"], batch["layout_relation"]):
        n = int(mask.sum())
        assert (relation in caption) if n == 2 else relation == ""
        assert phrases[n:] == [""] * (2 - n) and all(phrases[:n])
        assert caption.endswith(phrases[n - 1]) and phrases[0] in caption  # caption order = slot order
        assert (boxes[:n, 2:] > boxes[:n, :2]).all() and not boxes[n:].any()
    with pytest.raises(ConfigError, match="data.layout_slots"):
        ImageTextDataModule(train_shards="x", layout_slots=-1)


def _unet(**kw) -> UNet:
    torch.manual_seed(0)
    unet = UNet(UNetConfig(image_size=16, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                           attention_resolutions=(8,), num_head_channels=16, image_embed_dim=32, layout_dim=32, **kw))
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet.eval()


def test_unet_layout_moves_the_output_and_the_null_layout_is_no_layout():
    unet = _unet()
    x, t, z = torch.randn(2, 3, 16, 16), torch.tensor([10, 500]), torch.randn(2, 32)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]] * 2)
    embeds, mask = torch.randn(2, 2, 32), torch.ones(2, 2, dtype=torch.bool)
    plain = unet(x, t, image_embed=z)
    grounded = unet(x, t, image_embed=z, layout_boxes=boxes, layout_embeds=embeds, layout_mask=mask)
    assert (grounded - plain).abs().max() > 1e-3
    dropped = unet(x, t, image_embed=z, layout_boxes=boxes, layout_embeds=embeds, layout_mask=mask,
                   drop_layout=torch.tensor([True, False]))
    torch.testing.assert_close(dropped[0], plain[0])
    torch.testing.assert_close(dropped[1], grounded[1])
    empty = unet(x, t, image_embed=z, layout_boxes=boxes, layout_embeds=embeds, layout_mask=~mask)
    torch.testing.assert_close(empty, plain)
    with pytest.raises(ValueError, match="together"):
        unet(x, t, image_embed=z, layout_boxes=boxes)


def test_box_data_round_trip():
    boxes = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.0, 0.0]]])
    mask = torch.tensor([[True, False]])
    x0 = boxes_to_x0(boxes, mask)
    assert x0[0, 1].abs().max() == 0
    torch.testing.assert_close(x0_to_boxes(x0)[0, 0], boxes[0, 0])
    torch.testing.assert_close(x0_to_boxes(torch.tensor([[[0.5, 0.5, -0.5, -0.5]]])), torch.tensor([[[0.25, 0.25, 0.75, 0.75]]]))


def _layout_stage() -> LayoutModule:
    torch.manual_seed(0)
    return LayoutModule(prior=LayoutPriorConfig(max_objects=2, width=32, depth=1, heads=2), clip_model="tiny-vit",
                        sampling={"steps": 4, "clipping": "STATIC"}, optimizer={"lr": 1e-3, "warmup_steps": 0})


def test_layout_stage_learns_and_samples_boxes(shards: Path):
    stage = _layout_stage()
    batch = next(iter(_data(shards).train_dataloader()))
    opt = torch.optim.Adam(stage.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):  # one batch, over and over: the loss must fall
        loss = stage.training_step(batch, 0)
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]
    phrases, relations = stage.parse(["a red circle above a blue square", "a photo of a green triangle", "a dog"])
    assert phrases == [["a red circle", "a blue square"], ["a green triangle", ""], ["", ""]]
    assert relations.tolist() == [3, 0, 0]  # "above" is the grammar's third relation; id 0: none
    with pytest.raises(UserError, match="'beside' is not one of model.relations"):
        stage.relation_ids(["beside"])
    layout = stage.conditioner.layout({"layout_phrases": [["a red circle", "a blue square"]] * 3,
                                       "layout_boxes": torch.zeros(3, 2, 4)}, torch.device("cpu"))
    layout["layout_relation"] = torch.tensor([1, 2, 3])
    boxes = stage.eval().generate(layout, generator=torch.Generator().manual_seed(0))
    assert boxes.shape == (3, 2, 4) and boxes.min() >= 0 and boxes.max() <= 1
    assert (boxes[..., 2:] >= boxes[..., :2]).all()
    again = stage.generate(layout, generator=torch.Generator().manual_seed(0))
    assert torch.equal(boxes, again)


def _decoder(layout: bool) -> DecoderModule:
    torch.manual_seed(0)
    unet = dict(image_size=16, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                num_head_channels=16)
    decoder = DecoderModule(unet=unet, clip_model="tiny-vit", condition_on_layout=layout, sampling={"steps": 3})
    with torch.no_grad():
        for p in decoder.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return decoder


def test_layout_decoder_trains_on_layout_batches(shards: Path):
    decoder = _decoder(True)
    batch = next(iter(_data(shards).train_dataloader()))
    kwargs = decoder.condition(batch, drop=False)
    assert kwargs["layout_embeds"].shape == (10, 2, decoder.conditioner.embed_dim)
    torch.testing.assert_close(kwargs["layout_embeds"].norm(dim=-1)[kwargs["layout_mask"]],
                               torch.ones(int(kwargs["layout_mask"].sum())))
    assert torch.isfinite(decoder.training_step(batch, 0))
    with pytest.raises(ConfigError, match="data.layout_slots"):
        decoder.condition({k: v for k, v in batch.items() if not k.startswith("layout")}, drop=False)


def test_plans_that_break_the_layout_rule_are_drawn_again_up_to_plan_tries():
    """Rejection sampling of plans: only the rows whose boxes break the shapes writer's rule are drawn
    again (the rest keep the draw that followed it), until every row follows it or `tries` draws are spent."""
    import open_clip

    stage, clip, tokenizer = _layout_stage().eval(), FrozenCLIP("tiny-vit"), open_clip.get_tokenizer("tiny-vit")
    empty = [0.0] * 4
    apart = [[0.1, 0.3, 0.4, 0.6], [0.5, 0.35, 0.8, 0.65]]  # "to the left of", as the writer places it
    overlapping = [[0.1, 0.3, 0.4, 0.6], [0.3, 0.3, 0.6, 0.6]]
    small, single = [[0.1, 0.1, 0.15, 0.15], empty], [[0.2, 0.2, 0.5, 0.5], empty]
    script = [[overlapping, small], [overlapping, single], [apart], [apart]]
    calls: list[int] = []

    def generate(cond, *, generator=None, sampling=None):  # scripted draws in place of the sampler
        calls.append(cond["layout_mask"].shape[0])
        return torch.tensor(script[len(calls) - 1])

    stage.generate = generate
    prompts = ["a red circle to the left of a blue square", "a green triangle"]
    plan = stage.plan(prompts, clip=clip, tokenizer=tokenizer, tries=8)
    assert calls == [2, 2, 1]  # both rows, both again (the lone box was too small), then the pair alone
    assert torch.equal(plan["layout_boxes"], torch.tensor([apart, single]))
    calls.clear()
    boxes = stage.plan(prompts, clip=clip, tokenizer=tokenizer, tries=2)["layout_boxes"]
    assert torch.equal(boxes, torch.tensor([overlapping, single]))
    assert calls == [2, 2]  # two draws spent: the last one kept
    calls.clear()
    assert stage.hparams.plan_tries == 1
    boxes = stage.plan(prompts, clip=clip, tokenizer=tokenizer)["layout_boxes"]
    assert torch.equal(boxes, torch.tensor([overlapping, small]))
    assert calls == [2]  # the stage's own plan_tries 1: the first draw, unchecked
    with pytest.raises(ConfigError, match="plan_tries"):
        LayoutModule(prior=LayoutPriorConfig(max_objects=2, width=32, depth=1, heads=2), plan_tries=0)


def test_pipeline_plans_layouts_round_trips_and_refuses_a_plain_decoder(tmp_path: Path):
    clip = FrozenCLIP("tiny-vit")
    stage = _layout_stage().eval()
    pipe = UnCLIPPipeline(clip, _decoder(True).eval(), layout=stage)
    prompts = ["a red circle to the left of a blue square", "a green triangle"]
    plan = pipe.plan_layout(prompts, torch.Generator().manual_seed(0))
    assert plan["layout_mask"].tolist() == [[True, True], [True, False]]
    loaded = UnCLIPPipeline.load(pipe.save(tmp_path / "pipe"))
    assert json.loads((tmp_path / "pipe" / "pipeline.json").read_text())["layout"]["class_path"].endswith("LayoutModule")
    a, b = pipe.generate(prompts, 2, seed=1), loaded.generate(prompts, 2, seed=1)
    assert torch.equal(a, b)
    without = pipe.generate(prompts, 2, seed=1, config=GenerateConfig(use_layout=False))
    assert not torch.equal(a, without)
    tries: list[int | None] = []
    plan = stage.plan
    stage.plan = lambda *args, **kw: tries.append(kw["tries"]) or plan(*args, **kw)
    pipe.generate(prompts, 1, seed=1)
    pipe.generate(prompts, 1, seed=1, config=GenerateConfig(layout_tries=5))
    assert tries == [None, 5]  # GenerateConfig.layout_tries reaches the stage (None: its own plan_tries)
    with pytest.raises(PipelineError, match="condition_on_layout"):
        UnCLIPPipeline(clip, _decoder(False), layout=stage)


def test_pipeline_ablations_meet_the_same_plan_and_decoder_noise():
    """Each stage draws from its own (seed, stage) generator: with or without the prior, at any
    best-of-n, the plan and the decoder's starting noise are the same, so the arms differ in z_i alone."""
    from modules.networks.prior_transformer import PriorConfig
    from modules.pipelines.unclip import PriorMode
    from modules.stages.prior import PriorModule

    torch.manual_seed(0)
    prior = PriorModule(prior=PriorConfig(width=32, depth=1, heads=2), clip_model="tiny-vit",
                        sampling={"steps": 3, "clipping": "NONE"}).eval()
    pipe = UnCLIPPipeline(FrozenCLIP("tiny-vit"), _decoder(True).eval(), prior=prior, layout=_layout_stage().eval())
    seen: list[tuple[Tensor, Tensor, Tensor]] = []
    generate = pipe.decoder.generate

    def record(kwargs, *, generator, **rest):
        state = generator.get_state()
        seen.append((kwargs["image_embed"], kwargs["layout_boxes"], state))
        return generate(kwargs, generator=generator, **rest)

    pipe.decoder.generate = record
    prompts = ["a red circle to the left of a blue square", "a green triangle"]
    for cfg in (GenerateConfig(), GenerateConfig(prior_mode=PriorMode.TEXT), GenerateConfig(num_candidates=4)):
        pipe.generate(prompts, 2, seed=3, config=cfg)
    (z_prior, boxes, state), (z_text, boxes_text, state_text), (z_best4, boxes4, state4) = seen
    assert torch.equal(boxes, boxes_text) and torch.equal(boxes, boxes4)  # one plan in every arm
    assert torch.equal(state, state_text) and torch.equal(state, state4)  # one x_T in every arm
    assert not torch.equal(z_prior, z_text) and not torch.equal(z_prior, z_best4)  # the arms differ in z_i


@pytest.mark.parametrize("path, name", [
    ("modules.stages.decoder.DecoderModule", "drop_layout_prob"), ("modules.stages.decoder.DecoderModule", "drop_text_prob"),
    ("modules.stages.decoder.DecoderModule", "drop_image_prob"), ("modules.stages.prior.PriorModule", "drop_text_prob"),
    ("modules.stages.ar_prior.ARPriorModule", "drop_text_prob"), ("modules.stages.superres.SuperResModule", "drop_text_prob"),
])
def test_cfg_dropout_rates_outside_0_1_are_refused_in_one_line(path: str, name: str):
    import importlib

    module, _, cls = path.rpartition(".")
    stage = getattr(importlib.import_module(module), cls)
    for bad in (1.5, -0.1):
        with pytest.raises(ConfigError, match=rf"^model\.{name}: {bad} is not a number in \[0.0, 1.0\]$"):
            stage(**{name: bad})
