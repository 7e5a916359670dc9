"""The demo's stage configs compose: every `experiments/demo/*.yaml` overlay parses on top of its
tiny YAML with `unclip fit`'s own parser, its model builds, everything it writes
stays under its run root, and every training budget is a step count."""

from __future__ import annotations

from pathlib import Path

import pytest

from modules.cli.demo import Demo
from tests.test_paper_configs import parse

ROOT = Path(__file__).resolve().parents[1]
# (base YAML, demo overlay, run root)
STAGES = {
    "clip": ("experiments/clip/tiny.yaml", "experiments/demo/clip.yaml", "runs/demo/clip"),
    "prior": ("experiments/prior/tiny.yaml", "experiments/demo/prior.yaml", "runs/demo/prior"),
    "layout": ("experiments/layout/tiny.yaml", "experiments/demo/layout.yaml", "runs/demo/layout"),
    "decoder": ("experiments/decoder/tiny.yaml", "experiments/demo/decoder.yaml", "runs/demo/decoder"),
    "superres": ("experiments/superres/tiny.yaml", "experiments/demo/superres.yaml", "runs/demo/superres"),
}
IMAGEN = {
    "imagen_base": ("experiments/imagen/tiny_base.yaml", "experiments/demo/imagen_base.yaml", "runs/imagen-demo/base"),
    "imagen_superres": ("experiments/imagen/tiny_sr.yaml", "experiments/demo/imagen_superres.yaml", "runs/imagen-demo/superres"),
}


def paths(trainer) -> list[str]:
    """Every directory the trainer's configured callbacks write to (the CLI's default logger and
    checkpoints write under `default_root_dir`: `test_run_defaults_land_under_the_run_root`)."""
    found = [trainer.default_root_dir]
    for cb in trainer.callbacks or []:
        dirpath = (cb.get("init_args") or {}).get("dirpath")
        if dirpath:
            found.append(dirpath)
    return [str(p) for p in found]


@pytest.mark.parametrize("name", list(STAGES) + list(IMAGEN))
def test_demo_overlay_composes_and_writes_under_its_root(name: str) -> None:
    base, overlay, root = {**STAGES, **IMAGEN}[name]
    cli = parse(base, overlay)
    trainer, data = cli.config.trainer, cli.config.data.init_args
    assert trainer.enable_progress_bar and trainer.logger is None  # the CLI's default: offline W&B in the run root
    assert all(p.startswith(root) for p in paths(trainer)), paths(trainer)
    assert str(data.train_shards).startswith("runs/demo/data/")
    model = cli.parser.instantiate_classes(cli.config)["model"]  # tiny: built for real, no weights read yet
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


def test_every_stage_is_budgeted_in_steps_not_wall_time() -> None:
    """Same seed, same machine and torch build -> same weights: no stage may stop on `max_time`,
    and the last step is a validation and checkpoint step."""
    for base, overlay, _ in {**STAGES, **IMAGEN}.values():
        trainer = parse(base, overlay).config.trainer
        assert trainer.max_time is None and trainer.max_steps > 0, overlay
        assert trainer.max_steps % trainer.val_check_interval == 0, overlay
    steps = [s.name for s in Demo(Path("runs/demo"), 10, 10).steps()]
    assert steps == ["data", "clip", "embed", "prior", "layout", "decoder", "superres", "pipeline", "generate", "evaluate",
                     "manipulate"]


def test_imagen_comparison_budget_equals_the_unclip_generative_budget() -> None:
    """Equal step budgets (issue 11): the Imagen base = the unCLIP decoder (same U-Net, batch and
    shards, so equal compute per step), its upsampler = the unCLIP upsampler."""
    configs = {k: parse(b, o).config for k, (b, o, _) in {**STAGES, **IMAGEN}.items()}
    for imagen, unclip in (("imagen_base", "decoder"), ("imagen_superres", "superres")):
        ours, theirs = configs[imagen], configs[unclip]
        assert ours.trainer.max_steps == theirs.trainer.max_steps and ours.trainer.precision == theirs.trainer.precision
        assert ours.model.init_args.optimizer.decay_steps == theirs.model.init_args.optimizer.decay_steps
        assert ours.model.init_args.sampling.precision == theirs.model.init_args.sampling.precision
    base, decoder = configs["imagen_base"].model.init_args, configs["decoder"].model.init_args
    for key in ("image_size", "model_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "num_groups",
                "channels_last", "conv_before_upsample"):  # the same U-Net body and kernels per step
        assert base.unet[key] == decoder.unet[key], key


@pytest.mark.parametrize("stage", list(STAGES))
def test_another_output_root_moves_every_path_a_fit_reads_or_writes(tmp_path: Path, stage: str) -> None:
    """`unclip demo --out DIR` (ablations): each fit's root, shards (the prior's are the exported
    embeddings) and CLIP weights all resolve under DIR, none under runs/demo."""
    from tests.test_paper_configs import ParseOnlyCLI

    out = tmp_path / "ablation"
    args = Demo(out, 10, 10).fit_args(stage)[1:]
    args = [str(ROOT / a) if a.startswith("experiments/") else a for a in args]
    config = ParseOnlyCLI(args=args, run=False).config
    data, model = config.data.init_args, config.model.init_args
    found = {"default_root_dir": config.trainer.default_root_dir, "train_shards": data.train_shards,
             "val_shards": data.val_shards, "clip_weights": model.get("clip_weights")}
    found = {k: str(v) for k, v in found.items() if v is not None}
    assert all(v.startswith(str(out)) for v in found.values()), found
    assert ("clip_weights" in found) == (stage in ("prior", "layout", "decoder"))


