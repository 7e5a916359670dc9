"""Autoregressive prior: PCA against closed forms, quantile buckets, causal code model, categorical
sampling statistics, learning a caption -> embedding map, and Lightning fit with the PCA fitted at
fit start (EMA callback, sanity check) and carried by the checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from datamodules.image_text import LoaderConfig
import torch
import torch.nn.functional as F

from modules.stages.registry import init_kwargs
from modules.stages.ar_prior import ARPriorModule
from modules.networks.ar_prior import ARPriorConfig, ARPriorTransformer, PCAQuantizer, sample_categorical
from modules.stages.prior_metrics import compare_to_baselines
from tests.test_prior import D, W, embedding_shards, fit, synthetic


def low_rank(n: int, rank: int, seed: int = 0) -> torch.Tensor:
    """Unit vectors near a `rank`-dim affine subspace, with decreasing variance per axis."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, rank, generator=g))[0].T  # (rank, D) orthonormal
    scales = torch.linspace(1.0, 0.2, rank)
    x = (torch.randn(n, rank, generator=g) * scales) @ basis + 3.0 * F.normalize(torch.randn(D, generator=g), dim=0)
    return x


def fitted(z: torch.Tensor, p: int, k: int = 64, s: int = 8) -> PCAQuantizer:
    q = PCAQuantizer(D, p, k, s)
    zt = F.normalize(z + torch.randn(z.shape, generator=torch.Generator().manual_seed(9)), dim=-1)
    q.fit(z, zt)
    return q


# ------------------------------------------------------------------------------ PCA + buckets
def test_pca_matches_the_covariance_eigendecomposition():
    z = low_rank(2000, 6)
    q = fitted(z, 4)
    cov = torch.cov(z.double().T)
    evals = torch.linalg.eigvalsh(cov).flip(0)
    assert torch.allclose(q.eigenvalues.double(), evals[:4], rtol=1e-4)
    assert float(q.variance_kept) == pytest.approx(float(evals[:4].sum() / evals.sum()), rel=1e-5)
    assert torch.allclose(q.components @ q.components.T, torch.eye(4), atol=1e-5)  # orthonormal rows
    assert torch.allclose(q.components.double() @ cov @ q.components.double().T, torch.diag(evals[:4]), atol=1e-5)
    assert (q.eigenvalues[:-1] >= q.eigenvalues[1:]).all()  # ordered by eigenvalue
    assert fitted(z, 6).variance_kept.item() == pytest.approx(1.0, abs=1e-5)  # the whole subspace


def test_quantile_buckets_are_equally_used_and_decode_inside_their_bucket():
    z = low_rank(4096, 6)
    q = fitted(z, 6, k=16)
    codes = q.encode(z)
    assert codes.dtype == torch.long and codes.min() >= 0 and codes.max() < 16
    counts = torch.stack([torch.bincount(codes[:, j], minlength=16) for j in range(6)])  # (P, K)
    assert (counts - 256).abs().max() <= 2  # 4096 / 16 per bucket
    centers = q.centers.gather(1, codes.T).T
    lo = torch.cat([torch.full((6, 1), -math.inf), q.edges], 1).gather(1, codes.T).T
    hi = torch.cat([q.edges, torch.full((6, 1), math.inf)], 1).gather(1, codes.T).T
    assert ((centers >= lo) & (centers <= hi)).all()
    fine = fitted(z, 6, k=1024)
    zn = F.normalize(z, dim=-1)
    cos = (fine.decode(fine.encode(z)) * zn).sum(-1)
    assert cos.mean() > 0.9999 and cos.min() > 0.995  # fine buckets: near lossless (wider tail buckets)
    assert torch.allclose(fine.decode(fine.encode(z)).norm(dim=-1), torch.ones(4096))


def test_similarity_token_is_a_monotone_quantile_bucket():
    z = low_rank(1000, 6)
    q = fitted(z, 4, s=8)
    zt = F.normalize(z + torch.randn(z.shape, generator=torch.Generator().manual_seed(9)), dim=-1)
    sim = q.encode_similarity(z, zt)
    assert (torch.bincount(sim, minlength=8) - 125).abs().max() <= 2
    order = (z * zt).sum(-1).argsort()
    assert (sim[order].diff() >= 0).all()


