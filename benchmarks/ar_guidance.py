"""Guided against unguided sampling of a trained autoregressive prior (issue 23 §2).

For each guidance scale s, sample z_i for the validation captions of an embedding export and
score them the way the prior's validation does (`modules.stages.prior_metrics`): cosine with the
true z_i, retrieval of the true image among the batch, and the same for the no-prior (z_t) and
mean-embedding baselines. Same seed for every scale, so the scales differ only by the guidance.

    python -m benchmarks.ar_guidance --ckpt runs/ar-prior-tiny/checkpoints/last.ckpt \
        --val-shards 'runs/demo/data/shapes-emb/val-*.tar' --scales 1 2 3 --samples 512
"""

from __future__ import annotations

import argparse
import json

import torch

from datamodules.embeddings import EmbeddingDataModule
from datamodules.image_text import LoaderConfig
from modules.pipelines.store import load_stage_checkpoint
from modules.stages.prior_metrics import compare_to_baselines
from modules.stages.registry import StageKind


def score(ckpt: str, val_shards: str, scales: list[float], samples: int, batch_size: int, seed: int) -> dict[str, dict[str, float]]:
    prior = load_stage_checkpoint(StageKind.PRIOR, ckpt, "modules.stages.ar_prior.ARPriorModule")
    data = EmbeddingDataModule(train_shards=val_shards, val_shards=val_shards, val_samples=samples,
                               loader=LoaderConfig(batch_size=batch_size, num_workers=0))
    data.setup("validate")
    batches = [prior.conditioner(b) for b in data.val_dataloader()]
    results: dict[str, dict[str, float]] = {}
    for scale in scales:
        totals: dict[str, float] = {}
        count = 0
        for i, cond in enumerate(batches):
            gen = torch.Generator().manual_seed(seed + i)
            pred = prior.generate(cond, guidance_scale=scale, generator=gen)
            scores = compare_to_baselines(pred, cond["image_embed"], cond["text_embed"], prior.mean_embed.value())
            size = cond["image_embed"].shape[0]
            for k, v in scores.items():
                totals[k] = totals.get(k, 0.0) + float(v) * size
            count += size
        results[f"s={scale:g}"] = {k: v / count for k, v in sorted(totals.items())}
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="an ARPriorModule checkpoint")
    p.add_argument("--val-shards", required=True, help="embedding shards written by `unclip embed`")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    results = score(a.ckpt, a.val_shards, a.scales, a.samples, a.batch_size, a.seed)
    keys = [k for k in next(iter(results.values())) if k.startswith("prior/")]
    print(f"{'scale':<8}" + "".join(f"{k:>22}" for k in keys))
    for name, row in results.items():
        print(f"{name:<8}" + "".join(f"{row[k]:>22.4f}" for k in keys))
    base = next(iter(results.values()))
    print("baselines: " + ", ".join(f"{k} {v:.4f}" for k, v in base.items() if not k.startswith("prior/")))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
