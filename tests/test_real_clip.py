"""Real open_clip architectures end to end (randomly initialised: no downloads): `ViT-B-32`
(512-d embeddings, 512-wide text) and `RN50` (1024-d embeddings, 512-wide text, so a swap of the
two widths anywhere would fail) through `unclip embed` -> prior -> decoder -> `unclip pipeline`
-> `unclip generate`. One CLIP weight file serves every stage, as a trained CLIP would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from datamodules.shapes.dataset import ShapesConfig, write_shapes_dataset
from modules.cli.lightning import UnclipCLI
from modules.cli.main import main
from modules.networks.clip import create_clip

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.accelerator=cpu", "--trainer.max_steps=2", "--trainer.max_time=null", "--trainer.val_check_interval=2",
         "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--trainer.logger=false",
         "--trainer.callbacks=null", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--data.loader.batch_size=4", "--data.loader.num_workers=0", "--data.resampled=false", "--data.val_shards=null"]


@pytest.mark.slow
@pytest.mark.parametrize("model, embed_dim, text_width", [("ViT-B-32", 512, 512), ("RN50", 1024, 512)])
def test_real_clip_through_the_whole_cascade(model: str, embed_dim: int, text_width: int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "clip.pt"
    torch.save(create_clip(model).state_dict(), weights)  # the "trained" CLIP every stage shares
    data = tmp_path / "shapes"
    write_shapes_dataset(ShapesConfig(num_samples=16, size=32, shard_size=8, val_fraction=0.0), data, workers=1)
    assert main(["embed", "--clip", model, "--weights", str(weights), "--shards", f"{data}/train-*.tar",
                 "--out", str(tmp_path / "emb"), "--batch-size", "8", "--num-workers", "0", "--no-progress"]) == 0
    meta = json.loads((tmp_path / "emb" / "meta.json").read_text())
    assert meta["embed_dim"] == embed_dim and meta["text_width"] == text_width, meta
    prior = UnclipCLI(args=["fit", "--config", str(ROOT / "experiments/prior/tiny.yaml"), *QUIET,
                            f"--model.clip_model={model}", f"--model.clip_weights={weights}",
                            "--data.train_shards", f"{tmp_path}/emb/train-*.tar", f"--trainer.default_root_dir={tmp_path / 'prior'}"])
    assert prior.model.net.config.embed_dim == embed_dim and prior.model.net.config.text_width == text_width
    decoder = UnclipCLI(args=["fit", "--config", str(ROOT / "experiments/decoder/tiny.yaml"), *QUIET,
                              f"--model.clip_model={model}", f"--model.clip_weights={weights}", f"--data.tokenizer={model}",
                              "--data.train_shards", f"{data}/train-*.tar", f"--trainer.default_root_dir={tmp_path / 'decoder'}"])
    assert decoder.model.unet.config.image_embed_dim == embed_dim and decoder.model.unet.config.text_embed_dim == text_width
    pipe = tmp_path / "pipe"
    assert main(["pipeline", "--clip-model", model, "--clip-weights", str(weights), "--prior",
                 str(tmp_path / "prior/checkpoints/last.ckpt"), "--decoder", str(tmp_path / "decoder/checkpoints/last.ckpt"),
                 "--out", str(pipe)]) == 0
    assert main(["generate", "--pipeline", str(pipe), "--prompt", "a red circle to the left of a blue square",
                 "--num-images", "2", "--steps", "3", "--out", str(tmp_path / "samples")]) == 0
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == ["000_00.png", "000_01.png", "grid.png"]
    # a decoder trained against this CLIP is refused in a pipeline of another
    assert main(["pipeline", "--clip-model", "tiny-vit", "--decoder", str(tmp_path / "decoder/checkpoints/last.ckpt"),
                 "--out", str(tmp_path / "mixed")]) == 2
    assert not (tmp_path / "mixed").exists()
