"""The demo's stage configs compose: every `experiments/demo/*.yaml` overlay parses on top of its
tiny YAML with `unclip fit`'s own parser, its model builds, everything it writes
stays under its run root, and the training budgets leave room in the 20-minute target."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from modules.demo import Demo
from tests.test_paper_configs import parse

ROOT = Path(__file__).resolve().parents[1]
# (base YAML, demo overlay, run root)
STAGES = {
    "clip": ("experiments/clip/tiny.yaml", "experiments/demo/clip.yaml", "runs/demo/clip"),
    "prior": ("experiments/prior/tiny.yaml", "experiments/demo/prior.yaml", "runs/demo/prior"),
    "decoder": ("experiments/decoder/tiny.yaml", "experiments/demo/decoder.yaml", "runs/demo/decoder"),
    "superres": ("experiments/superres/tiny.yaml", "experiments/demo/superres.yaml", "runs/demo/superres"),
}
IMAGEN = {
    "imagen_base": ("experiments/imagen/tiny_base.yaml", "experiments/demo/imagen_base.yaml", "runs/imagen-demo/base"),
    "imagen_superres": ("experiments/imagen/tiny_sr.yaml", "experiments/demo/imagen_superres.yaml", "runs/imagen-demo/superres"),
}


def budget(trainer) -> timedelta:
    d, h, m, s = (int(x) for x in trainer.max_time.split(":"))
    return timedelta(days=d, hours=h, minutes=m, seconds=s)


def paths(trainer) -> list[str]:
    """Every directory the trainer's logger and callbacks write to."""
    found = [trainer.default_root_dir, trainer.logger.init_args.save_dir]
    for cb in trainer.callbacks:
        dirpath = (cb.get("init_args") or {}).get("dirpath")
        if dirpath:
            found.append(dirpath)
    return [str(p) for p in found]


@pytest.mark.parametrize("name", list(STAGES) + list(IMAGEN))
def test_demo_overlay_composes_and_writes_under_its_root(name: str) -> None:
    base, overlay, root = {**STAGES, **IMAGEN}[name]
    cli = parse(base, overlay)
    trainer, data = cli.config.trainer, cli.config.data.init_args
    assert trainer.enable_progress_bar and trainer.logger.class_path.endswith("WandbLogger") and trainer.logger.init_args.offline
    assert all(p.startswith(root) for p in paths(trainer)), paths(trainer)
    assert str(data.train_shards).startswith("runs/demo/data/")
    assert any(c.class_path.endswith("SaveOnTrainEnd") for c in trainer.callbacks), "a time budget must keep its last step"
    model = cli.parser.instantiate_classes(cli.config)["model"]  # tiny: built for real, no weights read yet
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


def test_training_budgets_leave_a_third_of_the_twenty_minutes_for_the_rest() -> None:
    """Stage start-up, embedding export, generation and evaluation run in the rest of the 20 min."""
    total = sum((budget(parse(base, overlay).config.trainer) for base, overlay, _ in STAGES.values()), timedelta())
    assert total <= timedelta(minutes=14), total
    stages = [s.name for s in Demo(Path("runs/demo"), 10, 10).stages()]
    assert stages == ["data", "clip", "embed", "prior", "decoder", "superres", "pipeline", "generate", "evaluate", "manipulate"]


def test_imagen_comparison_budget_equals_the_unclip_generative_budget() -> None:
    """Equal training budget (issue 11): Imagen base = unCLIP prior + decoder; upsampler = upsampler."""
    t = {k: budget(parse(b, o).config.trainer) for k, (b, o, _) in {**STAGES, **IMAGEN}.items()}
    assert t["imagen_base"] == t["prior"] + t["decoder"] and t["imagen_superres"] == t["superres"]
