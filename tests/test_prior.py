"""Diffusion prior: mask and attention, padding/dropout invariances, embedding scale, best-of-n,
learning a caption -> image-embedding map, Lightning fit from embedding shards and on-the-fly CLIP,
safe checkpoints, YAML configs (the paper one on the meta device), and the prior metrics."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from modules.stages.registry import init_kwargs
from modules.diffusion.config import SamplingConfig
from modules.networks.prior_transformer import PriorConfig, PriorTransformer, count_parameters
from modules.networks.transformer import SelfAttention, TransformerStack, causal_key_mask
from modules.stages.prior_metrics import (
    RunningMean,
    class_retrieval_accuracy,
    compare_to_baselines,
    embedding_scores,
    evaluation_table,
    nearest_image_cos,
)
from modules.stages.prior import PriorModule, select_best

D = W = 64  # tiny-vit widths
TINY = PriorConfig(embed_dim=D, text_width=W, width=32, depth=2, heads=2)
ROOT = Path(__file__).resolve().parents[1]


def synthetic(n: int, classes: int = 4, seed: int = 0, length: int = 6) -> dict[str, torch.Tensor]:
    """Embedding batch where each class has its own caption tokens, z_t and (different) z_i."""
    g = torch.Generator().manual_seed(123)  # the classes are fixed; `seed` draws the samples
    zt = F.normalize(torch.randn(classes, D, generator=g), dim=-1)
    zi = F.normalize(torch.randn(classes, D, generator=g), dim=-1)
    tokens = torch.randn(classes, length, W, generator=g)
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, classes, (n,), generator=g)
    lengths = torch.randint(2, length + 1, (n,), generator=g)
    mask = torch.arange(length)[None] < lengths[:, None]
    return {
        "image_embed": F.normalize(zi[label] + 0.05 * torch.randn(n, D, generator=g), dim=-1),
        "text_embed": zt[label],
        "text_tokens": torch.where(mask[..., None], tokens[label], 0.0),
        "text_mask": mask,
        "label": label,
    }


def net_inputs(batch: dict, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = batch["text_embed"].shape[0]
    return dict(x_t=torch.randn(n, D, generator=g), t=torch.randint(0, 1000, (n,), generator=g),
                text_embed=batch["text_embed"], text_tokens=batch["text_tokens"], text_mask=batch["text_mask"])


def tiny_net(seed: int = 0) -> PriorTransformer:
    torch.manual_seed(seed)
    return PriorTransformer(TINY).eval()


# ------------------------------------------------------------------------------ network
def test_mask_is_causal_over_valid_keys_and_keeps_the_diagonal():
    valid = torch.tensor([[True, False, True, True]])
    mask = causal_key_mask(valid)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_bidirectional_mask_sees_every_valid_key_and_keeps_the_diagonal():
    valid = torch.tensor([[True, False, True, True]])
    mask = causal_key_mask(valid, causal=False)[0, 0]
    expected = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1], [1, 0, 1, 1], [1, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_sdpa_attention_matches_naive_softmax():
    torch.manual_seed(0)
    attn = SelfAttention(16, 2, 0.0).eval()
    x = torch.randn(2, 5, 16)
    valid = torch.tensor([[True] * 5, [True, True, False, True, False]])
    mask = causal_key_mask(valid)
    q, k, v = attn.qkv(x).view(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    naive = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 16))
    assert torch.allclose(attn(x, mask), naive, atol=1e-5)


def test_stack_is_causal():
    torch.manual_seed(0)
    stack = TransformerStack(16, 2, 2, 4.0, 0.0, False).eval()
    x = torch.randn(1, 6, 16)
    y = x.clone()
    y[:, 4:] = torch.randn(1, 2, 16)
    valid = torch.ones(1, 6, dtype=torch.bool)
    a, b = stack(x, valid), stack(y, valid)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6) and not torch.allclose(a[:, 4:], b[:, 4:])


def test_bidirectional_stack_lets_early_positions_see_later_ones_but_not_padding():
    torch.manual_seed(0)
    stack = TransformerStack(16, 2, 2, 4.0, 0.0, False, causal=False).eval()
    x = torch.randn(1, 6, 16)
    later, padding = x.clone(), x.clone()
    later[:, 3] = torch.randn(16)  # a valid later position
    padding[:, 5] = torch.randn(16) * 100  # a masked one
    valid = torch.tensor([[True] * 5 + [False]])
    out = stack(x, valid)
    assert not torch.allclose(stack(later, valid)[:, 0], out[:, 0], atol=1e-4)
    assert torch.allclose(stack(padding, valid)[:, :5], out[:, :5], atol=1e-6)
    with pytest.raises(ValueError, match="causal"):
        stack(x, torch.ones(1, 8, dtype=torch.bool), past=stack.prefix_keys_values(x[:, :2], valid[:, :2]))


def test_padding_never_matters_and_trimming_is_exact():
    net, batch = tiny_net(), synthetic(5)
    kw = net_inputs(batch)
    out = net(**kw)
    # Extra padding columns holding garbage: same output (padding is masked, roles not positional).
    pad = torch.randn(5, 3, W) * 100
    padded = dict(kw, text_tokens=torch.cat([kw["text_tokens"], pad], 1),
                  text_mask=torch.cat([kw["text_mask"], torch.zeros(5, 3, dtype=torch.bool)], 1))
    assert torch.allclose(net(**padded), out, atol=1e-5)
    # Garbage inside the masked positions of a row: same output as well.
    noisy = kw["text_tokens"] + torch.where(kw["text_mask"][..., None], 0.0, 50.0)
    assert torch.allclose(net(**dict(kw, text_tokens=noisy)), out, atol=1e-5)


def test_output_depends_on_every_input_unless_dropped():
    net, batch = tiny_net(), synthetic(4)
    kw = net_inputs(batch)
    out = net(**kw)
    for key in ("x_t", "text_embed", "text_tokens"):
        changed = dict(kw, **{key: kw[key] + 1.0})
        assert not torch.allclose(net(**changed), out, atol=1e-4), key
    assert not torch.allclose(net(**dict(kw, t=kw["t"] // 2)), out, atol=1e-4)
    drop = torch.ones(4, dtype=torch.bool)
    dropped = net(**kw, drop_text=drop)
    other = dict(kw, text_embed=torch.randn(4, D), text_tokens=torch.randn_like(kw["text_tokens"]))
    assert torch.allclose(net(**other, drop_text=drop), dropped, atol=1e-6)  # caption fully replaced by the null
    assert not torch.allclose(dropped, out, atol=1e-4)


def test_all_parameters_get_finite_gradients():
    net, batch = tiny_net(), synthetic(6)
    net.train()
    kw = net_inputs(batch)
    drop = torch.tensor([True, False, False, True, False, False])
    net(**kw, drop_text=drop).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name != "prefix.pos":  # positions beyond the longest caption get no gradient
            assert p.grad.abs().sum() > 0, name


def test_paper_config_has_table_3_width_and_depth():
    """Width 2048 x depth 24 (Table 3's architecture rows; 1.23B where its size row says 1B)."""
    cfg = yaml.safe_load((ROOT / "experiments/prior/paper.yaml").read_text())["model"]["init_args"]
    with torch.device("meta"):
        module = PriorModule(**cfg)
    n = count_parameters(module.net)
    print(f"paper prior: {n / 1e9:.3f}B parameters (width 2048, depth 24, D = W = 1024)")
    assert 1.15e9 < n < 1.3e9 and module.scale == 17.2
    assert module.net.config.embed_dim == 1024 and module.hparams.sampling["steps"] == 64


# ------------------------------------------------------------------------------ module
def module(**kw) -> PriorModule:
    torch.manual_seed(0)
    kw.setdefault("sampling", SamplingConfig(steps=16, clipping="NONE"))
    return PriorModule(prior=PriorConfig(width=32, depth=2, heads=2), clip_model="tiny-vit", **kw)


def test_prior_dims_come_from_clip_and_static_clipping_is_refused():
    m = module()
    assert (m.net.config.embed_dim, m.net.config.text_width) == (64, 64)
    assert m.diffusion.objective.value == "x0" and m.diffusion.num_timesteps == 1000
    with pytest.raises(ValueError, match="clipping"):
        module(sampling=SamplingConfig(clipping="STATIC"))


def test_embedding_scale_gives_unit_coordinate_variance_and_maps_back():
    m = module()
    z = F.normalize(torch.randn(4096, D, generator=torch.Generator().manual_seed(0)), dim=-1)
    x0 = m.to_x0(z)
    assert m.scale == pytest.approx(8.0)  # √64
    assert torch.allclose(x0.square().mean(-1), torch.ones(4096))  # ||x0||² = D exactly
    var = x0.var(0)  # per coordinate, over isotropic unit vectors: 1
    assert var.mean().item() == pytest.approx(1.0, abs=0.02) and (var - 1).abs().max() < 0.15
    assert torch.allclose(m.from_x0(x0), z, atol=1e-6)
    assert torch.allclose(m.from_x0(3.0 * torch.randn(7, D)).norm(dim=-1), torch.ones(7))


def test_select_best_keeps_the_largest_dot_product_with_zt():
    zt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cands = torch.tensor([[[0.6, 0.8], [0.8, 0.6]], [[0.6, 0.8], [0.8, 0.6]]])
    assert torch.equal(select_best(cands, zt), torch.tensor([[0.8, 0.6], [0.6, 0.8]]))


def test_generate_is_seeded_unit_norm_and_best_of_n(monkeypatch):
    import modules.stages.prior as prior_module

    m = module().eval()
    cond = synthetic(3)
    a = m.generate(cond, generator=torch.Generator().manual_seed(0))
    b = m.generate(cond, generator=torch.Generator().manual_seed(0))
    assert a.shape == (3, D) and torch.equal(a, b)
    assert torch.allclose(a.norm(dim=-1), torch.ones(3), atol=1e-5)
    seen = []
    monkeypatch.setattr(prior_module, "select_best", lambda c, zt: seen.append(c) or select_best(c, zt))
    best = m.generate(cond, num_candidates=5, generator=torch.Generator().manual_seed(0))
    (cands,) = seen
    assert cands.shape == (3, 5, D) and not torch.allclose(cands[:, 0], cands[:, 1])  # distinct draws
    dots = (cands * cond["text_embed"][:, None]).sum(-1)  # (B, 5)
    assert torch.equal(best, cands[torch.arange(3), dots.argmax(1)])
    guided = m.generate(cond, sampling=SamplingConfig(steps=16, clipping="NONE", guidance_scale=3.0),
                        generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(guided, a)


def test_prior_learns_caption_to_image_embedding_and_beats_baselines():
    m = module(optimizer={"lr": 3e-3})
    opt = m.configure_optimizers()["optimizer"]
    torch.manual_seed(0)
    for step in range(150):
        batch = synthetic(64, seed=step)
        opt.zero_grad()
        m.training_step(batch, step).backward()
        opt.step()
    m.eval()
    val = synthetic(32, seed=10_000)
    pred = m.generate(val, generator=torch.Generator().manual_seed(0))
    scores = compare_to_baselines(pred, val["image_embed"], val["text_embed"], m.mean_embed.value())
    assert scores["prior/cos_true"] > 0.85, scores  # ceiling ≈ 0.93: the 5% per-coordinate noise of z_i
    assert scores["prior/cos_true"] > scores["no_prior/cos_true"] + 0.5
    assert scores["prior/cos_true"] > scores["mean/cos_true"] + 0.3
    assert m.mean_embed.count.item() == 150 * 64


def embedding_shards(folder: Path, n: int = 48) -> str:
    """Embedding shards in the format `unclip embed` writes (read by EmbeddingDataModule)."""
    from datamodules.embeddings import sample_members
    from tests.conftest import write_tar

    batch = synthetic(n)
    members = []
    for i in range(n):
        length = int(batch["text_mask"][i].sum())
        members += sample_members(f"{i:06d}", f"caption {int(batch['label'][i])}", batch["image_embed"][i],
                                  batch["text_embed"][i], batch["text_tokens"][i, :length], np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    write_tar(folder / "train-000000.tar", members)
    return str(folder / "train-000000.tar")


def fit(m: pl.LightningModule, data: pl.LightningDataModule, root: Path, steps: int = 3) -> pl.Trainer:
    trainer = pl.Trainer(
        max_steps=steps, limit_val_batches=1, val_check_interval=steps, num_sanity_val_steps=1, logger=False,
        default_root_dir=root, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        callbacks=[pl.callbacks.EMAWeightAveraging(decay=0.9)], enable_checkpointing=False,
    )
    trainer.fit(m, datamodule=data)
    return trainer


def test_fit_from_embedding_shards_and_checkpoint_round_trip(tmp_path: Path):
    from datamodules.embeddings import EmbeddingDataModule
    from datamodules.image_text import LoaderConfig

    shards = embedding_shards(tmp_path / "emb")
    data = EmbeddingDataModule(train_shards=shards, val_shards=shards, val_samples=16, loader=LoaderConfig(batch_size=16, num_workers=0))
    m = module()
    trainer = fit(m, data, tmp_path)
    assert "val/prior/cos_true" in trainer.callback_metrics and "val/mean/retrieval" in trainer.callback_metrics
    path = tmp_path / "prior.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)  # plain hparams
    restored = PriorModule(**init_kwargs(ckpt["hyper_parameters"]))
    restored.load_state_dict(ckpt["state_dict"])
    cond = synthetic(2)
    gen = lambda mod: mod.eval().generate(cond, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(gen(restored), gen(m), atol=1e-6)
    assert restored.mean_embed.count.item() > 0  # the baseline's mean travels with the checkpoint


def test_fit_with_on_the_fly_clip_encoding(tiny_shards, tmp_path: Path):
    from datamodules.image_text import ImageTextDataModule, LoaderConfig

    pattern, _ = tiny_shards
    data = ImageTextDataModule(train_shards=pattern, val_shards=pattern, image_size=16, val_samples=8, tokenizer="tiny-vit", loader=LoaderConfig(batch_size=8, num_workers=0))
    trainer = fit(module(), data, tmp_path, steps=2)
    assert math.isfinite(float(trainer.callback_metrics["val/loss"]))


@pytest.mark.parametrize("name", ["tiny.yaml", "ar_tiny.yaml"])
def test_tiny_yaml_builds_through_lightning_cli(name: str, tmp_path: Path):
    from modules.cli.lightning import UnclipCLI

    cli = UnclipCLI(args=["--config", str(ROOT / "experiments/prior" / name),
                          f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", "--trainer.callbacks=null"],
                    run=False)
    assert cli.model.hparams.clip_model == "tiny-vit" and cli.model.net.config.embed_dim == 64


# ------------------------------------------------------------------------------ metrics
def test_embedding_scores_closed_form():
    zi = torch.eye(3)
    zt = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    s = embedding_scores(zi.clone(), zi, zt)  # a perfect prior
    assert s["cos_true"] == pytest.approx(1.0) and s["retrieval"] == 1.0 and s["cos_unrelated"] == pytest.approx(0.0)
    assert s["cos_text"] == pytest.approx((1 / math.sqrt(2) + 1 + 1) / 3)
    mean = RunningMean(3)
    mean.update(zi)
    s = compare_to_baselines(zi, zi, zt, mean.value())
    assert s["mean/cos_true"] == pytest.approx(1 / math.sqrt(3)) and s["mean/retrieval"] == pytest.approx(1 / 3)
    assert s["no_prior/cos_true"] == pytest.approx(s["prior/cos_text"])


def test_class_retrieval_excludes_self_and_table():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = ["a", "a", "b", "b"]
    own = torch.arange(4)
    assert class_retrieval_accuracy(bank, bank, labels, labels, exclude=own) == 1.0
    assert class_retrieval_accuracy(bank, bank, labels, ["b", "b", "a", "a"], exclude=own) == 0.0
    assert class_retrieval_accuracy(bank, bank, labels, labels, exclude=own, k=2) == 0.5  # 2nd nearest: other class
    assert class_retrieval_accuracy(bank, bank, labels, labels) == 1.0  # itself, when not excluded
    pair_cos = 0.9 / math.hypot(0.9, 0.1)
    assert nearest_image_cos(bank, bank, exclude=own).item() == pytest.approx(pair_cos)
    batches = [{"image_embed": bank[:2], "text_embed": bank[:2]}, {"image_embed": bank[2:], "text_embed": bank[2:]}]
    table = evaluation_table({"oracle": lambda b: b["image_embed"], "flip": lambda b: b["image_embed"].flip(-1)},
                             batches, labels)
    assert table["oracle"]["class_acc"] == 1.0 and table["oracle"]["cos_true"] == pytest.approx(1.0)
    assert table["oracle"]["cos_nearest"] == pytest.approx(pair_cos)
    assert table["flip"]["class_acc"] == 0.0


def test_weights_swapped_through_data_are_seen_by_validation_and_generate():
    """Lightning's EMA swap writes `.data` in place (no version bump): no stale caption cache."""
    m = module().eval()
    cond = synthetic(3)
    gen = lambda: m.generate(cond, generator=torch.Generator().manual_seed(0))
    before = gen()
    with torch.no_grad():
        for p in m.net.parameters():
            p.data.copy_(p.data * 1.5)
    fresh = module().eval()
    fresh.load_state_dict(m.state_dict())
    assert torch.allclose(gen(), fresh.generate(cond, generator=torch.Generator().manual_seed(0)), atol=1e-6)
    assert not torch.allclose(gen(), before)
