"""`unclip pipeline|generate|vary|interpolate|textdiff` on success paths: Lightning stage checkpoints
(decoder, diffusion or AR prior, upsampler) -> `unclip pipeline` -> `UnCLIPPipeline.load` with the
checkpoints' exact weights -> the commands' files, sizes, JSON records, determinism, the prior mode
and the guidance flags. Tiny stages (16 px decoder, 16 -> 32 upsampler), 2-3 sampling steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from modules.cli.main import main
from modules.pipelines.unclip import GenerateConfig, UnCLIPPipeline

PROMPTS = ["a red circle", "a blue square"]


def _perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Wake zero-initialised layers so every output depends on every input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module


def _decoder():
    from modules.networks.unet import UNetConfig
    from modules.stages.decoder import DecoderModule

    unet = UNetConfig(image_size=16, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                      attention_resolutions=(8,), num_head_channels=16)
    return _perturb(DecoderModule(unet=unet, clip_model="tiny-vit", sampling={"steps": 3, "guidance_scale": 2.0}), 1)


def _prior():
    from modules.networks.prior_transformer import PriorConfig
    from modules.stages.prior import PriorModule

    return _perturb(PriorModule(prior=PriorConfig(width=32, depth=2, heads=2), clip_model="tiny-vit",
                                sampling={"steps": 3, "clipping": "NONE"}), 2)


def _ar_prior():
    from modules.stages.ar_prior import ARPriorModule

    m = ARPriorModule(prior=dict(num_components=6, num_buckets=16, similarity_buckets=4, width=32, depth=2, heads=2),
                      clip_model="tiny-vit", fit_samples=256)
    g = torch.Generator().manual_seed(3)
    zi = F.normalize(torch.randn(256, m.conditioner.embed_dim, generator=g), dim=-1)
    zt = F.normalize(zi + torch.randn(zi.shape, generator=g), dim=-1)
    m.quantizer.fit(zi, zt)  # the PCA and buckets a `fit` would have put in the checkpoint
    return _perturb(m, 3)


def _upsampler():
    from modules.stages.superres import SuperResModule

    return _perturb(SuperResModule(unet=dict(image_size=32, model_channels=16, channel_mult=(1, 2), num_res_blocks=1),
                                   low_res_size=16, crop_size=16, sampling={"steps": 2}), 4)


def _checkpoint(module: pl.LightningModule, path: Path) -> dict[str, torch.Tensor]:
    """What `trainer.save_checkpoint` writes for `module`; returns the checkpoint's state_dict."""
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    out = {}
    for name, build in (("decoder", _decoder), ("prior", _prior), ("ar_prior", _ar_prior), ("upsampler", _upsampler)):
        path = root / f"{name}.ckpt"
        out[name] = (path, _checkpoint(build(), path))
    return out


def _assemble(ckpts, out: Path, prior: str, prior_class: str | None = None) -> Path:
    argv = ["pipeline", "--clip-model", "tiny-vit", "--decoder", str(ckpts["decoder"][0]), "--prior", str(ckpts[prior][0]),
            "--upsampler", str(ckpts["upsampler"][0]), "--out", str(out)]
    assert main(argv + (["--prior-class", prior_class] if prior_class else [])) == 0
    return out


@pytest.fixture(scope="module")
def prior_pipe(ckpts, tmp_path_factory) -> Path:
    return _assemble(ckpts, tmp_path_factory.mktemp("pipes") / "diffusion_prior", "prior")


@pytest.fixture(scope="module")
def ar_pipe(ckpts, tmp_path_factory) -> Path:
    return _assemble(ckpts, tmp_path_factory.mktemp("pipes") / "ar_prior", "ar_prior", "modules.stages.ar_prior.ARPriorModule")


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> list[Path]:
    """Three distinct 24 px RGB inputs (not the decoder's size: the commands resize)."""
    root = tmp_path_factory.mktemp("png")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        arr = (rng.random((24, 24, 3)) * 255).astype(np.uint8)
        arr[: 8 * (i + 1)] = (40 * i, 200 - 60 * i, 90)  # distinct flat bands: distinct CLIP embeddings
        paths.append(root / f"in{i}.png")
        Image.fromarray(arr).save(paths[-1])
    return paths


