"""Stage 2, the paper's alternative: the autoregressive prior P(z_i | y) (Ramesh et al. 2022 §2.2).

z_i -> PCA codes (see `modules.networks.ar_prior`); a causal Transformer is trained with
cross-entropy on the codes given the caption tokens, z_t and the quantised z_i · z_t. The PCA and
the buckets are fitted once, at the start of `fit`, on `fit_samples` training embeddings (rank 0's
fit is broadcast to every rank) and saved in the checkpoint as buffers. Sampling asks for a high
similarity: the z_i · z_t token is drawn uniformly from the buckets above `similarity_quantile`
(paper: the top half).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from modules.core import draws, optim
from modules.stages.conditioning import ClipConditioner, repeat_rows
from modules.core.hparams import as_config, check_range, init_args, to_plain
from modules.stages.registry import class_path_of
from modules.networks.ar_prior import ARPriorConfig, ARPriorTransformer, PCAQuantizer
from modules.stages.prior_metrics import RunningMean, compare_to_baselines
from modules.stages.prior import TEXT_KEYS, select_best

log = logging.getLogger(__name__)


class ARPriorModule(pl.LightningModule):
    """Trains the AR prior; `generate` samples unit-norm image embeddings from captions.

    Args:
        prior: Transformer and quantisation sizes; `embed_dim` / `text_width` set from the CLIP model.
        clip_model / clip_weights: the frozen CLIP used when batches carry images/tokens.
        fit_samples: training embeddings used to fit PCA and buckets.
        temperature: sampling temperature of the code distribution.
        similarity_quantile: sample the z_i · z_t token from the buckets above this quantile.
        num_candidates: best-of-n by dot product with z_t (1: the similarity token does that job).
        drop_text_prob: the caption and z_t are replaced by a learned null this often in training,
            for classifier-free guidance (paper: 10%, as for the diffusion prior).
        guidance_scale: default scale of `generate`'s guided logits (1: the conditional model).
    """

    def __init__(
        self,
        prior: ARPriorConfig | None = None,
        clip_model: str = "tiny-vit",
        clip_weights: str | None = None,
        optimizer: optim.OptimConfig | None = None,
        fit_samples: int = 20000,
        temperature: float = 1.0,
        similarity_quantile: float = 0.5,
        num_candidates: int = 1,
        drop_text_prob: float = 0.1,
        guidance_scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        args = init_args(locals())
        check_range("model", "drop_text_prob", drop_text_prob, 0.0, 1.0)  # a CFG dropout rate
        super().__init__()
        self.conditioner = ClipConditioner(clip_model, clip_weights)
        cfg = dataclasses.replace(
            as_config(ARPriorConfig, prior), embed_dim=self.conditioner.embed_dim, text_width=self.conditioner.text_width
        )
        self.optim_cfg = as_config(optim.OptimConfig, optimizer)
        self.save_hyperparameters(to_plain({**args, "prior": cfg, "_class_path": class_path_of(self)}))
        self.net = ARPriorTransformer(cfg)
        self.quantizer = PCAQuantizer(cfg.embed_dim, cfg.num_components, cfg.num_buckets, cfg.similarity_buckets)
        self.mean_embed = RunningMean(cfg.embed_dim)

    # -- PCA / buckets -------------------------------------------------------------------------
    @torch.no_grad()
    def fit_quantizer(self, batches: Iterable[dict[str, Any]]) -> float:
        """Fit PCA and buckets on up to `fit_samples` embeddings; returns the variance kept."""
        zis, zts, seen = [], [], 0
        for batch in batches:
            cond = self.conditioner({k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()})
            zis.append(cond["image_embed"])
            zts.append(cond["text_embed"])
            seen += zis[-1].shape[0]
            if seen >= self.hparams.fit_samples:
                break
        if seen < self.net.config.num_components:
            raise ValueError(f"{seen} embeddings cannot fit {self.net.config.num_components} PCA components")
        n = self.hparams.fit_samples
        self.quantizer.fit(torch.cat(zis)[:n], torch.cat(zts)[:n])
        return float(self.quantizer.variance_kept)

    def on_fit_start(self) -> None:
        if not self.quantizer.is_fitted:
            if self.trainer.datamodule is None:
                raise RuntimeError("the AR prior fits its PCA from the datamodule: pass one, or call fit_quantizer first")
            if self.trainer.is_global_zero:
                kept = self.fit_quantizer(self.trainer.datamodule.train_dataloader())
                log.info("AR prior: PCA keeps %.4f of the variance in %d dims", kept, self.net.config.num_components)
            for buf in self.quantizer.buffers():
                buf.copy_(self.trainer.strategy.broadcast(buf, src=0))

    # -- training: cross-entropy on the codes --------------------------------------------------
    def code_loss(self, cond: dict[str, Tensor], drop_prob: float = 0.0) -> tuple[Tensor, Tensor]:
        """(mean cross-entropy in nats per code, per-coordinate CE (P,)); the caption and z_t are
        dropped to the learned null with probability `drop_prob` per sample (for guidance)."""
        codes = self.quantizer.encode(cond["image_embed"])  # (B, P)
        sim = self.quantizer.encode_similarity(cond["image_embed"], cond["text_embed"])  # (B,)
        drop = draws.uniform((codes.shape[0],), device=codes.device) < drop_prob  # (B,)
        logits = self.net(codes[:, :-1], sim, drop_text=drop, **{k: cond[k] for k in TEXT_KEYS})  # (B, P, K)
        ce = F.cross_entropy(logits.transpose(1, 2), codes, reduction="none")  # (B, P)
        return ce.mean(), ce.mean(0)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        cond = self.conditioner(batch)
        self.mean_embed.update(cond["image_embed"])
        loss, _ = self.code_loss(cond, self.hparams.drop_text_prob)  # conditioning dropped 10% (paper)
        self.log("train/loss", loss, prog_bar=True, batch_size=cond["image_embed"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        cond = self.conditioner(batch)
        size = cond["image_embed"].shape[0]
        loss, _ = self.code_loss(cond)
        self.log("val/loss", loss, prog_bar=True, batch_size=size)
        roundtrip = self.quantizer.decode(self.quantizer.encode(cond["image_embed"]))
        self.log("val/quantized_cos", (roundtrip * cond["image_embed"]).sum(-1).mean(), batch_size=size)
        self.log("val/variance_kept", self.quantizer.variance_kept, batch_size=size)
        gen = torch.Generator(device="cpu").manual_seed(self.hparams.seed + batch_idx)
        pred = self.generate(cond, generator=gen)
        scores = compare_to_baselines(pred, cond["image_embed"], cond["text_embed"], self.mean_embed.value())
        self.log_dict({f"val/{k}": v for k, v in scores.items()}, batch_size=size)

    def configure_optimizers(self) -> dict[str, Any]:
        return optim.configure(self.net, self.optim_cfg)

    # -- sampling ------------------------------------------------------------------------------
    def sample_similarity(self, batch: int, generator: torch.Generator | None, quantile: float | None = None) -> Tensor:
        """Similarity tokens (B,) uniform over the buckets at or above `quantile`."""
        buckets = self.net.config.similarity_buckets
        q = self.hparams.similarity_quantile if quantile is None else quantile
        low = min(int(q * buckets), buckets - 1)
        gen_device = generator.device if generator is not None else self.device
        return torch.randint(low, buckets, (batch,), generator=generator, device=gen_device).to(self.device)

    @torch.no_grad()
    def generate(
        self,
        cond: dict[str, Tensor],
        *,
        num_candidates: int | None = None,
        temperature: float | None = None,
        similarity_quantile: float | None = None,
        guidance_scale: float | None = None,
        sampling: Any = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Unit-norm image embeddings (B, D) for `cond` (`text_embed`, `text_tokens`, `text_mask`).

        Same call as `PriorModule.generate`; the guidance scale is `guidance_scale`, else that of
        `sampling` (the pipeline's prior sampling config) when given, else the module's.
        """
        n = num_candidates or self.hparams.num_candidates
        text = {k: cond[k] for k in TEXT_KEYS}
        batch = text["text_embed"].shape[0]
        kwargs = repeat_rows(text, n)
        sim = self.sample_similarity(batch * n, generator, similarity_quantile)
        temp = self.hparams.temperature if temperature is None else temperature
        scale = guidance_scale if guidance_scale is not None else (
            sampling.guidance_scale if sampling is not None else self.hparams.guidance_scale)
        codes = self.net.sample(sim, temperature=temp, guidance_scale=scale, generator=generator, **kwargs)  # (B n, P)
        candidates = self.quantizer.decode(codes).view(batch, n, -1)
        return select_best(candidates, text["text_embed"])
