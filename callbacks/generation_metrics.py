"""Sample-quality metrics: FID, KID, Inception Score and CLIP score.

`FidelityMetrics` holds torchmetrics objects whose states are sums (FID: feature sum, x^T x sum,
count) or concatenated lists (KID, IS features): torchmetrics all-reduces / all-gathers them across
ranks *before* the statistic is computed, so every rank's samples enter one FID -- never an average
of per-rank FIDs. Features are extracted once per image (`feature_extractors`) and handed to the
metrics through an identity "feature network".

- FID (Heusel et al. 2017): ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)).
- KID (Binkowski et al. 2018): unbiased MMD^2 with the kernel (x.y / d + 1)^3, over random subsets.
- IS (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)), on the generated images only.
- CLIP score: 100 * mean cos(z_image, z_text) of generated image and prompt (DESIGN.md; no clamp).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning.pytorch as pl
import open_clip
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.aggregation import SumMetric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from callbacks.feature_extractors import FeatureConfig, LoadedExtractor, build_extractor
from modules.networks.clip import FrozenCLIP

METRIC_KEYS = (
    "fid", "kid_mean", "kid_std", "inception_score_mean", "inception_score_std", "clip_score", "clip_score_real",
    "num_generated", "num_real",
)  # fmt: skip


class FeatureInput(nn.Identity):
    """The "feature network" torchmetrics sees: features are extracted beforehand."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features


class ClipScore(Metric):
    """100 * mean cosine similarity of CLIP image and caption embeddings (sum states: DDP-exact)."""

    full_state_update = False

    def __init__(self, clip: FrozenCLIP, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clip = clip
        self.tokenizer = open_clip.get_tokenizer(clip.model_name)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: Tensor, captions: list[str]) -> None:
        """images (B, 3, H, W) in [0, 1]; one caption per image."""
        image = self.clip.encode_image(images.float() * 2 - 1)  # (B, D) unit norm
        text = self.clip.encode_text(self.tokenizer(list(captions)).to(image.device)).embed  # (B, D)
        self.total += (image * text).sum(dim=-1).double().sum()
        self.count += image.shape[0]

    def compute(self) -> Tensor:
        return 100 * self.total / self.count