def test_run_defaults_land_under_the_run_root(tmp_path: Path) -> None:
    """A config without logger or checkpoint callbacks gets them from the CLI, all under its root."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import WandbLogger

    from callbacks.final_checkpoint import SaveOnTrainEnd
    from modules.cli.lightning import add_run_defaults

    root = str(tmp_path / "runs" / "demo" / "decoder")
    trainer = pl.Trainer(default_root_dir=root, val_check_interval=50, enable_progress_bar=False)
    add_run_defaults(trainer, logger_configured=False, checkpoint_configured=False, stage="decoder", job_type="fit")
    (logger,) = trainer.loggers
    assert isinstance(logger, WandbLogger) and logger.save_dir == root and logger._offline
    assert logger._wandb_init["group"] == "decoder" and logger._wandb_init["name"].endswith("demo-decoder")
    (checkpoint,) = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    assert checkpoint.dirpath == f"{root}/checkpoints" and checkpoint.save_last and checkpoint._every_n_train_steps == 50
    assert [cb.path for cb in trainer.callbacks if isinstance(cb, SaveOnTrainEnd)] == [Path(root) / "checkpoints/last.ckpt"]
    assert sum(isinstance(cb, LearningRateMonitor) for cb in trainer.callbacks) == 1
    quiet = pl.Trainer(default_root_dir=root, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    add_run_defaults(quiet, logger_configured=True, checkpoint_configured=True, stage=None)
    assert not quiet.loggers and not any(isinstance(cb, (ModelCheckpoint, LearningRateMonitor)) for cb in quiet.callbacks)


def test_two_fits_with_one_seed_give_identical_weights(tmp_path: Path, tiny_shards) -> None:
    """The demo's reproducibility promise at tiny size: two step-budgeted fits of the decoder YAML,
    same seed, loader worker included, end with bit-identical weights (EMA and raw)."""
    import torch
    import yaml

    from modules.cli.lightning import UnclipCLI
    from tests.test_callbacks import shrink_tiny_yaml

    pattern, _ = tiny_shards
    config = yaml.safe_load(shrink_tiny_yaml(tmp_path, pattern).read_text())
    config["trainer"]["callbacks"] = [cb for cb in config["trainer"]["callbacks"] if cb["class_path"].endswith(("EMAWeightAveraging", "WarmupEMA"))]
    config["trainer"].update(logger=False, limit_val_batches=0, num_sanity_val_steps=0, max_steps=6, val_check_interval=3)
    config["data"]["init_args"]["loader"]["num_workers"] = 1
    states = []
    for run in ("a", "b"):
        config["trainer"]["default_root_dir"] = str(tmp_path / run)
        path = tmp_path / f"{run}.yaml"
        path.write_text(yaml.safe_dump(config))
        cli = UnclipCLI(args=["fit", "--config", str(path)])
        assert cli.trainer.global_step == 6
        states.append({k: v.clone() for k, v in cli.model.state_dict().items()})
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in states[0].values())


def test_in_process_commands_are_the_cli_commands() -> None:
    """The demo runs its non-fit steps through the same functions as `unclip COMMAND`."""
    from modules.cli.demo import _in_process_commands
    from modules.cli.main import COMMANDS

    table = _in_process_commands()
    assert table and all(COMMANDS[name] is fn for name, fn in table.items())


def test_a_demo_step_in_process_writes_what_a_new_process_writes(tmp_path: Path) -> None:
    """`generate` run in the demo's process (after other work has moved torch's global RNG) and as
    `python -m modules.cli generate` in a new process write byte-identical images."""
    import subprocess
    import sys

    import torch

    from modules.cli.demo import run_command
    from tests.test_pipeline import _pipeline

    pipe = _pipeline().save(tmp_path / "pipe")
    args = ["generate", "--pipeline", str(pipe), "--prompt", "a red circle", "--prompt", "a blue square to the left of a red circle",
            "--num-images", "2", "--seed", "3", "--decoder-candidates", "2"]
    torch.manual_seed(123)
    torch.rand(7)
    run_command([*args, "--out", str(tmp_path / "here")])
    subprocess.run([sys.executable, "-m", "modules.cli", *args, "--out", str(tmp_path / "there")], check=True, cwd=ROOT)
    names = sorted(p.name for p in (tmp_path / "here").glob("*.png"))
    assert len(names) == 5  # 2 prompts x 2 images + the grid
    assert names == sorted(p.name for p in (tmp_path / "there").glob("*.png"))
    for name in names:
        assert (tmp_path / "here" / name).read_bytes() == (tmp_path / "there" / name).read_bytes(), name


def test_a_failing_in_process_step_is_the_commands_one_line_error(tmp_path: Path) -> None:
    from modules.cli.demo import run_command
    from modules.core.errors import UserError

    with pytest.raises(UserError, match="required: --pipeline, --out"):
        run_command(["generate", "--prompt", "a red circle"])
    with pytest.raises(UserError, match="not a pipeline directory"):
        run_command(["generate", "--pipeline", str(tmp_path), "--prompt", "a red circle", "--out", str(tmp_path / "o")])
