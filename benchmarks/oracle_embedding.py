"""How much of the shapes accuracy a perfect prior could buy: the decoder given the CLIP image
embedding of the real validation image (an oracle z_i), next to the prior's z_i and z_t, on the
same validation captions and seed (issue 21 diagnostic).

If the oracle row is far below the target too, the decoder (or what the CLIP image embedding
carries) is the bottleneck, not the prior.

    python -m benchmarks.oracle_embedding --pipeline runs/demo/pipeline \
        --val-shards 'runs/demo/data/shapes/val-*.tar' --samples 240 --steps 25
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from datamodules.image_text import ImageTextDataModule, LoaderConfig
from modules.core.images import to_unit
from modules.evaluation.shapes_evaluator import accuracy_table, evaluate_image
from modules.pipelines.unclip import GenerateConfig, PriorMode, UnCLIPPipeline


@torch.no_grad()
def score(pipe: UnCLIPPipeline, val_shards: str, samples: int, steps: int, seed: int, batch_size: int = 32) -> dict[str, dict]:
    size = pipe.decoder.unet.config.image_size
    data = ImageTextDataModule(train_shards=val_shards, val_shards=val_shards, image_size=size, val_samples=samples,
                               tokenizer=None, loader=LoaderConfig(batch_size=batch_size, num_workers=0))
    data.setup("validate")
    sampling = dataclasses.replace(pipe.decoder.sampling, steps=steps)
    rows: dict[str, list] = {"oracle z_i (true image)": [], "prior z_i": [], "z_t (no prior)": []}
    for i, batch in enumerate(data.val_dataloader()):
        captions = list(batch["caption"])
        text = pipe.encode_text(captions)
        sources = {
            "oracle z_i (true image)": pipe.clip.encode_image(batch["image"].to(pipe.device)),
            "prior z_i": None,
            "z_t (no prior)": None,
        }
        for name, z_i in sources.items():
            gen = torch.Generator().manual_seed(seed + i)  # the same x_T for every source
            if z_i is None:
                mode = PriorMode.PRIOR if name == "prior z_i" else PriorMode.TEXT
                z_i = pipe.image_embeddings(text, GenerateConfig(prior_mode=mode), gen)
                gen = torch.Generator().manual_seed(seed + i)
            images = to_unit(pipe.decode(text, z_i, GenerateConfig(decoder_sampling=sampling, upsample=False), gen))
            rows[name] += [evaluate_image(img, cap) for img, cap in zip(images, captions)]
    return {name: accuracy_table(r) for name, r in rows.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", required=True)
    p.add_argument("--val-shards", required=True)
    p.add_argument("--samples", type=int, default=240)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    tables = score(UnCLIPPipeline.load(a.pipeline), a.val_shards, a.samples, a.steps, a.seed)
    print(f"{'z_i from':<26}{'n 1/2':>10}{'single':>9}{'two':>9}{'two, objects':>14}")
    for name, t in tables.items():
        print(f"{name:<26}{t['n_single']:>5}/{t['n_two']:<4}{t['single_object_accuracy']:>9.3f}{t['two_object_accuracy']:>9.3f}"
              f"{t['two_object_objects_accuracy']:>14.3f}")
    print(json.dumps(tables))


if __name__ == "__main__":
    main()
