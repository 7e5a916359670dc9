"""Judging a prior P(z_i | y): how close are sampled image embeddings to the truth?

Shared by the diffusion and the autoregressive prior. For a batch of (caption, image) pairs and
one predicted image embedding per caption, each predictor is scored by:

- ``cos_true``: mean cosine of the prediction to the caption's own image embedding z_i;
- ``cos_text``: mean cosine to the caption's text embedding z_t;
- ``cos_unrelated``: mean cosine to another pair's z_i (the batch rolled by one), so
  ``cos_true - cos_unrelated`` is how much the prediction is specific to its caption;
- ``retrieval``: top-1 accuracy of finding the true z_i among the batch's image embeddings.

Predictors: the prior's samples, the "no prior" baseline (z_t used as the image embedding, what a
decoder conditioned on z_t would get) and the mean-embedding baseline (the normalised mean of the
training image embeddings, the best constant guess). A prior is useful when it beats both.
"""

from __future__ import annotations

from enum import Enum
from typing import Callable, Hashable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Predictor(str, Enum):
    PRIOR = "prior"
    NO_PRIOR = "no_prior"  # z_t as the image embedding
    MEAN = "mean"  # the mean training image embedding


def embedding_scores(pred: Tensor, image_embed: Tensor, text_embed: Tensor) -> dict[str, Tensor]:
    """cos_true, cos_text, cos_unrelated and batch retrieval accuracy of predictions (B, D)."""
    pred, zi, zt = (F.normalize(x.float(), dim=-1) for x in (pred, image_embed, text_embed))
    sims = pred @ zi.T  # (B, B)
    target = torch.arange(pred.shape[0], device=pred.device)
    return {
        "cos_true": sims.diagonal().mean(),
        "cos_text": (pred * zt).sum(-1).mean(),
        "cos_unrelated": (pred * zi.roll(1, dims=0)).sum(-1).mean(),
        "retrieval": (sims.argmax(dim=1) == target).float().mean(),
    }


def baseline_predictions(text_embed: Tensor, mean_embed: Tensor) -> dict[Predictor, Tensor]:
    """The no-prior (z_t) and mean-embedding predictions for a batch, (B, D) each."""
    return {Predictor.NO_PRIOR: text_embed, Predictor.MEAN: mean_embed.to(text_embed).expand_as(text_embed)}


def compare_to_baselines(pred: Tensor, image_embed: Tensor, text_embed: Tensor, mean_embed: Tensor) -> dict[str, Tensor]:
    """``{"prior/cos_true": ..., "no_prior/cos_true": ..., "mean/...": ...}`` for one batch."""
    preds = {Predictor.PRIOR: pred, **baseline_predictions(text_embed, mean_embed)}
    return {
        f"{who.value}/{name}": value
        for who, p in preds.items()
        for name, value in embedding_scores(p, image_embed, text_embed).items()
    }


class RunningMean(nn.Module):
    """Mean of the training image embeddings seen so far (buffers, saved in checkpoints).

    Float buffers only: EMA weight averaging also averages buffers, which would truncate an
    integer count; an EMA of (sum, count) still gives a (lagged) mean.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("total", torch.zeros(dim))
        self.register_buffer("count", torch.zeros(()))

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        self.total += x.detach().float().sum(0).to(self.total)
        self.count += x.shape[0]

    def value(self) -> Tensor:
        """Unit-norm mean embedding (D,); zeros before any update."""
        return F.normalize(self.total / self.count.clamp(min=1.0), dim=-1)


def class_retrieval_accuracy(
    queries: Tensor, bank: Tensor, bank_labels: Sequence[Hashable], query_labels: Sequence[Hashable],
    exclude: Tensor | None = None, k: int = 1,
) -> Tensor:
    """Mean fraction of the k nearest bank embeddings (N, D) that share the query's label.

    k = 1: the fraction of queries (B, D) whose nearest neighbour has the right class. ``exclude``
    (B,) long: a bank index each query may not retrieve (its own image, so that the true z_i is not
    a trivially correct answer), or -1 for none.
    """
    nearest = bank_similarities(queries, bank, exclude).topk(k, dim=1).indices.tolist()  # (B, k)
    hits = [sum(bank_labels[j] == label for j in row) / k for row, label in zip(nearest, query_labels)]
    return torch.tensor(hits, dtype=torch.float32).mean()


def bank_similarities(queries: Tensor, bank: Tensor, exclude: Tensor | None = None) -> Tensor:
    """Cosines (B, N) of queries to bank embeddings; -inf at each row's `exclude` index (≥ 0)."""
    sims = F.normalize(queries.float(), dim=-1) @ F.normalize(bank.float(), dim=-1).T  # (B, N)
    if exclude is not None:
        rows = torch.arange(sims.shape[0], device=sims.device)
        keep = exclude >= 0
        sims[rows[keep], exclude[keep]] = float("-inf")
    return sims


def nearest_image_cos(queries: Tensor, bank: Tensor, exclude: Tensor | None = None) -> Tensor:
    """Mean cosine of each query to its nearest bank image embedding: is it on the image manifold?"""
    return bank_similarities(queries, bank, exclude).max(dim=1).values.mean()


Generate = Callable[[dict[str, Tensor]], Tensor]


@torch.no_grad()
def evaluation_table(
    predictors: dict[str, Generate],
    batches: Iterable[dict[str, Tensor]],
    labels: Sequence[Hashable],
) -> dict[str, dict[str, float]]:
    """Scores of named predictors over a whole evaluation set.

    ``batches`` carry ``image_embed``, ``text_embed``, ``text_tokens``, ``text_mask``; ``labels``
    are the class of every sample in order (e.g. the caption's set of (colour, shape) objects).
    Each predictor maps a batch to (B, D) embeddings; ``"true z_i"`` may be given as an oracle.
    Returns {predictor: {cos_true, cos_text, cos_unrelated, retrieval (batch-wise, averaged),
    class_acc (the nearest OTHER evaluation image has the caption's class), cos_nearest (cosine to
    that nearest other image: how image-like the prediction is)}}.
    """
    preds: dict[str, list[Tensor]] = {name: [] for name in predictors}
    zis, zts, batch_scores = [], [], {name: [] for name in predictors}
    for batch in batches:
        zis.append(batch["image_embed"].float())
        zts.append(batch["text_embed"].float())
        for name, fn in predictors.items():
            pred = fn(batch).float()
            preds[name].append(pred)
            batch_scores[name].append(embedding_scores(pred, zis[-1], zts[-1]))
    bank = torch.cat(zis)
    own = torch.arange(bank.shape[0])
    table: dict[str, dict[str, float]] = {}
    for name in predictors:
        scores = {k: float(torch.stack([s[k] for s in batch_scores[name]]).mean()) for k in batch_scores[name][0]}
        pred = torch.cat(preds[name])
        scores["class_acc"] = float(class_retrieval_accuracy(pred, bank, labels, labels, exclude=own))
        scores["cos_nearest"] = float(nearest_image_cos(pred, bank, exclude=own))
        table[name] = scores
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    """A Markdown table of `evaluation_table`'s output."""
    columns = list(next(iter(table.values())))
    lines = ["| predictor | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, scores in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{scores[c]:.3f}" for c in columns) + " |")
    return "\n".join(lines)