def _assert_same_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = module.state_dict()
    assert sorted(loaded) == sorted(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def _files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


def _generate(pipe: Path, out: Path, *extra: str, prompts=PROMPTS, num: int = 2, seed: int = 5) -> Path:
    argv = ["generate", "--pipeline", str(pipe), "--out", str(out), "--num-images", str(num), "--seed", str(seed),
            "--steps", "2"]
    for p in prompts:
        argv += ["--prompt", p]
    assert main(argv + list(extra)) == 0
    return out


def _stack(out: Path) -> np.ndarray:
    return np.stack([_pixels(out / n) for n in _files(out) if n[0].isdigit()])


# ------------------------------------------------------------------------------ unclip pipeline
def test_pipeline_with_diffusion_prior_and_upsampler_holds_the_checkpoints_weights(prior_pipe: Path, ckpts):
    assert _files(prior_pipe) == ["clip.safetensors", "decoder.safetensors", "pipeline.json", "prior.safetensors",
                                  "upsampler0.safetensors"]
    spec = json.loads((prior_pipe / "pipeline.json").read_text())
    assert spec["prior"]["class_path"] == "modules.stages.prior.PriorModule"
    assert [u["class_path"] for u in spec["upsamplers"]] == ["modules.stages.superres.SuperResModule"]
    pipe = UnCLIPPipeline.load(prior_pipe)
    _assert_same_state(pipe.decoder, ckpts["decoder"][1])
    _assert_same_state(pipe.prior, ckpts["prior"][1])
    assert len(pipe.upsamplers) == 1
    _assert_same_state(pipe.upsamplers[0], ckpts["upsampler"][1])
    assert pipe.prior.sampling.steps == 3 and pipe.upsamplers[0].unet.config.image_size == 32  # hparams carried


def test_pipeline_with_ar_prior_holds_the_checkpoints_weights_and_pca(ar_pipe: Path, ckpts):
    from modules.stages.ar_prior import ARPriorModule

    spec = json.loads((ar_pipe / "pipeline.json").read_text())
    assert spec["prior"]["class_path"] == "modules.stages.ar_prior.ARPriorModule"
    pipe = UnCLIPPipeline.load(ar_pipe)
    assert isinstance(pipe.prior, ARPriorModule) and pipe.prior.quantizer.is_fitted
    _assert_same_state(pipe.prior, ckpts["ar_prior"][1])
    _assert_same_state(pipe.decoder, ckpts["decoder"][1])
    _assert_same_state(pipe.upsamplers[0], ckpts["upsampler"][1])
    z = pipe.image_embeddings(pipe.encode_text(PROMPTS), GenerateConfig(), torch.Generator().manual_seed(0))
    assert z.shape == (2, pipe.prior.conditioner.embed_dim)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(2))


def test_generate_with_ar_prior_pipeline(ar_pipe: Path, tmp_path: Path):
    a = _generate(ar_pipe, tmp_path / "a", prompts=PROMPTS[:1])
    assert _files(a) == ["000_00.png", "000_01.png", "grid.png", "prompts.json"]
    assert Image.open(a / "000_00.png").size == (32, 32)
    b = _generate(ar_pipe, tmp_path / "b", "--no-prior", prompts=PROMPTS[:1])
    assert not np.array_equal(_stack(a), _stack(b))  # the AR prior's z_i, not z_t, reached the decoder


# ------------------------------------------------------------------------------ unclip generate
def test_generate_files_size_and_determinism(prior_pipe: Path, tmp_path: Path, capsys):
    a = _generate(prior_pipe, tmp_path / "a")
    assert _files(a) == ["000_00.png", "000_01.png", "001_00.png", "001_01.png", "grid.png", "prompts.json"]
    assert json.loads((a / "prompts.json").read_text()) == {"000": PROMPTS[0], "001": PROMPTS[1]}
    assert all(Image.open(a / n).size == (32, 32) for n in ("000_00.png", "001_01.png"))  # the upsampler's size
    grid = _pixels(a / "grid.png")
    assert grid.shape == (2 + 2 * (32 + 2), 2 + 2 * (32 + 2), 3)  # 2 x 2 tiles, 2 px gaps
    assert np.array_equal(grid[2:34, 36:68], _pixels(a / "000_01.png"))  # row 0 is prompt 0
    assert np.array_equal(grid[36:68, 2:34], _pixels(a / "001_00.png"))
    assert "4 images of 32 px" in capsys.readouterr().out
    b = _generate(prior_pipe, tmp_path / "b")
    for name in _files(a):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name  # same seed: same files
    c = _generate(prior_pipe, tmp_path / "c", seed=6)
    assert not np.array_equal(_stack(a), _stack(c))
    imgs = _stack(a)
    assert not np.array_equal(imgs[0], imgs[1])  # two samples of one prompt differ


