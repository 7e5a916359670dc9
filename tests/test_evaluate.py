"""`unclip evaluate` on a tiny decoder checkpoint trained for a few steps here."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from callbacks.loggers import read_offline_run
from modules.cli.main import main
from modules.evaluation.evaluate import EvalConfig, evaluate
from tests.conftest import sample_members, write_tar

REPORT_KEYS = {"schema", "source", "data", "settings", "feature_extractor", "metrics", "metric_notes", "images", "timing", "html",
               "shapes_accuracy"}
METRICS = {"fid", "kid_mean", "kid_std", "inception_score_mean", "inception_score_std", "clip_score", "clip_score_real"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[str, str]:
    """(checkpoint, shard pattern): 2 shards of 10 solid-colour 16 px images and a decoder fit for 3 steps."""
    from datamodules.image_text import ImageTextDataModule, LoaderConfig
    from modules.stages.decoder import DecoderModule

    root = tmp_path_factory.mktemp("tiny_run")
    rng = np.random.default_rng(0)
    colours = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 160, 60)}
    for s in range(2):
        members = []
        for i in range(10):
            name = list(colours)[(s * 10 + i) % 3]
            arr = np.clip(np.array(colours[name]) + rng.integers(-20, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            members += sample_members(f"{s:04d}{i:05d}", arr, f"a {name} square")
        write_tar(root / f"val-{s:06d}.tar", members)
    pattern = str(root / "val-{000000..000001}.tar")
    torch.manual_seed(0)
    module = DecoderModule(
        unet=dict(image_size=16, model_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[8], num_head_channels=16, num_groups=8),
        diffusion=dict(timesteps=100), sampling=dict(steps=4, guidance_scale=2.0), val_timesteps=(10,),
    )  # fmt: skip
    data = ImageTextDataModule(pattern, image_size=16, tokenizer="tiny-vit", loader=LoaderConfig(batch_size=4, num_workers=0))
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=root)
    trainer.fit(module, data)
    ckpt = root / "decoder.ckpt"
    trainer.save_checkpoint(ckpt)
    return str(ckpt), pattern


def test_evaluate_writes_report_json_and_offline_html(tiny_run, tmp_path, capsys):
    ckpt, pattern = tiny_run
    out = tmp_path / "eval"
    args = ["evaluate", "--checkpoint", ckpt, "--val-shards", pattern, "--out", str(out), "--num-samples", "12",
            "--batch-size", "5", "--kid-subset-size", "6", "--isc-splits", "2", "--show", "8", "--wandb"]  # fmt: skip
    assert main(args) == 0
    assert "unclip evaluate: 12 samples; fid" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert set(report) == REPORT_KEYS
    assert set(report["metrics"]) == METRICS
    assert all(isinstance(v, float) and math.isfinite(v) for v in report["metrics"].values()), report["metrics"]
    assert report["metrics"]["fid"] > 0 and report["metrics"]["kid_std"] >= 0 and report["metrics"]["inception_score_mean"] >= 1
    assert report["data"]["num_generated"] == report["data"]["num_real"] == 12
    shapes = report["shapes_accuracy"]  # the captions are shapes captions: the evaluator scored all 12
    assert shapes["n_single"] == 12 and 0 <= shapes["single_object_accuracy"] <= 1
    assert report["source"]["stage"] == "decoder" and report["source"]["global_step"] == 3
    assert report["source"]["generator"] == "decoder given true CLIP image embeddings"
    assert report["feature_extractor"]["source"] == "clip" and "FID_CLIP" in report["feature_extractor"]["description"]
    assert report["settings"]["sampling"]["steps"] == 4 and len(report["images"]["samples"]) == 8
    assert {s["caption"] for s in report["images"]["samples"]} <= {"a red square", "a blue square", "a green square"}
    # The HTML references only existing local images, by relative path, and everything in the report.
    page = (out / "report.html").read_text()
    srcs = re.findall(r"src='([^']+)'", page)
    assert srcs and all((out / s).is_file() and not Path(s).is_absolute() for s in srcs)
    wanted = {report["images"]["samples_grid"], report["images"]["real_grid"], *(s["path"] for s in report["images"]["samples"])}
    assert set(srcs) == wanted
    assert "<script" not in page and "http" not in page and f"{report['metrics']['fid']:.5g}" in page
    # The same report as an offline W&B run.
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    run = read_offline_run(run_dir, wait_s=30)
    assert run.scalars()["eval/fid"] == [pytest.approx(report["metrics"]["fid"])]
    assert len(run.images) == 9 and run.meta["job_type"] == "evaluate"


def test_evaluate_is_deterministic_for_a_seed(tiny_run, tmp_path):
    ckpt, pattern = tiny_run

    def run(name: str, seed: int, prompts: str | None = None) -> tuple[dict, list[bytes]]:
        cfg = EvalConfig(out=str(tmp_path / name), checkpoint=ckpt, val_shards=pattern, prompts=prompts, num_samples=8,
                         batch_size=4, seed=seed, kid_subsets=3, kid_subset_size=4, isc_splits=2, show=8)  # fmt: skip
        report = evaluate(cfg)
        return report, [(tmp_path / name / s["path"]).read_bytes() for s in report["images"]["samples"]]

    a, a_png = run("a", 0)
    b, b_png = run("b", 0)
    c, c_png = run("c", 1)
    assert a["metrics"] == b["metrics"] and a_png == b_png
    assert c_png != a_png and c["metrics"]["fid"] != a["metrics"]["fid"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na purple circle\n\na yellow triangle\n")
    p, _ = run("p", 0, str(prompts))
    assert [s["caption"] for s in p["images"]["samples"][:3]] == ["a purple circle", "a yellow triangle", "a purple circle"]
    assert p["metrics"]["clip_score_real"] is not None and p["data"]["num_real"] == 8


class NotATensor:
    pass


def test_evaluate_refuses_unsafe_checkpoints_and_missing_inputs(tiny_run, tmp_path, capsys):
    ckpt, pattern = tiny_run
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": NotATensor()}}, evil)
    assert main(["evaluate", "--checkpoint", str(evil), "--val-shards", pattern, "--out", str(tmp_path / "e")]) == 2
    assert "weights_only=True" in capsys.readouterr().err
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\n")
    assert main(["evaluate", "--checkpoint", ckpt, "--prompts", str(prompts), "--out", str(tmp_path / "f")]) == 2
    assert "needs true image embeddings" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing.ckpt"), "--val-shards", pattern, "--out", str(tmp_path / "g")]) == 2
    assert main(["evaluate", "--pipeline", str(tmp_path), "--val-shards", pattern, "--out", str(tmp_path / "h")]) == 2
    assert "pipeline" in capsys.readouterr().err