# ------------------------------------------------------------------------------ code model
TINY = ARPriorConfig(embed_dim=D, text_width=W, num_components=6, num_buckets=16, similarity_buckets=4,
                     width=32, depth=2, heads=2)


def test_code_model_is_causal_and_ignores_padding():
    torch.manual_seed(0)
    net = ARPriorTransformer(TINY).eval()
    batch = synthetic(3)
    cond = {k: batch[k] for k in ("text_embed", "text_tokens", "text_mask")}
    codes = torch.randint(0, 16, (3, 5))
    sim = torch.tensor([0, 1, 3])
    logits = net(codes, sim, **cond)
    assert logits.shape == (3, 6, 16)
    changed = codes.clone()
    changed[:, 3:] = (changed[:, 3:] + 7) % 16
    other = net(changed, sim, **cond)
    assert torch.allclose(other[:, :4], logits[:, :4], atol=1e-6)  # rows 0..3 only see codes 0..2
    assert not torch.allclose(other[:, 4:], logits[:, 4:])
    assert not torch.allclose(net(codes, (sim + 1) % 4, **cond)[:, 0], logits[:, 0])
    padded = dict(cond, text_tokens=torch.cat([cond["text_tokens"], torch.randn(3, 2, W)], 1),
                  text_mask=torch.cat([cond["text_mask"], torch.zeros(3, 2, dtype=torch.bool)], 1))
    assert torch.allclose(net(codes, sim, **padded), logits, atol=1e-5)
    sampled = net.sample(sim, **cond, generator=torch.Generator().manual_seed(0))
    again = net.sample(sim, **cond, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (3, 6) and torch.equal(sampled, again) and sampled.max() < 16


def test_categorical_sampling_follows_softmax_and_temperature():
    logits = torch.log(torch.tensor([0.1, 0.2, 0.7])).repeat(6000, 1)
    draws = sample_categorical(logits, 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3).float() / 6000
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.7]), atol=0.02)
    cold = torch.bincount(sample_categorical(logits, 0.5, torch.Generator().manual_seed(0)), minlength=3).float() / 6000
    expected = torch.tensor([0.01, 0.04, 0.49]) / 0.54  # p^(1/T), renormalised
    assert torch.allclose(cold, expected, atol=0.02)
    assert (sample_categorical(logits[:5], 0.0, None) == 2).all()


# ------------------------------------------------------------------------------ module
def ar_module(**kw) -> ARPriorModule:
    torch.manual_seed(0)
    prior = dict(num_components=16, num_buckets=32, similarity_buckets=4, width=32, depth=2, heads=2)
    return ARPriorModule(prior=prior, clip_model="tiny-vit", fit_samples=kw.pop("fit_samples", 512), **kw)


