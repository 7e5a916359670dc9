"""DecoderModule: the training step learns, CFG dropout rates, sampling, safe checkpoints, CLI fit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import open_clip
import pytest
import torch

from modules.stages.registry import init_kwargs
from modules.stages.decoder import DecoderModule
from modules.networks.unet import UNetConfig
from modules.diffusion.config import SamplingConfig

TINY_UNET = UNetConfig(image_size=16, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                       attention_resolutions=(8,), num_head_channels=16)


def _batch(n: int = 4, size: int = 16) -> dict:
    g = torch.Generator().manual_seed(0)
    captions = ["a red circle", "a blue square", "a green triangle above a red circle", "a photo of a yellow square"][:n]
    return {
        "image": torch.rand(n, 3, size, size, generator=g) * 2 - 1,
        "tokens": open_clip.get_tokenizer("tiny-vit")(captions),
        "caption": captions,
    }


def _module(**kw) -> DecoderModule:
    torch.manual_seed(0)
    return DecoderModule(unet=TINY_UNET, clip_model="tiny-vit", **kw)


def test_unet_dims_come_from_clip():
    m = _module()
    assert m.unet.config.image_embed_dim == 64 and m.unet.config.text_embed_dim == 64
    m = _module(condition_on_text=False)
    assert m.unet.config.text_embed_dim is None


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    m = _module(optimizer={"lr": 2e-3})
    batch = _batch()
    opt = m.configure_optimizers()["optimizer"]
    cond = m.condition(batch, drop=False)
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (64,), generator=g)
    noise = torch.randn(64, 3, 16, 16, generator=g)
    x0 = batch["image"].repeat(16, 1, 1, 1)
    cond = {k: v.repeat(16, *([1] * (v.ndim - 1))) for k, v in cond.items()}

    def loss() -> torch.Tensor:
        return m.diffusion.training_losses(m.unet, x0, t, model_kwargs=cond, noise=noise)["loss"].mean()

    with torch.no_grad():
        before = loss().item()
    for _ in range(30):
        opt.zero_grad()
        m.training_step(batch, 0).backward()
        opt.step()
    with torch.no_grad():
        after = loss().item()
    assert after < 0.8 * before, (before, after)


def test_cfg_dropout_rates():
    m = _module(drop_image_prob=0.1, drop_text_prob=0.5)
    torch.manual_seed(0)
    batch = {k: (v.repeat(250, *([1] * (v.ndim - 1))) if torch.is_tensor(v) else v * 250) for k, v in _batch().items()}
    cond = m.condition(batch, drop=True)
    assert abs(cond["drop_image"].float().mean().item() - 0.1) < 0.03
    assert abs(cond["drop_text"].float().mean().item() - 0.5) < 0.05
    assert not m.condition(batch, drop=False)["drop_image"].any()


def test_image_embed_noise_only_in_training_and_keeps_unit_norm():
    batch = _batch()
    clean = _module().condition(batch, drop=False)["image_embed"]
    m = _module(image_embed_noise=0.05, drop_image_prob=0.0)
    torch.manual_seed(0)
    noisy = m.condition(batch, drop=True)["image_embed"]
    torch.testing.assert_close(noisy.norm(dim=-1), torch.ones(len(noisy)))
    cos = (noisy * clean).sum(-1)
    assert (cos < 1 - 1e-3).all() and (cos > 0.8).all(), cos  # moved, by about σ·√D = 0.4 before renormalising
    torch.testing.assert_close(m.condition(batch, drop=False)["image_embed"], clean)  # never at validation / sampling


def _perturbed(m: DecoderModule) -> DecoderModule:
    """Zero-initialised output layers make a fresh U-Net ignore its input; wake them up."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in m.unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


def test_generate_is_seeded_and_guidance_changes_samples():
    m = _perturbed(_module()).eval()
    cond = m.condition(_batch(2), drop=False)
    fast = SamplingConfig(steps=4, guidance_scale=1.0)
    a = m.generate(cond, sampling=fast, generator=torch.Generator().manual_seed(3))
    b = m.generate(cond, sampling=fast, generator=torch.Generator().manual_seed(3))
    c = m.generate(cond, sampling=SamplingConfig(steps=4, guidance_scale=4.0), generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b)
    assert a.abs().max() <= 1.0 + 1e-6  # static clipping keeps x0 in range
    assert not torch.allclose(a, c)
    logged = m.log_images(_batch(2), n=2)
    assert logged["samples"].shape == (2, 3, 16, 16) and 0 <= logged["samples"].min() and logged["samples"].max() <= 1


def test_checkpoint_loads_with_weights_only(tmp_path: Path):
    m = _module()
    with torch.no_grad():  # the last conv starts at zero: perturb every weight so outputs differ from 0
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(m)
    path = tmp_path / "dec.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)  # plain hparams: no arbitrary unpickling needed
    restored = DecoderModule(**init_kwargs(ckpt["hyper_parameters"]))
    restored.load_state_dict(ckpt["state_dict"])
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([10])
    out = m.unet(x, t)
    assert out.abs().mean() > 1e-3 and torch.equal(restored.unet(x, t), out)