class FidelityMetrics(nn.Module):
    """FID / KID / IS / CLIP score over generated and real images, DDP-exact.

    Args:
        extractor: image features (`build_extractor`); None when only `update_features` is used.
        feature_dim: feature width when no extractor is given.
        clip: CLIP for the CLIP score (None: no CLIP score).
        kid_subsets / kid_subset_size: KID subsets (the size is capped at the sample count).
        isc_splits: Inception Score splits (capped at the sample count).
    """

    def __init__(
        self,
        extractor: LoadedExtractor | None = None,
        *,
        feature_dim: int | None = None,
        clip: FrozenCLIP | None = None,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        isc_splits: int = 10,
    ) -> None:
        super().__init__()
        dim = extractor.feature_dim if extractor is not None else feature_dim
        if dim is None:
            raise ValueError("give an extractor or feature_dim")
        self.extractor, self.kid_subset_size, self.isc_splits = extractor, kid_subset_size, isc_splits
        if extractor is not None:
            self.extractor_module = extractor.module  # registered: moves with .to(device)
        self.fid = FrechetInceptionDistance(feature=FeatureInput(dim))
        with warnings.catch_warnings():  # "will save all extracted features in buffer": intended (cat states)
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            self.kid = KernelInceptionDistance(feature=FeatureInput(dim), subsets=kid_subsets, subset_size=kid_subset_size)
            self.isc = InceptionScore(feature=FeatureInput(0), splits=isc_splits)
        self.num_real, self.num_fake = SumMetric(), SumMetric()
        self.has_logits = False
        self.clip_fake = ClipScore(clip) if clip is not None else None
        self.clip_real = ClipScore(clip) if clip is not None else None

    @property
    def description(self) -> str:
        return self.extractor.description if self.extractor is not None else "precomputed features"

    def reset(self) -> None:
        for metric in self.modules():
            if isinstance(metric, Metric):
                metric.reset()
        self.has_logits = False

    @torch.no_grad()
    def update_features(self, *, real: Tensor | None = None, fake: Tensor | None = None, fake_logits: Tensor | None = None) -> None:
        """Precomputed features (N, D) of real / generated images and IS logits (N, K)."""
        if real is not None:
            self.fid.update(real.double(), real=True)
            self.kid.update(real.double(), real=True)
            self.num_real.update(real.shape[0])
        if fake is not None:
            self.fid.update(fake.double(), real=False)
            self.kid.update(fake.double(), real=False)
            self.num_fake.update(fake.shape[0])
        if fake_logits is not None:
            self.isc.update(fake_logits.double())
            self.has_logits = True

    @torch.no_grad()
    def update(self, *, fake: Tensor, real: Tensor | None = None, captions: list[str] | None = None) -> None:
        """Images (B, 3, H, W) in [0, 1]; `captions` are the prompts of `fake` (and of `real`)."""
        if self.extractor is None:
            raise RuntimeError("FidelityMetrics without an extractor: use update_features")
        fake_features, fake_logits = self.extractor(fake)
        real_features = self.extractor(real)[0] if real is not None else None
        self.update_features(real=real_features, fake=fake_features, fake_logits=fake_logits)
        if captions is not None and self.clip_fake is not None:
            self.clip_fake.update(fake, captions)
            if real is not None:
                self.clip_real.update(real, captions)

    @torch.no_grad()
    def compute(self, seed: int = 0) -> dict[str, float | None]:
        """All metrics (None where undefined); KID/IS subset draws seeded. Collective under DDP:
        every rank must call it."""
        n_real, n_fake = int(self.num_real.compute()), int(self.num_fake.compute())
        self._one_tensor_per_rank()
        out: dict[str, float | None] = dict.fromkeys(METRIC_KEYS)
        out["num_generated"], out["num_real"] = n_fake, n_real
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if min(n_real, n_fake) >= 2:
                out["fid"] = float(self.fid.compute())
                self.kid.subset_size = min(self.kid_subset_size, n_real, n_fake)
                kid_mean, kid_std = self.kid.compute()
                out["kid_mean"], out["kid_std"] = float(kid_mean), float(kid_std)
            if _any_rank(self.has_logits, self.fid.fake_features_sum.device) and n_fake >= 1:
                self.isc.splits = max(1, min(self.isc_splits, n_fake))
                with warnings.catch_warnings():  # one split: std undefined (nan -> None below)
                    warnings.filterwarnings("ignore", message=".*degrees of freedom.*")
                    is_mean, is_std = self.isc.compute()
                out["inception_score_mean"], out["inception_score_std"] = float(is_mean), float(is_std)
        for key, metric in (("clip_score", self.clip_fake), ("clip_score_real", self.clip_real)):
            if metric is not None and _any_rank(bool(metric.count), metric.count.device):
                out[key] = float(metric.compute())
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}

    def _one_tensor_per_rank(self) -> None:
        """KID / IS keep lists of per-batch tensors synced element by element (`dist_reduce_fx=None`):
        ranks with different batch counts would issue different numbers of all-gathers and hang.
        Concatenate each list into exactly one (possibly empty) tensor per rank first."""
        device = self.fid.fake_features_sum.device
        for metric, attr in ((self.kid, "real_features"), (self.kid, "fake_features"), (self.isc, "features")):
            local: list[Tensor] = getattr(metric, attr)
            width = _max_over_ranks(local[0].shape[-1] if local else 0, device)
            cat = torch.cat(local) if local else torch.zeros(0, width, dtype=torch.float64, device=device)
            setattr(metric, attr, [cat])


