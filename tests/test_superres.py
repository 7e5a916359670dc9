"""SuperResModule: aligned crops, crop-trained / full-size sampling, noise conditioning
augmentation wiring, a tiny fit, checkpoints, and the experiment YAMLs."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from modules.stages.degradations import Augmentation, Resampling, gaussian_blur
from modules.diffusion.config import SamplingConfig
from modules.stages.superres import SuperResModule, bicubic_upsample, random_crop_pair

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments" / "superres"
UNET = dict(image_size=16, model_channels=16, channel_mult=(1, 2), num_res_blocks=1)


def module(**overrides) -> SuperResModule:
    kwargs = dict(unet=UNET, low_res_size=8, crop_size=8, sampling={"steps": 5}, seed=0)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return SuperResModule(**kwargs)


def rectangles(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Flat-colour axis-aligned rectangles on a flat background, (n, 3, size, size) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        out[i] = (torch.rand(3, 1, 1, generator=g) * 2 - 1).expand(3, size, size)
        y0, x0 = torch.randint(0, size - 4, (2,), generator=g).tolist()
        h, w = torch.randint(3, size // 2, (2,), generator=g).tolist()
        out[i, :, y0 : y0 + h, x0 : x0 + w] = torch.rand(3, 1, 1, generator=g) * 2 - 1
    return out


def test_crops_are_aligned_with_the_low_res_image():
    m = module(unet={**UNET, "image_size": 32}, low_res_size=16)
    high = torch.rand(6, 3, 32, 32) * 2 - 1
    hc, lc = random_crop_pair(high, m.make_low_res(high), 8, torch.Generator().manual_seed(0))
    assert hc.shape == (6, 3, 8, 8) and lc.shape == (6, 3, 4, 4)
    # AREA downsampling commutes with factor-aligned crops: the low-res crop is the crop's low-res.
    assert torch.allclose(lc, m.make_low_res(hc), atol=1e-6)
    assert len({tuple(c.flatten()[:4].tolist()) for c in hc}) > 1  # offsets differ per sample


def test_training_uses_crops_and_generate_runs_at_full_and_other_sizes():
    m = module()
    shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    m.unet.register_forward_hook(lambda mod, args, kwargs, out: shapes.append((tuple(args[0].shape), tuple(kwargs["low_res"].shape))), with_kwargs=True)
    m.training_step({"image": torch.rand(4, 3, 16, 16) * 2 - 1}, 0)
    assert shapes == [((4, 3, 8, 8), (4, 3, 4, 4))]  # quarter-area crop of the target and its low-res
    full = m.generate(torch.rand(2, 3, 8, 8) * 2 - 1, generator=torch.Generator().manual_seed(0))
    assert full.shape == (2, 3, 16, 16) and shapes[-1] == ((2, 3, 16, 16), (2, 3, 8, 8))
    wide = m.generate(torch.rand(1, 3, 8, 12) * 2 - 1, generator=torch.Generator().manual_seed(0))
    assert wide.shape == (1, 3, 16, 24) and wide.abs().max() <= 1  # static clipping keeps [-1, 1]


def test_default_crop_is_a_quarter_and_bad_sizes_are_rejected():
    assert module(unet={**UNET, "image_size": 64}, low_res_size=16, crop_size=None).crop_size == 16
    with pytest.raises(ValueError):
        module(low_res_size=6)  # 16 is not a multiple of 6
    with pytest.raises(ValueError):
        module(crop_size=6, low_res_size=4)  # 6 is not divisible by the 4x factor
    with pytest.raises(ValueError):
        module(unet={**UNET, "channel_mult": (1, 2, 2)}, crop_size=6)  # 6 % U-Net stride 4
    with pytest.raises(ValueError):
        module(sample_aug_level=1.5)


def test_generate_is_seeded_and_applies_the_sampling_corruption():
    m = module(degradation={"kind": "BLUR", "blur_sigma_max": 1.5}, sample_aug_level=0.5)
    low = torch.rand(2, 3, 8, 8) * 2 - 1
    seen: list[dict] = []
    m.unet.register_forward_hook(lambda mod, args, kwargs, out: seen.append(kwargs), with_kwargs=True)
    a = m.generate(low, generator=torch.Generator().manual_seed(3))
    b = m.generate(low, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.allclose(seen[0]["low_res"], gaussian_blur(low, 0.75).clamp(-1, 1))  # σ = 0.5 · 1.5
    assert torch.equal(seen[0]["aug_level"], torch.full((2,), 0.5))
    m.generate(low, aug_level=0.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(seen[-1]["low_res"], low) and seen[-1]["aug_level"].abs().max() == 0


def test_training_levels_follow_aug_prob_and_max():
    m = module(aug_prob=0.3, max_train_aug=0.6)
    levels = m.training_levels(20000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert (levels == 0).float().mean().item() == pytest.approx(0.7, abs=0.02)
    nonzero = levels[levels > 0]
    assert nonzero.max() <= 0.6 and nonzero.mean().item() == pytest.approx(0.3, abs=0.01)


def full_size_loss(m: SuperResModule, images: torch.Tensor) -> float:
    """Mean ε-MSE at full size over fixed timesteps and fixed noise, clean conditioning."""
    g = torch.Generator().manual_seed(123)
    eps = torch.randn(images.shape, generator=g)
    cond = {"low_res": m.make_low_res(images), "aug_level": torch.zeros(images.shape[0])}
    losses = []
    with torch.no_grad():
        for step in (100, 300, 600):
            t = torch.full((images.shape[0],), step)
            losses.append(m.diffusion.training_losses(m.unet, images, t, model_kwargs=cond, noise=eps)["loss"].mean())
    return torch.stack(losses).mean().item()


def test_tiny_fit_on_crops_lowers_the_full_size_loss():
    m = module(optimizer={"lr": 2e-3}, degradation={"kind": "BLUR"}, aug_prob=0.5)
    m.log = lambda *args, **kwargs: None  # no trainer attached
    data, held_out = rectangles(64, seed=0), rectangles(16, seed=1)
    before = full_size_loss(m, held_out)
    opt = m.configure_optimizers()["optimizer"]
    torch.manual_seed(0)
    for step in range(60):
        batch = data[torch.randint(0, 64, (16,))]
        loss = m.training_step({"image": batch}, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = full_size_loss(m, held_out)
    assert after < 0.6 * before, (before, after)


def test_log_images_columns():
    m = module()
    image = rectangles(3)
    out = m.log_images({"image": image, "caption": ["a"] * 3}, n=2)
    for key in ("low_res", "bicubic", "samples", "real"):
        assert out[key].shape == (2, 3, 16, 16) and 0 <= out[key].min() and out[key].max() <= 1
    assert out["comparison"].shape == (2, 3, 16, 64)
    expected = (bicubic_upsample(m.make_low_res(image[:2]), (16, 16)) + 1) / 2
    assert torch.allclose(out["bicubic"], expected.clamp(0, 1))


def test_checkpoint_round_trip_with_plain_hparams(tmp_path):
    m = module(downsample=Resampling.BICUBIC, degradation={"kind": Augmentation.BSR})
    loader = torch.utils.data.DataLoader([{"image": x} for x in rectangles(8)], batch_size=4)
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(m, loader)
    path = tmp_path / "sr.ckpt"
    trainer.save_checkpoint(path)
    assert isinstance(torch.load(path, weights_only=True)["hyper_parameters"]["degradation"]["kind"], str)
    loaded = SuperResModule.load_from_checkpoint(path)
    assert loaded.downsample is Resampling.BICUBIC and loaded.degrade.kind is Augmentation.BSR
    assert loaded.sampling == SamplingConfig(steps=5)
    low = torch.rand(1, 3, 8, 8) * 2 - 1
    a = m.eval().generate(low, generator=torch.Generator().manual_seed(0))
    b = loaded.eval().generate(low, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize(("name", "params_m", "steps", "kind"), [
    ("paper_256.yaml", 731.7, 27, Augmentation.BLUR),
    ("paper_1024.yaml", 282.8, 15, Augmentation.BSR),
    ("tiny.yaml", 1.15, 27, Augmentation.BLUR),
])
def test_experiment_configs_build(name, params_m, steps, kind):
    """Every superres YAML builds (paper scale on the meta device) with the stated size."""
    cfg = yaml.safe_load((EXPERIMENTS / name).read_text())
    assert cfg["model"]["class_path"] == "modules.stages.superres.SuperResModule"
    args = cfg["model"]["init_args"]
    with torch.device("meta"):
        m = SuperResModule(**args)
    n = sum(p.numel() for p in m.unet.parameters()) / 1e6
    assert n == pytest.approx(params_m, rel=0.01)
    assert m.sampling.steps == steps and m.degrade.kind is kind
    assert m.crop_size == m.unet.config.image_size // 4  # a quarter of the target, as in the paper
    assert cfg["data"]["init_args"]["image_size"] == m.unet.config.image_size