def test_ar_prior_learns_and_beats_baselines():
    m = ar_module(optimizer={"lr": 3e-3})
    kept = m.fit_quantizer([synthetic(256, seed=s) for s in range(2)])
    assert 0.0 < kept <= 1.0
    opt = m.configure_optimizers()["optimizer"]
    for step in range(200):
        opt.zero_grad()
        m.training_step(synthetic(64, seed=100 + step), step).backward()
        opt.step()
    val = synthetic(32, seed=10_000)
    _, per_code = m.code_loss(m.conditioner(val))  # (P,) nats
    # PCs 0-2 separate the 4 classes: each class covers ~1/4 of the quantile buckets, so the floor
    # is log(8) ≈ 2.1 < log(32) ≈ 3.5; PCs 3+ are the isotropic noise: unpredictable, ≈ log(32).
    assert (per_code[:3] < math.log(32) - 0.8).all() and per_code[3:].mean() > math.log(32) - 0.3, per_code
    m.eval()
    pred = m.generate(val, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(pred.norm(dim=-1), torch.ones(32), atol=1e-5)
    scores = compare_to_baselines(pred, val["image_embed"], val["text_embed"], m.mean_embed.value())
    assert scores["prior/cos_true"] > 0.7, scores
    assert scores["prior/cos_true"] > scores["no_prior/cos_true"] + 0.4
    assert scores["prior/cos_true"] > scores["mean/cos_true"] + 0.2


def test_similarity_tokens_come_from_the_top_half():
    m = ar_module()
    tokens = m.sample_similarity(1000, torch.Generator().manual_seed(0))
    assert tokens.min() == 2 and tokens.max() == 3
    assert m.sample_similarity(1000, None, quantile=0.0).min() == 0


def test_fit_fits_pca_at_start_and_checkpoint_carries_it(tmp_path: Path):
    from datamodules.embeddings import EmbeddingDataModule

    shards = embedding_shards(tmp_path / "emb", n=64)
    data = EmbeddingDataModule(train_shards=shards, val_shards=shards, val_samples=16, loader=LoaderConfig(batch_size=16, num_workers=0))
    m = ar_module(fit_samples=64)
    assert not m.quantizer.is_fitted
    trainer = fit(m, data, tmp_path)
    assert m.quantizer.is_fitted and "val/prior/cos_true" in trainer.callback_metrics
    assert 0.9 < float(trainer.callback_metrics["val/variance_kept"]) <= 1.0
    path = tmp_path / "ar.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    restored = ARPriorModule(**init_kwargs(ckpt["hyper_parameters"]))
    restored.load_state_dict(ckpt["state_dict"])
    assert restored.quantizer.is_fitted
    assert torch.allclose(restored.quantizer.components, m.quantizer.components, atol=1e-6)
    cond = synthetic(2)
    gen = lambda mod: mod.eval().generate(cond, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(gen(restored), gen(m), atol=1e-6)


def test_guidance_scale_one_is_the_conditional_model_and_others_mix_in_the_null():
    """CFG on the codes' logits: s = 1 equals the conditional logits exactly; s = 0 equals the
    unconditional (caption and z_t dropped to the learned null); s = 3 is l_0 + 3 (l_c - l_0)."""
    torch.manual_seed(0)
    module = ar_module()
    net = module.net.eval()
    with torch.no_grad():
        net.prefix.null_text_embed.add_(torch.randn_like(net.prefix.null_text_embed))  # a null unlike z_t
    b = 3
    cfg = net.config
    text = {"text_embed": torch.nn.functional.normalize(torch.randn(b, cfg.embed_dim), dim=-1),
            "text_tokens": torch.randn(b, 5, cfg.text_width), "text_mask": torch.ones(b, 5, dtype=torch.bool)}
    codes = torch.randint(0, cfg.num_buckets, (b, 2))
    sim = torch.randint(0, cfg.similarity_buckets, (b,))
    with torch.no_grad():
        cond = net(codes, sim, **text)[:, -1]
        uncond = net(codes, sim, drop_text=torch.ones(b, dtype=torch.bool), **text)[:, -1]
        assert torch.equal(net.guided_logits(codes, sim, 1.0, **text), cond)
        torch.testing.assert_close(net.guided_logits(codes, sim, 0.0, **text), uncond)
        torch.testing.assert_close(net.guided_logits(codes, sim, 3.0, **text), uncond + 3 * (cond - uncond))
    assert not torch.allclose(cond, uncond)


def test_training_drops_the_conditioning_at_its_rate():
    module = ar_module(drop_text_prob=1.0)
    seen = []
    original = module.net.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["drop_text"].clone())
        return original(*args, **kwargs)

    module.net.forward = spy
    cond = {"image_embed": torch.nn.functional.normalize(torch.randn(4, 64), dim=-1),
            "text_embed": torch.nn.functional.normalize(torch.randn(4, 64), dim=-1),
            "text_tokens": torch.randn(4, 5, 64), "text_mask": torch.ones(4, 5, dtype=torch.bool)}
    module.quantizer.fit(torch.nn.functional.normalize(torch.randn(256, 64), dim=-1), torch.nn.functional.normalize(torch.randn(256, 64), dim=-1))
    module.code_loss(cond, 1.0)
    module.code_loss(cond, 0.0)
    assert seen[0].all() and not seen[1].any()