def _max_over_ranks(value: int, device: torch.device) -> int:
    """The largest `value` of all ranks (a collective under DDP); the value itself outside DDP."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor(value, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())
    return value


def _any_rank(flag: bool, device: torch.device) -> bool:
    return _max_over_ranks(int(flag), device) > 0


def build_metrics(cfg: FeatureConfig, *, key: str, class_prompts: list[str] | None = None, **kwargs: Any) -> FidelityMetrics:
    """`FidelityMetrics` with features per `cfg` and a CLIP (shared with the features) for the CLIP score."""
    clip = FrozenCLIP(cfg.clip_model, cfg.clip_weights)
    extractor = build_extractor(cfg, key=key, clip=clip, class_prompts=class_prompts)
    return FidelityMetrics(extractor, clip=clip, **kwargs)


class GenerationMetrics(Callback):
    """FID / KID / IS / CLIP score of the module's samples against real validation images.

    On every `every_n_validations`-th validation and the last one of a fit (sanity checks
    excluded) each rank generates for its first ceil(num_samples / world_size) validation samples
    with the module's `log_images(batch, n, generator)` (its conditions and sampling settings, a
    seeded generator), extracts features, and at the end torchmetrics pools all ranks' states
    before computing.
    Logs `{prefix}fid`, `kid`, `kid_std`, `inception_score`, `inception_score_std`, `clip_score`,
    `clip_score_real`, `num_generated`.
    """

    CONFIG_KEY = "trainer.callbacks[GenerationMetrics].init_args.features.inception_weights"

    def __init__(
        self,
        num_samples: int = 256,
        every_n_validations: int = 1,
        features: FeatureConfig | None = None,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        isc_splits: int = 10,
        seed: int = 0,
        prefix: str = "val/",
        progress: bool = True,
    ) -> None:
        self.num_samples, self.every, self.seed, self.prefix = num_samples, every_n_validations, seed, prefix
        self.features = features or FeatureConfig()
        self.metric_kwargs = dict(kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, isc_splits=isc_splits)
        self.progress = progress
        self.metrics: FidelityMetrics | None = None
        self.validations, self.active, self.done, self.budget = 0, False, 0, 0
        self._bar: Any = None

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.active = False
        if trainer.sanity_checking:
            return
        self.validations += 1
        last = trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step  # e.g. stopped by max_time
        if self.validations % self.every and not last:
            return
        if self.metrics is None:
            self.metrics = build_metrics(self.features, key=self.CONFIG_KEY, **self.metric_kwargs)
            for logger in trainer.loggers:  # the run records which features its FID used
                logger.log_hyperparams({"generation_metrics/features": self.metrics.description})
        self.metrics.to(pl_module.device).reset()
        self.active, self.done = True, 0
        self.budget = math.ceil(self.num_samples / trainer.world_size)
        if self.progress and trainer.is_global_zero:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.budget * trainer.world_size, desc="GenerationMetrics: sampling", leave=False)

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self.active or self.done >= self.budget or dataloader_idx != 0:
            return
        take = min(_batch_len(batch), self.budget - self.done)
        gen = torch.Generator(device="cpu").manual_seed(self.seed + 100_003 * trainer.global_rank + batch_idx)
        out = pl_module.log_images(batch, n=take, generator=gen)
        captions = out.get("captions") or None
        self.metrics.update(fake=out["samples"], real=out.get("real"), captions=captions)
        self.done += take
        if self._bar is not None:
            self._bar.update(take * trainer.world_size)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.active:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        values = self.metrics.compute(seed=self.seed)
        names = {"kid_mean": "kid", "inception_score_mean": "inception_score"}
        logged = {f"{self.prefix}{names.get(k, k)}": float(v) for k, v in values.items() if v is not None and k != "num_real"}
        pl_module.log_dict(logged, sync_dist=False)  # already global: torchmetrics synced the states
        self.active = False


def _batch_len(batch: Any) -> int:
    if isinstance(batch, dict):
        batch = next(v for v in batch.values() if isinstance(v, (Tensor, list)))
    return len(batch)
