"""Faults and bad input: fuzzed shards train to the end with every bad sample counted by reason;
non-finite losses are skipped and, K in a row, stop training with one clear message; every bad
CLI argument / config key / type / missing file gives one line naming it (exit code 2)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from callbacks.reliability import DataHealth, NonFiniteGuard
from modules.cli import main as cli
from modules.cli.lightning import UnclipCLI, summarize_error
from tests import ddp_probe
from tests.ddp_probe import png, tar_bytes
from tests.conftest import sample_members, write_tar

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--trainer.max_time=null", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0"]


def jpeg_garbage() -> bytes:
    return b"\xff\xd8\xff\xe0" + b"\x00\x10JFIF" + bytes(range(256)) * 4  # a JPEG header, then noise


# ---------------------------------------------------------------------------------------------
# Fuzzed shards
# ---------------------------------------------------------------------------------------------
def fuzzed_image_shards(folder: Path) -> tuple[str, Counter]:
    """4 shards, 16 good samples and one of each fault; returns (pattern, expected skip counts)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def good(key: str) -> list[tuple[str, bytes]]:
        return [(f"{key}.png", png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))), (f"{key}.txt", f"caption {key}".encode())]

    image = png(np.zeros((16, 16, 3), np.uint8))
    shard0 = [m for i in range(4) for m in good(f"a{i}")] + [
        ("bad_png.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20), ("bad_png.txt", b"a bad png"),
        ("bad_jpg.jpg", jpeg_garbage()), ("bad_jpg.txt", b"a bad jpeg"),
        ("no_caption.png", image),
        ("empty_caption.png", image), ("empty_caption.txt", b"  \n"),
    ]
    shard1 = [m for i in range(4) for m in good(f"b{i}")] + [
        ("long_caption.png", image), ("long_caption.txt", b"x" * 100_000),
        ("latin1_caption.png", image), ("latin1_caption.txt", "café crème".encode("latin-1")),
    ]
    shard2 = tar_bytes([m for i in range(5) for m in good(f"c{i}")])
    cut = shard2.find(b"c4.png") + 512 + 100  # inside the fifth sample's image bytes
    shard3 = [m for i in range(4) for m in good(f"d{i}")]
    (folder / "f-000000.tar").write_bytes(tar_bytes(shard0))
    (folder / "f-000001.tar").write_bytes(tar_bytes(shard1))
    (folder / "f-000002.tar").write_bytes(shard2[:cut])
    (folder / "f-000003.tar").write_bytes(tar_bytes(shard3))
    expected = Counter(bad_image=2, missing_caption=1, empty_caption=1, caption_too_long=1, caption_not_utf8=1, unreadable_tar=1)
    return str(folder / "f-{000000..000003}.tar"), expected


def fuzzed_embedding_shards(folder: Path) -> tuple[str, Counter]:
    """16 good embedding samples plus wrong-size z_i, wrong-width tokens, a corrupt array, a
    missing member and a truncated shard."""
    from datamodules.embeddings import sample_members

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)

    def sample(key: str, d: int = 64, w: int = 64) -> list[tuple[str, bytes]]:
        zi, zt = torch.randn(d, generator=g), torch.randn(64, generator=g)
        return sample_members(key, f"caption {key}", zi / zi.norm(), zt / zt.norm(), torch.randn(5, w, generator=g), np.float32)

    bad_npy = [(n, b"not an npy" if n.endswith("img_emb.npy") else d) for n, d in sample("corrupt")]
    missing = [(n, d) for n, d in sample("missing") if not n.endswith("txt_emb.npy")]
    shard0 = [m for i in range(3) for m in sample(f"a{i}")] + sample("small_zi", d=32) + [m for i in range(3, 5) for m in sample(f"a{i}")]
    shard1 = [m for i in range(5) for m in sample(f"b{i}")] + sample("narrow_tokens", w=48) + bad_npy + missing
    shard2 = tar_bytes([m for i in range(4) for m in sample(f"c{i}")])
    cut = shard2.find(b"c3.img_emb.npy") + 512 + 20
    shard3 = [m for i in range(3) for m in sample(f"d{i}")]
    (folder / "e-000000.tar").write_bytes(tar_bytes(shard0))
    (folder / "e-000001.tar").write_bytes(tar_bytes(shard1))
    (folder / "e-000002.tar").write_bytes(shard2[:cut])
    (folder / "e-000003.tar").write_bytes(tar_bytes(shard3))
    expected = Counter({"wrong_shape_image_embed": 1, "wrong_shape_text_tokens": 1, "bad_embedding (ValueError)": 1,
                        "bad_embedding (KeyError)": 1, "unreadable_tar": 1})
    return str(folder / "e-{000000..000003}.tar"), expected


def fit_cli(args: list[str]) -> UnclipCLI:
    return UnclipCLI(args=["fit", *args, *QUIET])


