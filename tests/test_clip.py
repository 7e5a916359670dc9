"""CLIP stage: pretrained-weight round trips (open_clip, OpenAI), refusal of code-running files,
CLIPModule loss / temperature / optimizer / metrics, and the real tiny config end to end."""

from __future__ import annotations

import io
import math
import os
import pickle
import zipfile
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from datamodules.shapes.grammar import ALL_OBJECTS, SHAPES
from datamodules.image_text import LoaderConfig
from datamodules.shapes.dataset import ShapesConfig, write_shapes_dataset
from modules.stages.clip import CLIPModule, caption_content, clip_param_groups, content_id, recall_at_k, shapes_labels
from modules.networks.clip import FrozenCLIP, create_clip, read_state_dict, register_project_configs

ROOT = Path(__file__).resolve().parents[1]


def _outputs(model: torch.nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    tokens = open_clip.get_tokenizer(name)(["a red circle", "a blue square above a green triangle"])
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


# -- pretrained weights ------------------------------------------------------------------------------
def test_open_clip_checkpoint_round_trip_standard_architecture(tmp_path: Path):
    """ViT-B-32 written with open_clip's file conventions loads through our path, outputs equal."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = open_clip.create_model("ViT-B-32", pretrained=None)
    want = _outputs(source, "ViT-B-32")
    bin_path, st_path = tmp_path / "open_clip_pytorch_model.bin", tmp_path / "open_clip_model.safetensors"
    torch.save(source.state_dict(), bin_path)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(st_path))
    del source
    for path in (bin_path, st_path):
        torch.manual_seed(2)  # a different random init, overwritten by the file
        loaded = create_clip("ViT-B-32", str(path))
        got = _outputs(loaded, "ViT-B-32")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_mismatched_file_one_clear_error(tmp_path: Path):
    path = tmp_path / "tiny_rn.bin"
    torch.save(create_clip("tiny-rn").state_dict(), path)
    with pytest.raises(ValueError) as info:
        create_clip("tiny-vit", str(path))
    message = str(info.value)
    assert str(path) in message and "do not fit" in message and "\n" not in message


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_running_files_are_refused(tmp_path: Path):
    marker = tmp_path / "pwned"
    raw, zipped, scripted = tmp_path / "raw.bin", tmp_path / "zip.bin", tmp_path / "scripted.pt"
    raw.write_bytes(pickle.dumps({"w": _RunsCode(marker)}))
    torch.save({"w": _RunsCode(marker)}, zipped)
    with zipfile.ZipFile(scripted, "w") as archive:  # looks like a TorchScript archive
        archive.writestr("m/data.pkl", pickle.dumps(_RunsCode(marker)))
        archive.writestr("m/code/__torch__/m.py", "")
    for path in (raw, zipped, scripted):
        with pytest.raises(ValueError, match="refusing to load"):
            read_state_dict(path)
    assert not marker.exists()


def _traced(model: torch.nn.Module) -> torch.jit.ScriptModule:
    images, tokens = torch.zeros(1, 3, 32, 32), torch.zeros(1, 77, dtype=torch.long)
    return torch.jit.trace_module(model.eval(), {"encode_image": (images,), "encode_text": (tokens,)}, check_trace=False)


def test_openai_torchscript_archive_round_trip(tmp_path: Path):
    """OpenAI distributes traced TorchScript archives: read their weights without running code."""
    torch.manual_seed(3)
    source = create_clip("tiny-vit")
    want = _outputs(source, "tiny-vit")
    path = tmp_path / "ViT-tiny.pt"
    _traced(source).save(str(path))
    state = read_state_dict(path)
    assert state.keys() == source.state_dict().keys()
    got = _outputs(create_clip("tiny-vit", str(path)), "tiny-vit")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_openai_fp16_state_dict_loads_with_metadata_and_warns(tmp_path: Path, caplog):
    torch.manual_seed(4)
    source = create_clip("tiny-vit")
    state = {k: v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()}
    state.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    path = tmp_path / "openai.pt"
    torch.save(state, path)
    with caplog.at_level("WARNING"):
        loaded = create_clip("tiny-vit", str(path))
    assert "quickgelu" in caplog.text
    for k, v in source.state_dict().items():  # fp16 weights cast back to the model's fp32
        assert loaded.state_dict()[k].dtype == v.dtype
        torch.testing.assert_close(loaded.state_dict()[k], v.half().to(v.dtype), rtol=0, atol=0)


# -- CLIPModule pieces -------------------------------------------------------------------------------
def _batch(n: int = 6, size: int = 32) -> dict:
    """n captions with n distinct flat-colour images (learnable pairs)."""
    captions = [f"a photo of {'an' if c[0] in 'aeiou' else 'a'} {c} {s}" for c, s in ALL_OBJECTS[:n]]
    colours = torch.rand(n, 3, 1, 1, generator=torch.Generator().manual_seed(0)) * 2 - 1
    images = colours.expand(n, 3, size, size).clone()
    return {"image": images, "tokens": open_clip.get_tokenizer("tiny-vit")(captions), "caption": captions}


def test_loss_is_symmetric_cross_entropy_and_training_reduces_it():
    torch.manual_seed(0)
    module = CLIPModule("tiny-vit", optimizer={"lr": 1e-3})
    batch = _batch()
    z_i, z_t = module.encode(batch["image"], batch["tokens"])
    assert torch.allclose(z_i.norm(dim=-1), torch.ones(6)) and torch.allclose(z_t.norm(dim=-1), torch.ones(6))
    logits = module.model.logit_scale.exp() * z_i @ z_t.T
    labels = torch.arange(6)
    want = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(module.loss_fn(z_i, z_t, module.model.logit_scale.exp()), want)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        z_i, z_t = module.encode(batch["image"], batch["tokens"])
        loss = module.loss_fn(z_i, z_t, module.model.logit_scale.exp())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]  # ln 6 = 1.79 at chance


def test_logit_scale_clamped_to_ln_100():
    module = CLIPModule("tiny-vit")
    with torch.no_grad():
        module.model.logit_scale.fill_(7.0)
    module.on_train_batch_end(None, None, 0)
    assert module.model.logit_scale.item() == pytest.approx(math.log(100.0))


def test_param_groups_exempt_gains_biases_temperature_embeddings():
    model = create_clip("tiny-vit")
    decay, no_decay = clip_param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert {"logit_scale", "token_embedding.weight", "positional_embedding", "visual.class_embedding"} <= exempt
    assert "visual.positional_embedding" in exempt and "ln_final.weight" in exempt and "ln_final.bias" in exempt
    decayed = {names[id(p)] for p in decay["params"]}
    assert "transformer.resblocks.0.attn.in_proj_weight" in decayed and "text_projection" in decayed
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert len(decayed) + len(exempt) == len(names)


def test_recall_at_k_exact_values():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.8, 0.2, 0.7], [0.1, 0.3, 0.2]])
    relevant = torch.eye(3, dtype=torch.bool)  # row 0 top-1 hit; row 1 truth ranked 3rd; row 2 truth ranked 2nd
    r = recall_at_k(scores, relevant, (1, 2, 3))
    assert [r[k].item() for k in (1, 2, 3)] == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_caption_content_ignores_template_and_relation_direction():
    a = caption_content("a photo of a red circle to the right of a blue square")
    assert a == caption_content("a blue square to the left of a red circle")
    assert caption_content("an image of a red circle") == caption_content("a red circle")
    assert caption_content("a red circle above a blue square") != caption_content("a red circle below a blue square")
    assert caption_content("not a shapes caption") == "not a shapes caption"
    assert content_id("a red circle") == content_id("a drawing of a red circle") != content_id("a red square")


def test_zero_shot_metrics_count_colour_shape_and_pairs():
    module = CLIPModule("tiny-vit")
    module._classifier = torch.zeros(1)  # enable the metrics without running the text tower
    captions = ["a red circle", "a red square", "a blue triangle above a red circle", "a green circle left of"]
    labels = shapes_labels(captions)
    assert labels[0].tolist() == [ALL_OBJECTS.index(("red", "circle")), -1] and labels[3].tolist() == [-1, -1]
    n = len(ALL_OBJECTS)
    pred = torch.tensor([labels[0, 0], labels[1, 0] + 1, labels[2, 1], 0])  # right, shape wrong, pair hit, n/a
    module._update_zero_shot(F.one_hot(pred, n).float(), labels)
    values = {k: m.compute().item() for k, m in module.zero_shot_metrics.items()}
    assert values == pytest.approx({"acc": 0.5, "color_acc": 1.0, "shape_acc": 0.5, "pair_acc": 1.0})
    assert len(SHAPES) == 3 and labels[1, 0] % 3 == 1  # "square" is the 2nd shape: +1 stays in its colour


# -- the real tiny config, shrunk: fit, metrics, checkpoint -> FrozenCLIP --------------------------
def test_tiny_config_fit_then_frozen_clip_loads_checkpoint(tmp_path: Path, monkeypatch):
    from modules.cli.lightning import UnclipCLI

    write_shapes_dataset(ShapesConfig(num_samples=64, size=32, shard_size=16, val_fraction=0.25), tmp_path / "data/shapes", workers=1)
    monkeypatch.chdir(tmp_path)  # the config's relative data/ and runs/ paths land in tmp_path
    args = ["fit", "--config", str(ROOT / "experiments/clip/tiny.yaml"), "--trainer.max_steps=4", "--trainer.val_check_interval=4",
            "--trainer.enable_progress_bar=false", "--data.loader.batch_size=8", "--data.loader.num_workers=0", "--data.val_samples=16",
            "--data.loader.val_batch_size=8", "--model.optimizer.warmup_steps=2"]
    cli = UnclipCLI(args=args)
    metrics = cli.trainer.callback_metrics
    names = ("val/i2t_recall@1", "val/t2i_recall@10", "val/t2i_recall@1_single", "val/t2i_recall@1_pair", "val/zeroshot_acc",
             "val/zeroshot_pair_acc", "val/loss")
    for name in names:
        assert name in metrics and 0.0 <= float(metrics[name]) <= (1.0 if "recall" in name or "acc" in name else 100.0)
    assert float(metrics["val/t2i_recall@10"]) >= float(metrics["val/t2i_recall@1"])
    ckpt = tmp_path / "runs/clip-tiny/checkpoints/last.ckpt"
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)  # plain-type hparams
    assert checkpoint["hyper_parameters"]["model_name"] == "tiny-vit"
    again = UnclipCLI(args=["validate", "--config", str(ROOT / "experiments/clip/tiny.yaml"), "--ckpt_path", str(ckpt), *args[3:]])
    assert float(again.trainer.callback_metrics["val/zeroshot_acc"]) == pytest.approx(float(metrics["val/zeroshot_acc"]))
    frozen = FrozenCLIP("tiny-vit", str(ckpt))
    module = cli.model.eval()
    batch = _batch(4)
    with torch.no_grad():
        z_i, z_t = module.encode(batch["image"], batch["tokens"])
    torch.testing.assert_close(frozen.encode_image(batch["image"]), z_i)
    torch.testing.assert_close(frozen.encode_text(batch["tokens"]).embed, z_t)


def test_paper_config_parses():
    from modules.cli.lightning import UnclipCLI

    buffer = io.StringIO()
    with pytest.raises(SystemExit) as exit_info, pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stdout", buffer)
        UnclipCLI(args=["fit", "--config", str(ROOT / "experiments/clip/paper.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "model_name: ViT-H-16-256" in buffer.getvalue()
    register_project_configs()
    cfg = open_clip.get_model_config("ViT-H-16-256")  # the paper's encoder (≈ DESIGN.md)
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    assert (cfg["embed_dim"], vision["image_size"], vision["patch_size"], vision["width"], vision["layers"]) == (1024, 256, 16, 1280, 32)
    assert (text["width"], text["layers"]) == (1024, 24)


def _ddp_run(shards: str, devices: int, fit: bool) -> dict[str, float]:
    import lightning.pytorch as pl

    from datamodules.image_text import ImageTextDataModule

    torch.manual_seed(0)
    module = CLIPModule("tiny-vit", local_loss=fit, gather_with_grad=fit)
    dm = ImageTextDataModule(shards, shards, image_size=32, val_samples=48, tokenizer="tiny-vit", loader=LoaderConfig(batch_size=8, num_workers=0))
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, max_steps=2,
                         val_check_interval=2, check_val_every_n_epoch=None)
    if fit:
        trainer.fit(module, dm)
        return {k: float(v) for k, v in trainer.callback_metrics.items()}
    return trainer.validate(module, dm, verbose=False)[0]


@pytest.mark.slow
def test_ddp_gathers_features_over_ranks(tmp_path: Path):
    """2 gloo ranks: whole-split recall and zero-shot equal the single-process values; training
    with local loss + gather-with-grad runs."""
    write_shapes_dataset(ShapesConfig(num_samples=48, size=32, shard_size=12, val_fraction=0.0), tmp_path, workers=1)
    shards = str(tmp_path / "train-*.tar")
    one, two = _ddp_run(shards, 1, fit=False), _ddp_run(shards, 2, fit=False)
    for name in ("val/i2t_recall@1", "val/t2i_recall@5", "val/t2i_recall@1_pair", "val/zeroshot_acc", "val/zeroshot_pair_acc"):
        assert two[name] == pytest.approx(one[name], abs=1e-6)
    fitted = _ddp_run(shards, 2, fit=True)
    assert math.isfinite(fitted["train/loss"]) and "val/t2i_recall@1" in fitted


def test_frozen_clip_without_weights_is_the_same_encoder_every_time():
    """Stage checkpoints do not contain the frozen CLIP: a run without CLIP weights must get the
    same random encoder back when its checkpoint is evaluated later."""
    from modules.networks.clip import FrozenCLIP

    a = FrozenCLIP("tiny-vit")
    torch.manual_seed(123)
    b = FrozenCLIP("tiny-vit")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(a.encode_image(x), b.encode_image(x))
    assert not a.training and not any(p.requires_grad for p in a.parameters())