def test_no_prior_feeds_z_t_and_changes_the_images(prior_pipe: Path, tmp_path: Path):
    with_prior = _stack(_generate(prior_pipe, tmp_path / "prior"))
    no_prior = _generate(prior_pipe, tmp_path / "text", "--no-prior")
    again = _generate(prior_pipe, tmp_path / "text2", "--no-prior")
    assert _files(no_prior)[:4] == ["000_00.png", "000_01.png", "001_00.png", "001_01.png"]
    assert not np.array_equal(with_prior, _stack(no_prior))
    assert np.array_equal(_stack(no_prior), _stack(again))
    # without the prior, --prior-guidance has nothing to act on
    ignored = _generate(prior_pipe, tmp_path / "text3", "--no-prior", "--prior-guidance", "4")
    assert np.array_equal(_stack(no_prior), _stack(ignored))


@pytest.mark.parametrize("flag, own, other", [("--decoder-guidance", "2.0", "1.0"), ("--prior-guidance", "1.0", "4.0")])
def test_guidance_flag_is_applied(prior_pipe: Path, tmp_path: Path, flag: str, own: str, other: str):
    """At the stage's own scale (decoder 2.0, prior 1.0) the flag changes nothing; at another it does."""
    default = _stack(_generate(prior_pipe, tmp_path / "default", prompts=PROMPTS[:1]))
    same = _stack(_generate(prior_pipe, tmp_path / "same", flag, own, prompts=PROMPTS[:1]))
    changed = _stack(_generate(prior_pipe, tmp_path / "other", flag, other, prompts=PROMPTS[:1]))
    assert np.array_equal(default, same)
    assert not np.array_equal(default, changed)


def test_prior_guidance_flag_with_ar_prior(ar_pipe: Path, tmp_path: Path):
    default = _stack(_generate(ar_pipe, tmp_path / "default", prompts=PROMPTS[:1]))
    other = _stack(_generate(ar_pipe, tmp_path / "other", "--prior-guidance", "4.0", prompts=PROMPTS[:1]))
    assert not np.array_equal(default, other)


def test_evaluate_shapes_prior_guidance_reaches_the_ar_prior(ar_pipe: Path, tmp_path: Path):
    """The AR prior has no SamplingConfig; --prior-guidance-scale still reaches it, as generate's flag does."""
    base = ["evaluate-shapes", "--pipeline", str(ar_pipe), "--num-prompts", "3", "--steps", "2", "--no-upsample"]
    assert main(base + ["--out", str(tmp_path / "own")]) == 0
    assert main(base + ["--prior-guidance-scale", "4", "--out", str(tmp_path / "other")]) == 0
    images = lambda run, arm: [p.read_bytes() for p in sorted((tmp_path / run / arm / "images").iterdir())]  # noqa: E731
    assert images("own", "text") == images("other", "text")
    assert images("own", "prior") != images("other", "prior")


# ------------------------------------------------------------------------------ manipulations
def test_vary_writes_variations_and_a_finite_inversion_error(prior_pipe: Path, pngs, tmp_path: Path, capsys):
    out = tmp_path / "vary"
    argv = ["vary", "--pipeline", str(prior_pipe), "--image", str(pngs[0]), "--image", str(pngs[1]),
            "--num-images", "2", "--steps", "2", "--eta", "0.5", "--seed", "1", "--out", str(out)]
    assert main(argv) == 0
    assert _files(out) == ["000_00.png", "000_01.png", "001_00.png", "001_01.png", "grid.png", "inputs.json"]
    assert Image.open(out / "000_00.png").size == (32, 32)  # variations go through the upsampler
    record = json.loads((out / "inputs.json").read_text())
    assert record["images"] == [str(pngs[0]), str(pngs[1])] and record["eta"] == 0.5
    err = record["inversion_mae"]
    assert isinstance(err, float) and math.isfinite(err) and 0.0 <= err <= 1.0
    assert f"mean |error| {err:.4f}" in capsys.readouterr().out
    imgs = _stack(out)
    assert not np.array_equal(imgs[0], imgs[1])  # eta > 0: two variations of one image differ
    again = tmp_path / "vary2"
    assert main(argv[:-1] + [str(again)]) == 0
    assert np.array_equal(imgs, _stack(again))