def health(trainer) -> DataHealth:
    return next(cb for cb in trainer.callbacks if isinstance(cb, DataHealth))


def test_fuzzed_image_shards_train_to_the_end_with_every_fault_counted(tmp_path: Path, caplog):
    pattern, expected = fuzzed_image_shards(tmp_path / "shards")
    caplog.set_level("INFO", logger="unclip.reliability")
    run = fit_cli(["--config", str(ROOT / "experiments/clip/tiny.yaml"), "--data.train_shards", pattern,
                   "--data.val_shards=null", "--data.resampled=false", "--data.loader.batch_size=4", "--data.loader.num_workers=1",
                   "--data.image_size=32", "--data.shuffle_buffer=0", "--trainer.max_steps=-1", "--trainer.max_epochs=1",
                   "--trainer.callbacks=null", f"--trainer.default_root_dir={tmp_path}"])
    assert run.trainer.state.finished and run.trainer.global_step == 4  # 16 good samples, batches of 4
    totals = health(run.trainer).totals
    assert totals.pop("__samples__") == 16
    assert totals == expected
    summary = [r.getMessage() for r in caplog.records if "data health" in r.getMessage()]
    print("\n" + "\n".join(summary))
    assert summary and "16 samples trained, 7 skipped" in summary[-1]


def test_fuzzed_embedding_shards_train_the_prior_to_the_end(tmp_path: Path, caplog):
    pattern, expected = fuzzed_embedding_shards(tmp_path / "shards")
    caplog.set_level("INFO", logger="unclip.reliability")
    run = fit_cli(["--config", str(ROOT / "experiments/prior/tiny.yaml"), "--data.train_shards", pattern,
                   "--data.val_shards=null", "--data.resampled=false", "--data.loader.batch_size=4", "--data.loader.num_workers=0",
                   "--data.shuffle_buffer=0", "--model.clip_weights=null", "--trainer.max_steps=-1", "--trainer.max_epochs=1",
                   "--trainer.callbacks=null", f"--trainer.default_root_dir={tmp_path}"])
    assert run.trainer.state.finished and run.trainer.global_step == 4
    totals = health(run.trainer).totals
    assert totals.pop("__samples__") == 16 and totals == expected
    print("\n" + "\n".join(r.getMessage() for r in caplog.records if "data health" in r.getMessage()))


# ---------------------------------------------------------------------------------------------
# Non-finite guard
# ---------------------------------------------------------------------------------------------
def prior_run(tmp_path: Path, extra: list[str]) -> UnclipCLI:
    pattern = ddp_probe.write_embedding_shards(tmp_path / "emb", shards=2, per_shard=16)
    args = ["--config", str(ROOT / "experiments/prior/tiny.yaml"), "--data.train_shards", pattern, "--data.val_shards=null",
            "--data.loader.batch_size=4", "--data.loader.num_workers=0", "--model.clip_weights=null", "--trainer.callbacks=null",
            f"--trainer.default_root_dir={tmp_path}", *QUIET, *extra]
    return UnclipCLI(args=args, run=False)


def test_non_finite_steps_are_skipped_without_touching_weights_or_adam_state(tmp_path: Path):
    run = prior_run(tmp_path, ["--trainer.max_steps=6"])
    guard = next(cb for cb in run.trainer.callbacks if isinstance(cb, NonFiniteGuard))
    snapshots: dict[int, torch.Tensor] = {}

    class Snapshot(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots[trainer.global_step] = torch.cat([p.detach().flatten() for p in pl_module.parameters()]).clone()

    run.trainer.callbacks += [ddp_probe.PoisonBatches({2, 3}), Snapshot()]
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert run.trainer.global_step == 6 and guard.skipped == 2 and guard.consecutive == 0
    assert torch.equal(snapshots[2], snapshots[4]), "steps 2 and 3 changed no weight"
    assert not torch.equal(snapshots[1], snapshots[2]) and not torch.equal(snapshots[4], snapshots[5])
    steps = {int(s["step"]) for s in run.trainer.optimizers[0].state.values()}
    assert steps == {4}, "AdamW counted only the 4 finite steps"
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


def test_k_non_finite_steps_in_a_row_stop_training_with_one_clear_line(tmp_path: Path, monkeypatch, capsys):
    pattern = ddp_probe.write_embedding_shards(tmp_path / "emb", shards=2, per_shard=16)
    monkeypatch.setenv("UNCLIP_POISON_STEPS", "3-100")
    code = cli.main(["fit", "--config", str(ROOT / "experiments/prior/tiny.yaml"), "--data.train_shards", pattern,
                     "--data.val_shards=null", "--data.loader.batch_size=4", "--data.loader.num_workers=0", "--model.clip_weights=null",
                     "--trainer.callbacks=null", "--trainer.callbacks+=tests.ddp_probe.PoisonBatches",
                     "--trainer.max_steps=50", f"--trainer.default_root_dir={tmp_path}", *QUIET])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("unclip fit: error:")]
    assert code == 1 and len(errors) == 1, errors
    assert "5 consecutive non-finite losses" in errors[0] and "stopped at step 7" in errors[0]  # steps 3..7 poisoned


