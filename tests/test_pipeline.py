"""UnCLIPPipeline: safe save/load round trip, generation CLI conventions, manipulations, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modules.cli.main import main
from modules.stages.decoder import DecoderModule
from modules.pipelines.manipulations import interpolate, reconstruction_error, slerp, text_diff, variations
from modules.networks.clip import FrozenCLIP
from modules.networks.unet import UNetConfig
from modules.core.errors import PipelineError
from modules.pipelines.unclip import GenerateConfig, PriorMode, UnCLIPPipeline
from modules.diffusion.config import SamplingConfig

FAST = {"steps": 3, "guidance_scale": 2.0}


def _pipeline(**unet_options) -> UnCLIPPipeline:
    torch.manual_seed(0)
    unet = UNetConfig(image_size=16, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                      attention_resolutions=(8,), num_head_channels=16, **unet_options)
    decoder = DecoderModule(unet=unet, clip_model="tiny-vit", sampling=FAST)
    with torch.no_grad():  # wake up zero-initialised layers so outputs depend on inputs
        for p in decoder.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return UnCLIPPipeline(FrozenCLIP("tiny-vit"), decoder)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return _pipeline().save(tmp_path_factory.mktemp("p") / "pipe")


def test_save_load_round_trip_is_exact(saved: Path):
    pipe = _pipeline()
    loaded = UnCLIPPipeline.load(saved)
    spec = json.loads((saved / "pipeline.json").read_text())
    assert spec["format"] == "unclip-pipeline" and spec["version"] == 1
    assert sorted(p.name for p in saved.iterdir()) == ["clip.safetensors", "decoder.safetensors", "pipeline.json"]
    a = pipe.generate(["a red circle", "a blue square"], 2, seed=7)
    b = loaded.generate(["a red circle", "a blue square"], 2, seed=7)
    assert a.shape == (4, 3, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a, pipe.generate(["a red circle", "a blue square"], 2, seed=8))


def test_token_id_decoder_round_trips_and_reads_the_prompt_ids(tmp_path: Path):
    """A decoder that embeds CLIP token ids itself (`unet.text_vocab_size`, GLIDE's text encoder):
    the pipeline hands it the prompt's ids, trimmed like the token states; saved, loaded and sampled
    bit-identically; another caption with the same z_i gives other images."""
    pipe = _pipeline(text_vocab_size=49408)
    prompts = ["a red circle", "a blue square above a red circle"]
    text = pipe.encode_text(prompts)
    ids = pipe.tokenizer(prompts)
    assert torch.equal(text["text_ids"], ids[:, : text["text_mask"].shape[1]])
    loaded = UnCLIPPipeline.load(pipe.save(tmp_path / "pipe"))
    a, b = pipe.generate(prompts, 1, seed=3), loaded.generate(prompts, 1, seed=3)
    assert torch.equal(a, b)
    z = text["text_embed"]
    gen = lambda t: pipe.decoder.generate(pipe.decoder_kwargs(t, z), generator=torch.Generator().manual_seed(0))
    other = pipe.encode_text(["a green triangle", "a blue square below a red circle"])
    assert (gen(text) - gen(other)).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def _full_pipeline() -> UnCLIPPipeline:
    """Decoder plus a diffusion prior and a 16 -> 32 upsampler (weights perturbed from init)."""
    from modules.networks.prior_transformer import PriorConfig
    from modules.stages.prior import PriorModule
    from modules.stages.superres import SuperResModule

    pipe = _pipeline()
    prior = PriorModule(prior=PriorConfig(width=32, depth=2, heads=2), clip_model="tiny-vit",
                        sampling={"steps": 4, "clipping": "NONE"})
    upsampler = SuperResModule(unet=dict(image_size=32, model_channels=16, channel_mult=(1, 2), num_res_blocks=1),
                               low_res_size=16, crop_size=16, sampling={"steps": 3})
    with torch.no_grad():
        for module in (prior, upsampler):
            for p in module.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return UnCLIPPipeline(pipe.clip, pipe.decoder, prior.eval(), [upsampler.eval()])


def test_prior_mode_samples_the_prior_and_text_mode_feeds_z_t(tmp_path: Path):
    pipe = _full_pipeline()
    text = pipe.encode_text(["a red circle", "a blue square"])
    z_text = pipe.image_embeddings(text, GenerateConfig(prior_mode=PriorMode.TEXT), None)
    z_prior = pipe.image_embeddings(text, GenerateConfig(prior_mode=PriorMode.PRIOR), torch.Generator().manual_seed(0))
    assert torch.equal(z_text, text["text_embed"])
    assert z_prior.shape == z_text.shape and not torch.allclose(z_prior, z_text)
    torch.testing.assert_close(z_prior.norm(dim=-1), torch.ones(2))  # unit-norm, as CLIP's


def test_caption_arm_draws_from_the_decoders_null_image_embedding():
    """PriorMode.CAPTION (the paper's caption-only conditioning, §5.1): the U-Net reads its learned null
    z_i in every pass, so the images equal the decoder sampled with drop_image set over any z, and differ
    from those drawn from z_t."""
    from modules.core.draws import key_seed
    from modules.core.images import to_unit

    pipe, prompts = _full_pipeline(), ["a red circle", "a blue square"]
    got = pipe.generate(prompts, 1, seed=4, config=GenerateConfig(prior_mode=PriorMode.CAPTION, upsample=False))
    text = pipe.encode_text(prompts)
    kwargs = pipe.decoder_kwargs(text, torch.nn.functional.normalize(torch.randn(2, text["text_embed"].shape[1]), dim=-1))
    kwargs["drop_image"] = torch.ones(2, dtype=torch.bool)
    want = pipe.decoder.generate(kwargs, generator=torch.Generator().manual_seed(key_seed("generate", 4, "decoder")))
    assert got.shape == (2, 3, 16, 16) and torch.equal(got, to_unit(want))
    z_t = pipe.generate(prompts, 1, seed=4, config=GenerateConfig(prior_mode=PriorMode.TEXT, upsample=False))
    assert (got - z_t).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_generate_config_keeps_the_priors_own_best_of_n_unless_told():
    """GenerateConfig.num_candidates None: the prior's own hparam (the AR prior's 1, not the paper's 2)."""
    pipe = _full_pipeline()
    text = pipe.encode_text(["a red circle", "a blue square"])
    asked: list[int | None] = []
    generate = pipe.prior.generate
    pipe.prior.generate = lambda cond, *, num_candidates, **kw: asked.append(num_candidates) or generate(
        cond, num_candidates=num_candidates, **kw)
    pipe.prior.hparams.num_candidates = 3
    z_own = pipe.image_embeddings(text, GenerateConfig(), torch.Generator().manual_seed(0))
    z_three = pipe.image_embeddings(text, GenerateConfig(num_candidates=3), torch.Generator().manual_seed(0))
    z_two = pipe.image_embeddings(text, GenerateConfig(num_candidates=2), torch.Generator().manual_seed(0))
    assert asked == [None, 3, 2]
    assert torch.equal(z_own, z_three) and not torch.equal(z_own, z_two)


def test_pipeline_with_prior_and_upsampler_round_trips(tmp_path: Path):
    pipe = _full_pipeline()
    loaded = UnCLIPPipeline.load(pipe.save(tmp_path / "full"))
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == [
        "clip.safetensors", "decoder.safetensors", "pipeline.json", "prior.safetensors", "upsampler0.safetensors"]
    a = pipe.generate(["a red circle"], 2, seed=3)
    b = loaded.generate(["a red circle"], 2, seed=3)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b)
    no_prior = loaded.generate(["a red circle"], 2, seed=3, config=GenerateConfig(prior_mode=PriorMode.TEXT))
    assert not torch.equal(a, no_prior)


def test_decoder_candidates_keep_the_sample_clip_scores_highest():
    """Best of n decoder samples per prompt by CLIP(x)·z_t, reproduced from the decoder's own n draws."""
    from modules.core.draws import key_seed
    from modules.core.images import to_unit
    from modules.stages.conditioning import repeat_rows

    pipe, prompts, n = _pipeline(), ["a red circle", "a blue square"], 3
    decoder_seed = key_seed("generate", 5, "decoder")  # the decoder's own generator in generate(seed=5)
    got = pipe.generate(prompts, 1, seed=5, config=GenerateConfig(decoder_candidates=n))
    text = pipe.encode_text(prompts)  # no prior: z_i = z_t, and DDIM (eta 0) draws only x_T
    kwargs = repeat_rows(pipe.decoder_kwargs(text, text["text_embed"]), n)
    candidates = pipe.decoder.generate(kwargs, generator=torch.Generator().manual_seed(decoder_seed)).view(2, n, 3, 16, 16)
    feats = pipe.clip.model.encode_image(pipe.clip.preprocess(candidates.flatten(0, 1))).float()
    scores = (feats / feats.norm(dim=-1, keepdim=True)).view(2, n, -1) @ text["text_embed"].unsqueeze(-1)  # (2, n, 1)
    best = scores.squeeze(-1).argmax(dim=1)
    assert len(set(scores.flatten().tolist())) == 2 * n  # distinct candidates, so the choice is real
    torch.testing.assert_close(got, to_unit(candidates[torch.arange(2), best]), rtol=0, atol=1e-6)
    one = pipe.generate(prompts, 1, seed=5)  # n = 1 (the default): one draw per prompt, no reranking
    plain = pipe.decoder.generate(pipe.decoder_kwargs(text, text["text_embed"]),
                                  generator=torch.Generator().manual_seed(decoder_seed))
    torch.testing.assert_close(one, to_unit(plain), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="decoder_candidates"):
        pipe.decode(text, text["text_embed"], GenerateConfig(decoder_candidates=2), None, x_T=torch.zeros(2, 3, 16, 16))


def test_refuses_unknown_class_and_bad_version(saved: Path, tmp_path: Path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(saved, bad)
    spec = json.loads((bad / "pipeline.json").read_text())
    spec["decoder"]["class_path"] = "os.system"
    (bad / "pipeline.json").write_text(json.dumps(spec))
    with pytest.raises(PipelineError, match="not an allowed decoder"):
        UnCLIPPipeline.load(bad)
    spec["version"] = 99
    (bad / "pipeline.json").write_text(json.dumps(spec))
    with pytest.raises(PipelineError, match="version"):
        UnCLIPPipeline.load(bad)


def test_generate_cli_conventions(saved: Path, tmp_path: Path):
    out = tmp_path / "gen"
    rc = main(["generate", "--pipeline", str(saved), "--prompt", "a red circle", "--prompt", "a green square",
               "--num-images", "2", "--seed", "1", "--out", str(out), "--steps", "3"])
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000_00.png", "000_01.png", "001_00.png", "001_01.png", "grid.png", "prompts.json"]
    assert json.loads((out / "prompts.json").read_text()) == {"000": "a red circle", "001": "a green square"}
    assert Image.open(out / "000_00.png").size == (16, 16)


@pytest.mark.parametrize("argv, message", [
    (["generate", "--pipeline", "/nonexistent/pipe", "--prompt", "x", "--out", "o"], "not a pipeline directory"),
    (["generate", "--pipeline", "PIPE", "--prompt", "  ", "--out", "o"], "empty"),
    (["vary", "--pipeline", "PIPE", "--image", "NOTIMG", "--out", "o"], "not an image file"),
    (["interpolate", "--pipeline", "PIPE", "--image", "NOTIMG", "--out", "o"], "exactly twice"),
])
def test_bad_input_is_one_clear_line(saved: Path, tmp_path: Path, capsys, argv, message):
    notimg = tmp_path / "x.png"
    notimg.write_text("hello")
    argv = [str(saved) if a == "PIPE" else str(notimg) if a == "NOTIMG" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_slerp_endpoints_and_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=-1), torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=-1)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-5) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-5)
    mid = slerp(a, b, 0.5)
    assert torch.allclose(mid.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose((mid * a).sum(-1), (mid * b).sum(-1), atol=1e-5)  # equidistant


def test_slerp_of_latents_keeps_the_inputs_as_endpoints_and_their_norm():
    """normalize=False (Gaussian latents): the endpoints are a and b as given, and between two
    vectors of one norm the path keeps that norm."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3072, generator=g), torch.randn(2, 3072, generator=g)
    b = b * (a.norm(dim=-1, keepdim=True) / b.norm(dim=-1, keepdim=True))
    assert torch.allclose(slerp(a, b, 0.0, normalize=False), a, atol=1e-4)
    assert torch.allclose(slerp(a, b, 1.0, normalize=False), b, atol=1e-4)
    for theta in (0.25, 0.5, 0.75):
        mid = slerp(a, b, theta, normalize=False)
        assert torch.allclose(mid.norm(dim=-1), a.norm(dim=-1), rtol=1e-4)
    assert torch.allclose(slerp(a, b, 0.5), torch.nn.functional.normalize(slerp(a, b, 0.5, normalize=False), dim=-1),
                          atol=1e-5)  # the same direction either way


def test_interpolation_from_inverted_latents_ends_on_the_reconstructions(saved: Path, monkeypatch):
    """Paper §3.2's first option: x_T slerps between the inputs' DDIM inversions, so at guidance 1
    the row's first and last frames are the two images' reconstructions (invert, then decode)."""
    from modules.diffusion.config import Clipping
    from modules.pipelines import manipulations

    monkeypatch.setattr(manipulations, "INVERSE_PAIR", Clipping.STATIC)  # a random decoder saturates unclipped
    pipe = UnCLIPPipeline.load(saved)
    img = torch.rand(2, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    row = interpolate(pipe, img[:1], img[1:], num=4, steps=4, guidance_scale=1.0, latent="inverted")
    rec, _ = reconstruction_error(pipe, img, steps=4, clipping=Clipping.STATIC)
    assert torch.allclose(row[0], rec[0], atol=1e-4) and torch.allclose(row[-1], rec[1], atol=1e-4)
    assert not torch.allclose(row[1], rec[0], atol=1e-2) and not torch.allclose(row[1], rec[1], atol=1e-2)
    random_row = interpolate(pipe, img[:1], img[1:], num=4, steps=4, guidance_scale=1.0, latent="random")
    assert not torch.allclose(random_row[0], rec[0], atol=1e-2)  # a random x_T: a sample of a's z_i, not a
    with pytest.raises(ValueError, match="latent must be one of"):
        interpolate(pipe, img[:1], img[1:], num=2, steps=2, latent="mean")
    # No scale given: the decoder's own (FAST: 2.0); a scale given: that one.
    assert manipulations._sampling(pipe, 4).guidance_scale == pipe.decoder.sampling.guidance_scale == 2.0
    assert manipulations._sampling(pipe, 4, guidance_scale=1.0).guidance_scale == 1.0


def test_manipulations_shapes_and_determinism(saved: Path, monkeypatch):
    from modules.diffusion.config import Clipping
    from modules.pipelines import manipulations

    # A random decoder's x0 estimate leaves [-1, 1] by orders of magnitude, so unclipped decodes
    # saturate every pixel; this test is about shapes and determinism, so it decodes clipped.
    monkeypatch.setattr(manipulations, "INVERSE_PAIR", Clipping.STATIC)
    pipe = UnCLIPPipeline.load(saved)
    img = torch.rand(2, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    v1 = variations(pipe, img, num=2, eta=0.8, steps=4, seed=3)
    v2 = variations(pipe, img, num=2, eta=0.8, steps=4, seed=3)
    assert v1.shape == (4, 3, 16, 16) and torch.equal(v1, v2)
    assert not torch.allclose(v1[0], v1[1])  # eta > 0: the two variations differ
    row = interpolate(pipe, img[:1], img[1:], num=3, steps=4)
    assert row.shape == (3, 3, 16, 16)
    diff = text_diff(pipe, img[:1], "a red circle", "a blue circle", num=3, steps=4)
    assert diff.shape == (3, 3, 16, 16)
    rec, err = reconstruction_error(pipe, img, steps=4)
    assert rec.shape == (2, 3, 16, 16) and np.isfinite(err)


def test_manipulations_invert_and_decode_in_the_decoders_precision(saved: Path, monkeypatch):
    """DDIM inversion and the decodes from its x_T run the U-Net in the decoder's sampling precision
    (both fp32 or both under bf16 autocast), so they stay an inverse pair. (bf16 is taken as native
    here; on a CPU without it both run in fp32, `test_cpu_kernels`.)"""
    monkeypatch.setattr("modules.diffusion.config.native_bf16", lambda device_type: True)
    img = torch.rand(1, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    for precision, autocast in (("FP32", False), ("BF16", True)):
        pipe = UnCLIPPipeline.load(saved)
        pipe.decoder.sampling = SamplingConfig(**FAST, precision=precision)
        seen: list[bool] = []
        pipe.decoder.unet.register_forward_hook(lambda mod, args, out: seen.append(torch.is_autocast_enabled("cpu")))
        reconstruction_error(pipe, img, steps=4)
        text_diff(pipe, img, "a red circle", "a blue circle", num=2, steps=4)
        assert len(seen) == 16 and set(seen) == {autocast}  # 4 inversion + 4 decode steps, twice


def test_unclip_evaluate_on_a_pipeline_dir(saved: Path, tmp_path: Path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square to the left of a green triangle\n")
    out = tmp_path / "eval"
    assert main(["evaluate", "--pipeline", str(saved), "--prompts", str(prompts), "--num-samples", "4", "--batch-size", "2",
                 "--kid-subset-size", "2", "--isc-splits", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["source"]["stage"] == "pipeline" and report["data"]["num_generated"] == 4
    assert "random init" not in report["feature_extractor"]["description"]  # the pipeline's own CLIP
    assert report["shapes_accuracy"]["n_single"] == 2 and report["shapes_accuracy"]["n_two"] == 2
    assert (out / "report.html").is_file()


def test_stages_of_another_clip_are_refused(tmp_path: Path):
    """A decoder trained against tiny-rn in a tiny-vit pipeline (same widths, other space) is refused."""
    pipe = _pipeline()
    other = DecoderModule(unet=UNetConfig(image_size=16, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                          attention_resolutions=(8,), num_head_channels=16), clip_model="tiny-rn")
    with pytest.raises(PipelineError, match="decoder: trained against CLIP 'tiny-rn', but the pipeline's CLIP is 'tiny-vit'"):
        UnCLIPPipeline(pipe.clip, other)


def test_evaluate_shapes_cli_reranks_decoder_samples(saved: Path, tmp_path: Path):
    out = tmp_path / "shapes"
    argv = ["evaluate-shapes", "--pipeline", str(saved), "--num-prompts", "3", "--steps", "2", "--no-upsample",
            "--decoder-candidates", "2", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "shapes_accuracy.json").read_text())
    assert report["decoder_candidates"] == 2 and report["num_prompts"] == 3 and "prior" not in report
    rows = json.loads((out / "text" / "rows.json").read_text())
    assert [r["num_objects"] for r in rows] == [1, 2, 2]  # one single, one scene in both phrasings


def test_evaluate_shapes_arms_score_each_conditioning_on_the_same_draws(tmp_path: Path):
    """--arms picks the scored arms; each arm's images are the same whichever other arms run beside it
    (its own generators), and the caption-only arm's differ from z_t's."""
    saved = _full_pipeline().save(tmp_path / "pipe")
    base = ["evaluate-shapes", "--pipeline", str(saved), "--num-prompts", "3", "--steps", "2", "--no-upsample"]
    assert main(base + ["--out", str(tmp_path / "default")]) == 0
    assert main(base + ["--arms", "caption", "text", "--out", str(tmp_path / "arms")]) == 0
    report = json.loads((tmp_path / "arms" / "shapes_accuracy.json").read_text())
    assert "prior" not in report and {"text", "caption"} <= set(report)
    assert set(json.loads((tmp_path / "default" / "shapes_accuracy.json").read_text())) >= {"prior", "text"}
    images = lambda run, arm: [p.read_bytes() for p in sorted((tmp_path / run / arm / "images").iterdir())]  # noqa: E731
    assert images("default", "text") == images("arms", "text")
    assert images("arms", "caption") != images("arms", "text")
    assert main(base + ["--arms", "image", "--out", str(tmp_path / "bad")]) == 2 and not (tmp_path / "bad").exists()


def test_evaluate_shapes_prior_flags_move_the_prior_arm_only(tmp_path: Path):
    """--prior-candidates / --prior-guidance-scale reach the prior; the no-prior arm, drawn from its own
    generators, is byte-identical to a run without them."""
    saved = _full_pipeline().save(tmp_path / "pipe")
    base = ["evaluate-shapes", "--pipeline", str(saved), "--num-prompts", "3", "--steps", "2", "--no-upsample"]
    assert main(base + ["--out", str(tmp_path / "own")]) == 0
    assert main(base + ["--prior-candidates", "3", "--prior-guidance-scale", "2", "--out", str(tmp_path / "other")]) == 0
    report = json.loads((tmp_path / "other" / "shapes_accuracy.json").read_text())
    assert report["prior_candidates"] == 3 and report["prior_overrides"] == {"guidance_scale": 2.0}
    images = lambda run, arm: [p.read_bytes() for p in sorted((tmp_path / run / arm / "images").iterdir())]  # noqa: E731
    assert images("own", "text") == images("other", "text")
    assert images("own", "prior") != images("other", "prior")
