"""FID / KID / IS / CLIP score against direct NumPy/SciPy computations, DDP pooling, extractors."""

from __future__ import annotations

import json
import logging

import numpy as np
import open_clip
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from callbacks.feature_extractors import (
    CLIP_EXTRACTOR_NAME,
    ClipFeatureExtractor,
    FeatureConfig,
    FeatureSource,
    build_extractor,
    register_clip_extractor,
)
from callbacks.generation_metrics import ClipScore, FidelityMetrics
from modules.networks.clip import FrozenCLIP

D = 16


def fid_direct(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b)) with SciPy."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


def kid_direct(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 over all samples (equal sizes)."""
    d, m = a.shape[1], a.shape[0]
    k = lambda x, y: (x @ y.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
    return float((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.sum() / m**2)


def is_direct(logits: np.ndarray) -> float:
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    py = p.mean(0, keepdims=True)
    return float(np.exp((p * (np.log(p) - np.log(py))).sum(1).mean()))


def features(n: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(D, D)) / np.sqrt(D)
    return rng.normal(size=(n, D)) @ mix + rng.normal(size=D)


def metrics_on(real: np.ndarray, fake: np.ndarray, logits: np.ndarray | None = None) -> dict:
    m = FidelityMetrics(feature_dim=real.shape[1], kid_subsets=1, kid_subset_size=len(real), isc_splits=1)
    m.update_features(real=torch.from_numpy(real), fake=torch.from_numpy(fake), fake_logits=None if logits is None else torch.from_numpy(logits))
    return m.compute(seed=0)


def test_fid_self_zero_shift_positive_and_matches_scipy():
    x = features()
    assert abs(metrics_on(x, x)["fid"]) < 1e-6
    shifted = x + 0.5
    got = metrics_on(x, shifted)["fid"]
    assert got == pytest.approx(0.25 * D, abs=1e-3)  # a pure shift moves only the mean term
    y = features(seed=1) * 1.3
    got, want = metrics_on(x, y)["fid"], fid_direct(x, y)
    assert got > 0.1 and got == pytest.approx(want, abs=1e-3)


def test_kid_and_inception_score_match_direct():
    x, y = features(120), features(120, seed=2) * 0.8
    logits = np.random.default_rng(3).normal(size=(120, 7)) * 2
    out = metrics_on(x, y, logits)
    assert out["kid_mean"] == pytest.approx(kid_direct(x, y), rel=1e-6, abs=1e-9)
    assert out["kid_std"] == 0.0  # one subset of all samples
    assert out["inception_score_mean"] == pytest.approx(is_direct(logits), rel=1e-6)
    assert abs(metrics_on(x, x)["kid_mean"]) < 0.05 * abs(out["kid_mean"])  # unbiased: ~0 for equal sets
    uniform = metrics_on(x, y, np.zeros((120, 7)))
    assert uniform["inception_score_mean"] == pytest.approx(1.0)  # p(y|x) = p(y): KL = 0


def test_seeded_subsets_are_deterministic():
    x, y = features(60), features(60, seed=5)
    logits = np.random.default_rng(1).normal(size=(60, 5))

    def run() -> dict:
        m = FidelityMetrics(feature_dim=D, kid_subsets=5, kid_subset_size=20, isc_splits=3)
        m.update_features(real=torch.from_numpy(x), fake=torch.from_numpy(y), fake_logits=torch.from_numpy(logits))
        return m.compute(seed=7)

    a, b = run(), run()
    assert a == b and a["kid_std"] > 0


@pytest.fixture(scope="module")
def clip() -> FrozenCLIP:
    torch.manual_seed(0)
    return FrozenCLIP("tiny-vit")


def test_clip_score_matches_open_clip_directly(clip):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 32, 32, generator=g)
    captions = ["a red circle", "a blue square", "a green triangle", "two shapes", "a photo", "yellow"]
    metric = ClipScore(clip)
    metric.update(images[:4], captions[:4])
    metric.update(images[4:], captions[4:])
    model = clip.model  # direct path: open_clip's own encode_image / encode_text
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        img = F.normalize(model.encode_image((images - mean) / std), dim=-1).numpy()
        txt = F.normalize(model.encode_text(open_clip.get_tokenizer("tiny-vit")(captions)), dim=-1).numpy()
    want = 100 * float((img * txt).sum(1).mean())
    assert float(metric.compute()) == pytest.approx(want, abs=1e-4)


def _ddp_worker(rank: int, world: int, init_file: str, data: dict, out_path: str) -> None:
    import datetime

    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=60)  # a collective mismatch fails instead of hanging
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timeout)
    # Uneven shards and batch counts: rank 0 gets 70 real in 3 batches and 40 fake in 2, rank 1 the rest in 1.
    cuts = {"real": [0, 30, 50, 70], "fake": [0, 25, 40]}
    m = FidelityMetrics(feature_dim=D, kid_subsets=1, kid_subset_size=120, isc_splits=1)
    for key, logits in (("real", None), ("fake", "logits")):
        c = cuts[key]
        chunks = [slice(a, b) for a, b in zip(c, c[1:])] if rank == 0 else [slice(c[-1], None)]
        for sl in chunks:
            feats = torch.from_numpy(data[key][sl])
            m.update_features(**{key: feats}, fake_logits=torch.from_numpy(data[logits][sl]) if logits else None)
    out = m.compute(seed=0)
    mine = slice(0, 40) if rank == 0 else slice(70, 110)
    local = metrics_on(data["real"][mine], data["fake"][mine])["fid"]
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, local)
    if rank == 0:
        json.dump({"pooled": out, "per_rank_fid": gathered}, open(out_path, "w"))
    torch.distributed.destroy_process_group()


def test_ddp_pools_features_before_the_statistic(tmp_path):
    data = {"real": features(120), "fake": features(120, seed=4) * 1.2, "logits": np.random.default_rng(0).normal(size=(120, 6))}
    out_path = tmp_path / "out.json"
    # fork: the workers inherit the imported modules (spawn re-imports them: ~10x slower here)
    args = (2, str(tmp_path / "init"), data, str(out_path))
    torch.multiprocessing.start_processes(_ddp_worker, args=args, nprocs=2, join=True, start_method="fork")
    result = json.loads(out_path.read_text())
    single = metrics_on(data["real"], data["fake"], data["logits"])
    pooled = result["pooled"]
    assert pooled["num_real"] == 120 and pooled["num_generated"] == 120
    for key in ("fid", "kid_mean", "inception_score_mean"):
        assert pooled[key] == pytest.approx(single[key], rel=1e-6), key
    assert pooled["fid"] == pytest.approx(fid_direct(data["real"], data["fake"]), abs=1e-3)
    assert abs(np.mean(result["per_rank_fid"]) - pooled["fid"]) > 1e-2  # averaging per-rank FIDs is different


class Images(torch.utils.data.Dataset):
    """uint8 (3, H, W) items, torch-fidelity's input convention."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def test_clip_extractor_in_torch_fidelity_matches_ours(clip, tmp_path):
    import torch_fidelity

    weights = tmp_path / "clip.pt"
    torch.save(clip.model.state_dict(), weights)
    g = torch.Generator().manual_seed(1)
    real = torch.rand(72, 3, 32, 32, generator=g)
    fake = (real * 0.6 + 0.3 * torch.rand(72, 3, 32, 32, generator=g)).clamp(0, 1)
    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
    as_u8 = lambda x: Images((x * 255).round().to(torch.uint8))  # noqa: E731
    name = register_clip_extractor()
    assert register_clip_extractor() == name == CLIP_EXTRACTOR_NAME
    theirs = torch_fidelity.calculate_metrics(
        input1=as_u8(fake), input2=as_u8(real), fid=True, kid=True, isc=True, feature_extractor=name,
        feature_extractor_weights_path=str(weights), unclip_clip_model="tiny-vit", unclip_class_prompts=prompts,
        kid_subsets=1, kid_subset_size=72, isc_splits=1, cuda=False, save_cpu_ram=True, cache=False, verbose=False,
    )  # fmt: skip
    extractor = build_extractor(FeatureConfig(clip_weights=str(weights)), clip=FrozenCLIP("tiny-vit", str(weights)), class_prompts=prompts)
    ours = FidelityMetrics(extractor, kid_subsets=1, kid_subset_size=72, isc_splits=1)
    ours.update(fake=fake, real=real)
    got = ours.compute()
    assert got["fid"] == pytest.approx(theirs["frechet_inception_distance"], abs=1e-3)
    assert got["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], abs=1e-5)
    assert got["inception_score_mean"] == pytest.approx(theirs["inception_score_mean"], rel=1e-4)


def test_clip_fallback_says_so(caplog, clip):
    with caplog.at_level(logging.INFO):
        ex = build_extractor(FeatureConfig(), key="my.key", clip=clip, class_prompts=["a", "b"])
    assert ex.source is FeatureSource.CLIP and "FID_CLIP" in ex.description and "random init" in ex.description
    assert any("`my.key` is not set" in r.getMessage() for r in caplog.records)
    feats, logits = ex(torch.rand(3, 3, 16, 16))
    assert feats.shape == (3, clip.embed_dim) and logits.shape == (3, 2)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(3, dtype=torch.float64), atol=1e-5)
    with pytest.raises(ValueError, match="class prompts"):
        ClipFeatureExtractor(CLIP_EXTRACTOR_NAME, ["clip", "logits_unbiased"], clip=clip)


def test_inception_weights_from_local_file_only(tmp_path, monkeypatch):
    from torch_fidelity import feature_extractor_inceptionv3 as inc

    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=r"metrics.features.inception_weights = .*nope.pth.*weights-inception-2015-12-05"):
        build_extractor(FeatureConfig(inception_weights=str(missing)), key="metrics.features.inception_weights")
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": Images(torch.zeros(1))}, evil)  # a class instance: needs arbitrary unpickling
    with pytest.raises(ValueError, match="weights_only=True"):
        build_extractor(FeatureConfig(inception_weights=str(evil)))
    # A randomly initialised network with the real architecture stands in for the TF weights.
    with monkeypatch.context() as mp:
        mp.setattr(inc, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(inc.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        state = inc.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    ex = build_extractor(FeatureConfig(inception_weights=str(path)))
    assert ex.source is FeatureSource.INCEPTION and str(path) in ex.description
    feats, logits = ex(torch.rand(2, 3, 16, 16))
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008)