# ---------------------------------------------------------------------------------------------
# Bad CLI input: one line, exit code 2, the key or path named
# ---------------------------------------------------------------------------------------------
DECODER = ["fit", "--config", str(ROOT / "experiments/decoder/tiny.yaml")]


def bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    (tmp / "bad_key.yaml").write_text("model:\n  init_args:\n    bogus_key: 3\n")
    (tmp / "bad_trainer_key.yaml").write_text("trainer:\n  max_stepz: 3\n")
    (tmp / "bad_type.yaml").write_text("trainer:\n  max_steps: lots\n")
    (tmp / "bad_syntax.yaml").write_text("model: [unclosed\n")
    # A real shard, so cases that must get past the data checks do not depend on data/shapes/.
    write_tar(tmp / "ok-000000.tar", sample_members("000000000", np.full((16, 16, 3), 200, np.uint8), "a red circle"))
    data = [f"--data.train_shards={tmp}/ok-000000.tar", "--data.val_shards=null"]
    return [
        (["fitt"], "unknown command 'fitt'"),
        ([*DECODER, *data, "--bogus_flag"], "unrecognized arguments: --bogus_flag"),
        ([*DECODER, *data, "--model.unet.bogus=3"], "model.unet.bogus: unknown option"),
        ([*DECODER, *data, "--config", str(tmp / "bad_key.yaml")], "model.bogus_key: unknown option"),
        ([*DECODER, *data, "--config", str(tmp / "bad_trainer_key.yaml")], "trainer.max_stepz: unknown option"),
        ([*DECODER, *data, "--trainer.max_steps=abc"], "trainer.max_steps: expected int, got 'abc'"),
        ([*DECODER, *data, "--model.unet.channel_mult=[1,x]"], "model.unet.channel_mult: expected int, got 'x'"),
        ([*DECODER, *data, "--model.drop_text_prob=high"], "model.drop_text_prob: expected float, got 'high'"),
        ([*DECODER, *data, "--model.diffusion.timestep_sampling=weighted"],
         "model.diffusion.timestep_sampling: expected one of UNIFORM, WEIGHTED, got 'weighted'"),
        ([*DECODER, *data, "--config", str(tmp / "bad_type.yaml")], "trainer.max_steps: expected int, got 'lots'"),
        ([*DECODER, *data, "--config", str(tmp / "bad_syntax.yaml")], "bad_syntax.yaml: not valid YAML at line"),
        (["fit", "--config", str(tmp / "missing.yaml")], f"--config {tmp / 'missing.yaml'}: file not found"),
        ([*DECODER, *data, "--model", "modules.nothere.Model"], "cannot import 'modules.nothere.Model'"),
        ([*DECODER, *data, "--model.clip_model=no-such-clip"], "model (modules.stages.decoder.DecoderModule): unknown CLIP model 'no-such-clip'"),
        ([*DECODER, *data, "--trainer.devices=-5"], "trainer: `devices`"),
        ([*DECODER, *data, f"--data.train_shards={tmp}/none-{{000..009}}.tar"], "data.train_shards: no shard file matches"),
        ([*DECODER, *data, f"--model.clip_weights={tmp}/clip-stage/last.ckpt"], f"model.clip_weights: file not found: {tmp}/clip-stage/last.ckpt"),
        ([*DECODER, *data, f"--ckpt_path={tmp}/gone.ckpt"], f"ckpt_path: file not found: {tmp}/gone.ckpt"),
        (["pipeline", "--clip-model", "tiny-vit", "--decoder", f"{tmp}/decoder.ckpt", "--out", str(tmp / "p")],
         f"decoder checkpoint not found: {tmp}/decoder.ckpt"),
    ]


def test_every_bad_input_is_one_line_naming_the_key_or_path(tmp_path: Path, capsys):
    for argv, expected in bad_inputs(tmp_path):
        code = cli.main(argv)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("unclip")]
        assert code == 2, (argv, err[-2000:])
        assert len(lines) == 1 and "Traceback" not in err, (argv, err[-2000:])
        assert expected in lines[0], (expected, lines[0])


def test_summarize_error_keeps_the_deepest_reason():
    nested = (
        'Parser key "model":\n  Does not validate against any of the Union subtypes\n  Errors:\n'
        "    - Problem with given class_path 'm.M':\n        Parser key \"unet\":\n          Errors:\n"
        "            - Problem with given class_path 'm.C':\n                Option 'bogus' is not accepted\n"
        "            - Expected a <class 'NoneType'>\n    - Expected a <class 'NoneType'>"
    )
    assert summarize_error(nested) == "model.unet.bogus: unknown option"
    assert summarize_error("unrecognized arguments: fit --x 1") == "unrecognized arguments: --x 1"