@pytest.mark.parametrize("latent", ["inverted", "random"])
def test_interpolate_row_runs_from_the_first_image_to_the_second(prior_pipe: Path, pngs, tmp_path: Path, latent: str):
    def row(a: Path, b: Path, name: str) -> np.ndarray:
        out = tmp_path / name
        assert main(["interpolate", "--pipeline", str(prior_pipe), "--image", str(a), "--image", str(b),
                     "--num-images", "3", "--steps", "2", "--seed", "2", "--latent", latent, "--out", str(out)]) == 0
        assert _files(out) == ["000_00.png", "000_01.png", "000_02.png", "grid.png", "inputs.json"]
        assert json.loads((out / "inputs.json").read_text()) == {"images": [str(a), str(b)], "latent": latent,
                                                                 "guidance_scale": None}
        return _stack(out)

    ab, ac, cb = row(pngs[0], pngs[1], "ab"), row(pngs[0], pngs[2], "ac"), row(pngs[2], pngs[1], "cb")
    assert ab.shape == (3, 32, 32, 3)
    # theta = 0 is image a's z_i (and, inverted, a's x_T) and theta = 1 image b's: the first frame
    # depends on the first image only, the last on the second only (same seed).
    assert np.abs(ab[0] - ac[0]).max() <= 1
    assert np.abs(ab[-1] - cb[-1]).max() <= 1
    assert not np.array_equal(ab[0], ab[-1])
    assert not np.array_equal(ab[-1], ac[-1])


def test_textdiff_writes_a_row_and_its_inputs(prior_pipe: Path, pngs, tmp_path: Path):
    out = tmp_path / "td"
    assert main(["textdiff", "--pipeline", str(prior_pipe), "--image", str(pngs[0]), "--base-caption", "a red circle",
                 "--caption", "a blue circle", "--num-images", "3", "--max-theta", "0.4", "--steps", "2",
                 "--out", str(out)]) == 0
    assert _files(out) == ["000_00.png", "000_01.png", "000_02.png", "grid.png", "inputs.json"]
    record = json.loads((out / "inputs.json").read_text())
    assert record["image"] == str(pngs[0]) and record["caption"] == "a blue circle"
    assert record["base_caption"] == "a red circle" and record["max_theta"] == 0.4 and record["num_images"] == 3
    imgs = _stack(out)
    assert imgs.shape == (3, 32, 32, 3) and not np.array_equal(imgs[0], imgs[-1])


def test_textdiff_row_images(prior_pipe: Path, pngs, tmp_path: Path):
    """theta 0 is the image itself (its z_i, its inverted x_T), so it does not depend on the
    captions; later frames do."""

    def row(caption: str, name: str) -> np.ndarray:
        out = tmp_path / name
        assert main(["textdiff", "--pipeline", str(prior_pipe), "--image", str(pngs[0]), "--base-caption", "a red circle",
                     "--caption", caption, "--num-images", "3", "--max-theta", "0.5", "--steps", "2", "--out", str(out)]) == 0
        assert _files(out) == ["000_00.png", "000_01.png", "000_02.png", "grid.png", "inputs.json"]
        record = json.loads((out / "inputs.json").read_text())
        assert record["caption"] == caption and record["max_theta"] == 0.5 and record["image"] == str(pngs[0])
        return _stack(out)

    blue, square = row("a blue circle", "blue"), row("a red square", "square")
    assert blue.shape == (3, 32, 32, 3)
    assert np.abs(blue[0] - square[0]).max() <= 1
    assert not np.array_equal(blue[-1], square[-1])


def test_generate_keeps_the_decoders_dynamic_percentile(prior_pipe: Path, tmp_path: Path, monkeypatch):
    """`generate` overrides only steps and guidance: the rest of the decoder's sampling config (here
    Imagen-style dynamic thresholding at percentile 0.9) reaches the sampler unchanged."""
    import dataclasses

    from modules.pipelines.unclip import UnCLIPPipeline

    seen = []
    original = UnCLIPPipeline.generate

    def spy(self, prompts, num_images=1, *, seed=0, config=None):
        seen.append(config.decoder_sampling)
        return original(self, prompts, num_images, seed=seed, config=config)

    load = UnCLIPPipeline.load

    def load_dynamic(directory, device="cpu"):
        pipe = load(directory, device)
        pipe.decoder.sampling = dataclasses.replace(pipe.decoder.sampling, clipping="DYNAMIC", dynamic_percentile=0.9)
        return pipe

    monkeypatch.setattr(UnCLIPPipeline, "generate", spy)
    monkeypatch.setattr(UnCLIPPipeline, "load", staticmethod(load_dynamic))
    _generate(prior_pipe, tmp_path / "dyn", prompts=PROMPTS[:1])
    (sampling,) = seen
    assert sampling.clipping.name == "DYNAMIC" and sampling.dynamic_percentile == 0.9 and sampling.steps == 2