@pytest.mark.slow
def test_unclip_fit_decoder_from_yaml_lowers_loss(tmp_path: Path):
    from modules.cli import data as data_command

    data = tmp_path / "shapes"
    data_command.main(["shapes", "--out", str(data), "--num-samples", "400", "--size", "32", "--seed", "0", "--workers", "1"])
    root = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "modules.cli", "fit", "--config", "experiments/decoder/tiny.yaml",
        f"--data.train_shards={data}/train-*.tar", f"--data.val_shards={data}/val-*.tar",
        "--data.loader.num_workers=0", "--data.loader.batch_size=16", "--trainer.max_steps=60", "--trainer.val_check_interval=30",
        "--trainer.max_time=null", "--model.unet.model_channels=16", "--model.optimizer.lr=0.002",
        f"--trainer.default_root_dir={root}", "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={root}", "--trainer.callbacks=null", "--trainer.enable_progress_bar=false",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    import csv

    rows = list(csv.DictReader(open(next(root.rglob("metrics.csv")))))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 2 and losses[-1] < losses[0], losses
    assert (root / "config.yaml").exists() or any(root.rglob("config.yaml"))


def test_bf16_sampling_runs_the_unet_in_bf16_and_stays_close_to_fp32(monkeypatch):
    """`sampling.precision: BF16`: the U-Net's forward under bf16 autocast (its output handed back in
    fp32 to guidance and the DDIM update); the samples stay within bf16 rounding of the fp32 ones.
    (bf16 is taken as native here, so an AVX2-only CPU runs the bf16 path too, slowly.)"""
    monkeypatch.setattr("modules.diffusion.config.native_bf16", lambda device_type: True)
    m = _perturbed(_module()).eval()
    cond = m.condition(_batch(2), drop=False)
    seen: list[tuple[bool, torch.dtype]] = []
    hook = m.unet.conv_in.register_forward_hook(
        lambda mod, args, out: seen.append((torch.is_autocast_enabled("cpu"), out.dtype)))
    samples = {}
    for precision in ("FP32", "BF16"):
        seen.clear()
        cfg = SamplingConfig(steps=4, guidance_scale=3.0, precision=precision)
        samples[precision] = m.generate(cond, sampling=cfg, generator=torch.Generator().manual_seed(3))
        assert len(seen) == 4 and set(seen) == ({(False, torch.float32)} if precision == "FP32" else {(True, torch.bfloat16)})
    hook.remove()
    fp32, bf16 = samples["FP32"], samples["BF16"]
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    assert not torch.equal(bf16, fp32) and (bf16 - fp32).abs().mean() < 0.02


def test_token_id_decoder_trains_its_caption_embedding_from_clip_ids():
    """`unet.text_vocab_size`: the decoder reads the caption's CLIP token ids (trimmed like the token
    states) and a training step's gradient reaches the embedding rows of exactly those ids."""
    import dataclasses

    _module()  # registers the project's open_clip configs
    vocab = open_clip.get_model_config("tiny-vit")["text_cfg"]["vocab_size"]
    m = _perturbed(DecoderModule(unet=dataclasses.replace(TINY_UNET, text_vocab_size=vocab), clip_model="tiny-vit"))
    assert m.unet.config.text_embed_dim is None
    batch = _batch()
    cond = m.condition(batch, drop=False)
    length = cond["text_mask"].shape[1]
    assert "text_tokens" not in cond and torch.equal(cond["text_ids"], batch["tokens"][:, :length])
    assert cond["text_mask"].sum(1).max() == length  # trimmed to the longest caption (SOT .. EOT)
    m.training_step(batch, 0).backward()
    grad_rows = m.unet.conditioner.token_embedding.weight.grad.abs().sum(1).nonzero().flatten()
    used = batch["tokens"][:, :length][m.condition(batch, drop=False)["text_mask"]].unique()
    assert set(grad_rows.tolist()) <= set(used.tolist()) and len(grad_rows) > 0
    with pytest.raises(Exception, match="token ids"):  # exported embeddings carry no ids
        m.unet_kwargs({"image_embed": torch.randn(2, 64), "text_tokens": torch.randn(2, 3, 64),
                       "text_mask": torch.ones(2, 3, dtype=torch.bool)})
    with pytest.raises(Exception, match=r"\[0, 49408\)"):
        m.unet_kwargs({**cond, "text_ids": cond["text_ids"] + vocab})
    with pytest.raises(Exception, match="condition_on_text"):
        DecoderModule(unet=dataclasses.replace(TINY_UNET, text_vocab_size=vocab), condition_on_text=False)
