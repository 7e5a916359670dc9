"""Stage 1: contrastive CLIP training (Radford et al. 2021) with open_clip, and embedding export.

`CLIPModule` trains an open_clip model named from the registry on image/caption batches with
open_clip's `ClipLoss`: the symmetric cross-entropy over the N x N cosine-similarity matrix
scaled by exp(logit_scale), features gathered across data-parallel ranks. As in CLIP, the learned
temperature is clamped so that exp(logit_scale) <= 100 after every step.

Validation (all under `val/`):
- `i2t_recall@K` / `t2i_recall@K` (K = 1, 5, 10) over the whole validation split (features
  gathered over ranks); `t2i_recall@1_single` / `_pair` split the text queries by the number of
  objects their shapes caption names (relations are where small CLIPs fail first). A retrieved item counts when it shows the query's *content*: captions are
  compared after `caption_content` (shapes captions reduced to objects + relation, so "a photo of
  a red circle" and "a red circle" match, as do "A left of B" and "B right of A"; any other
  caption is compared verbatim, which for unique captions is the usual paired-item recall).
- `zeroshot_acc`: zero-shot (colour, shape) classification of single-object shapes images among
  the 18 classes `grammar.ALL_OBJECTS`, classifier = mean prompt embedding over the templates
  (CLIP's prompt ensembling). `zeroshot_color_acc` / `zeroshot_shape_acc` split that decision.
  Two-object images have no single label: `zeroshot_pair_acc` counts the top-1 class being one of
  the two objects present. Labels come from the caption, whose grammar `grammar.parse_caption`
  inverts exactly (it is generated from the sample's `.json` truth by `grammar.describe`).

`CLIPEmbedder` is the predict-time module behind `unclip embed`: a `FrozenCLIP` that turns
image/caption batches into z_i, z_t and the caption's token encodings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import lightning.pytorch as pl
import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import Tensor, nn
from torchmetrics import MeanMetric

from datamodules.negatives import binding_foils
from datamodules.shapes import grammar
from modules.core import optim
from modules.core.hparams import as_config, to_plain
from modules.stages.registry import class_path_of
from modules.networks.clip import FrozenCLIP, create_clip, image_input_spec, to_clip_input

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the temperature so logits are scaled by <= 100
NO_DECAY_NAMES = ("logit_scale", "embedding", "logit_bias")
ZERO_SHOT_METRICS = ("acc", "color_acc", "shape_acc", "pair_acc")
BINDING_PROBES = ("attribution", "relation")  # `datamodules.negatives.binding_foils`
_MIRROR = {grammar.Relation.RIGHT.value: grammar.Relation.LEFT.value, grammar.Relation.BELOW.value: grammar.Relation.ABOVE.value}


class CLIPModule(pl.LightningModule):
    """Contrastive training of an open_clip model.

    Args:
        model_name: open_clip registry name (project configs `tiny-vit`, `tiny-rn`, or standard
            ones such as `ViT-B-32`, `ViT-H-14`).
        pretrained: local weight file to start from (open_clip `.bin` / `.safetensors`, OpenAI
            file, or a CLIP-stage checkpoint); None = random initialisation.
        optimizer: AdamW + warmup + cosine; `decay_steps` None = the trainer's total steps.
        local_loss / gather_with_grad: open_clip's DDP options (local rows only against all
            gathered columns / backpropagate through the all-gather).
        grad_checkpointing: recompute transformer activations in backward (memory for compute).
        zero_shot: run the shapes zero-shot classification in validation.
        zero_shot_templates: prompt templates (`{}` = "a red circle"); None = `grammar.TEMPLATES`.
        recall_ks: K values of recall@K.
        hard_negative_weight: weight of the NegCLIP term when batches carry `negative_tokens`
            (the DataModule's `negatives`); 0 trains on them as plain CLIP would.
    Mixed precision is the Trainer's `precision` switch (e.g. `bf16-mixed`).
    """

    def __init__(
        self,
        model_name: str = "tiny-vit",
        pretrained: str | None = None,
        optimizer: optim.OptimConfig | None = None,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        grad_checkpointing: bool = False,
        zero_shot: bool = True,
        zero_shot_templates: list[str] | None = None,
        recall_ks: tuple[int, ...] = (1, 5, 10),
        hard_negative_weight: float = 1.0,
    ) -> None:
        args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.optim_cfg = as_config(optim.OptimConfig, optimizer)
        self.save_hyperparameters(to_plain({**args, "optimizer": self.optim_cfg, "_class_path": class_path_of(self)}))
        self.model = create_clip(model_name, pretrained)
        self.model.set_grad_checkpointing(grad_checkpointing)
        self.image_size, mean, std = image_input_spec(self.model)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.loss_fn = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True)
        self.local_loss_fn = ClipLoss()  # validation batches differ in size across ranks: no gathering
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.templates = list(zero_shot_templates or grammar.TEMPLATES)
        self.val_loss = MeanMetric()
        # Accuracies as means of 0/1 hits: every rank computes (and syncs) even with no updates.
        self.zero_shot_metrics = nn.ModuleDict({name: MeanMetric() for name in ZERO_SHOT_METRICS})
        self.binding_metrics = nn.ModuleDict({name: MeanMetric() for name in BINDING_PROBES})
        self._val_rows: list[tuple[Tensor, ...]] = []  # (z_i, z_t, content id, number of objects)
        self._classifier: Tensor | None = None

    # -- hooks -----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self.loss_fn.rank, self.loss_fn.world_size = self.trainer.global_rank, self.trainer.world_size

    def encode(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Images (B, 3, H, W) in [-1, 1] and token ids (B, L) -> unit-norm (z_i, z_t), each (B, D)."""
        x = to_clip_input(images, self.image_size, self.mean, self.std)
        return self.model.encode_image(x, normalize=True), self.model.encode_text(tokens, normalize=True)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        z_i, z_t = self.encode(batch["image"], batch["tokens"])  # (B, D) each
        scale = self.model.logit_scale.exp()
        loss = self.loss_fn(z_i, z_t, scale)  # CE(scale * z_i z_t^T, I) both ways, averaged
        if "negative_tokens" in batch and self.hparams.hard_negative_weight > 0:
            hard = self.hard_negative_loss(z_i, z_t, batch["negative_tokens"], scale)
            self.log("train/hard_negative_loss", hard, batch_size=z_i.shape[0])
            loss = loss + self.hparams.hard_negative_weight * hard
        self.log("train/loss", loss, prog_bar=True, batch_size=z_i.shape[0])
        self.log("train/logit_scale", scale, batch_size=z_i.shape[0])
        return loss

    def hard_negative_loss(self, z_i: Tensor, z_t: Tensor, negative_tokens: Tensor, scale: Tensor) -> Tensor:
        """NegCLIP's image-to-text term with hard negatives (Yuksekgonul et al. 2023): each image
        must pick its caption among the batch's captions and every sample's hard negatives,
        CE(scale * z_i [z_t; z_n]^T, i) over B + B k columns. Local to the rank's batch."""
        b, k, length = negative_tokens.shape
        z_n = self.model.encode_text(negative_tokens.reshape(b * k, length), normalize=True)  # (B k, D)
        logits = scale * z_i @ torch.cat([z_t, z_n]).T  # (B, B + B k)
        return F.cross_entropy(logits, torch.arange(b, device=z_i.device))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optim_cfg
        if cfg.decay_steps is None:
            total = self.trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ValueError("CLIPModule needs optimizer.decay_steps or a finite trainer.max_steps for its cosine schedule")
            cfg = dataclasses.replace(cfg, decay_steps=int(total))
        return optim.configure(self.model, cfg, params=clip_param_groups(self.model, cfg.weight_decay))

    # -- validation ------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_rows = []
        self._classifier = self.zero_shot_classifier() if self.hparams.zero_shot else None

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        z_i, z_t = self.encode(batch["image"], batch["tokens"])
        self.val_loss.update(self.local_loss_fn(z_i, z_t, self.model.logit_scale.exp()), weight=z_i.shape[0])
        labels = shapes_labels(batch["caption"]).to(z_i.device)  # (B, 2)
        content = torch.tensor([content_id(c) for c in batch["caption"]], device=z_i.device)
        self._val_rows.append((z_i.float(), z_t.float(), content, (labels >= 0).sum(dim=1)))
        if self._classifier is not None:
            self._update_zero_shot(z_i.float() @ self._classifier.T, labels)
        self._update_binding(z_i.float(), z_t.float(), batch["caption"])

    @torch.no_grad()
    def _update_binding(self, z_i: Tensor, z_t: Tensor, captions: list[str]) -> None:
        """`val/binding_<probe>`: the share of two-object images whose caption scores above its
        foil (colours swapped between the objects; relation reversed). 0.5 is a bag of words."""
        for probe, metric in self.binding_metrics.items():
            rows = [(i, f[probe]) for i, c in enumerate(captions) if probe in (f := binding_foils(c))]
            if not rows:
                continue
            index = torch.tensor([i for i, _ in rows], device=z_i.device)
            z_f = self.model.encode_text(self.tokenizer([f for _, f in rows]).to(self.device), normalize=True).float()
            own = (z_i[index] * z_t[index]).sum(-1)
            metric.update((own > (z_i[index] * z_f).sum(-1)).float())

    def on_validation_epoch_end(self) -> None:
        if not self._val_rows:
            return
        z_i, z_t, content, num_objects = (self._gather_rows(torch.cat(parts)) for parts in zip(*self._val_rows))
        self._val_rows = []
        relevant = content[:, None] == content[None, :]  # (N, N), symmetric
        sim = z_i @ z_t.T  # (N images, N texts)
        metrics = {"val/loss": self.val_loss.compute()}
        for direction, scores in (("i2t", sim), ("t2i", sim.T)):
            for k, value in recall_at_k(scores, relevant, self.hparams.recall_ks).items():
                metrics[f"val/{direction}_recall@{k}"] = value
        for count, kind in ((1, "single"), (2, "pair")):  # text queries by number of captioned objects
            rows = num_objects == count
            if rows.any():
                metrics[f"val/t2i_recall@1_{kind}"] = recall_at_k(sim.T[rows], relevant[rows], (1,))[1]
        for name, metric in self.binding_metrics.items():
            value = metric.compute()
            if torch.isfinite(value):
                metrics[f"val/binding_{name}"] = value
            metric.reset()
        for name, metric in self.zero_shot_metrics.items():
            if self._classifier is not None:
                value = metric.compute()  # NaN when no sample of that kind was seen
                if torch.isfinite(value):
                    metrics[f"val/zeroshot_{name}"] = value
            metric.reset()
        self.val_loss.reset()
        self.log_dict(metrics, sync_dist=True)  # already equal on every rank: the mean keeps them

    @torch.no_grad()
    def zero_shot_classifier(self) -> Tensor:
        """(C, D) unit-norm class embeddings: the mean over templates of each class's prompts."""
        prompts = [
            grammar.describe({"objects": [obj._asdict()], "relation": None, "template": t})
            for obj in grammar.ALL_OBJECTS
            for t in self.templates
        ]
        z = self.model.encode_text(self.tokenizer(prompts).to(self.device), normalize=True)  # (C*T, D)
        z = z.float().view(len(grammar.ALL_OBJECTS), len(self.templates), -1).mean(dim=1)
        return F.normalize(z, dim=-1)

    def _update_zero_shot(self, logits: Tensor, labels: Tensor) -> None:
        """`logits` (B, C) against the class embeddings; `labels` (B, 2) from `shapes_labels`."""
        pred = logits.argmax(dim=-1)  # (B,)
        single = (labels[:, 0] >= 0) & (labels[:, 1] < 0)
        m = self.zero_shot_metrics
        if single.any():
            p, y = pred[single], labels[single, 0]
            n_shapes = len(grammar.SHAPES)  # class = colour index * n_shapes + shape index
            m["acc"].update((p == y).float())
            m["color_acc"].update((p // n_shapes == y // n_shapes).float())
            m["shape_acc"].update((p % n_shapes == y % n_shapes).float())
        pair = labels[:, 1] >= 0
        if pair.any():
            m["pair_acc"].update((pred[pair, None] == labels[pair]).any(dim=-1).float())

    def _gather_rows(self, x: Tensor) -> Tensor:
        """Concatenate a per-rank (N_r, ...) tensor over ranks (sizes may differ)."""
        if self.trainer.world_size == 1:
            return x
        counts = self.all_gather(torch.tensor([x.shape[0]], device=x.device)).flatten().tolist()
        pad = x.new_zeros((max(counts) - x.shape[0], *x.shape[1:]))
        gathered = self.all_gather(torch.cat([x, pad]))  # (W, N_max, ...)
        return torch.cat([gathered[r, :n] for r, n in enumerate(counts)])


def clip_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as in CLIP/open_clip: no decay on gains, biases, the temperature, embeddings."""
    return optim.param_groups(model, weight_decay, exempt_names=NO_DECAY_NAMES)


def recall_at_k(scores: Tensor, relevant: Tensor, ks: tuple[int, ...]) -> dict[int, Tensor]:
    """Fraction of queries (rows of `scores`, (Q, N)) with a relevant item among their top K."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # (Q, K)
    hits = relevant.gather(1, top)  # (Q, K) bool
    return {k: hits[:, :k].any(dim=1).float().mean() for k in ks}


def caption_content(caption: str) -> str:
    """What a caption says, independent of template and of relation direction (shapes grammar);
    other captions are returned unchanged."""
    try:
        objs, relation, _ = grammar.parse_caption(caption)
    except ValueError:
        return caption
    if relation in _MIRROR:
        objs, relation = objs[::-1], _MIRROR[relation]
    return " | ".join([" ".join(objs[0]), *([relation, " ".join(objs[1])] if relation else [])])


def content_id(caption: str) -> int:
    """A signed 64-bit id of `caption_content` (gatherable across ranks as a tensor)."""
    digest = hashlib.blake2b(caption_content(caption).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def shapes_labels(captions: list[str]) -> Tensor:
    """(B, 2) class indices into `grammar.ALL_OBJECTS` of the captioned objects; -1 where absent
    (second column for one-object scenes, both for captions outside the shapes grammar)."""
    index = {obj: i for i, obj in enumerate(grammar.ALL_OBJECTS)}
    labels = torch.full((len(captions), 2), -1, dtype=torch.long)
    for row, caption in enumerate(captions):
        try:
            objs, _, _ = grammar.parse_caption(caption)
        except ValueError:
            continue
        for col, obj in enumerate(objs):
            labels[row, col] = index[obj]
    return labels


class CLIPEmbedder(pl.LightningModule):
    """`predict_step`: image/caption batch -> z_i (B, D), z_t (B, D), token encodings (B, L, W) + mask.

    Batches flagged `end_of_shard` pass through untouched (the writer callback closes shards).
    """

    def __init__(self, model_name: str, pretrained: str | None = None) -> None:
        super().__init__()
        self.clip = FrozenCLIP(model_name, pretrained)

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> dict[str, Any]:
        if batch.get("end_of_shard"):
            return batch
        text = self.clip.encode_text(batch["tokens"])
        return {
            "key": batch["key"],
            "caption": batch["caption"],
            "shard": batch["shard"],
            "image_embed": self.clip.encode_image(batch["image"]),  # (B, D)
            "text_embed": text.embed,  # (B, D)
            "text_tokens": text.tokens,  # (B, L, W)
            "text_mask": text.mask,  # (B, L)
        }
