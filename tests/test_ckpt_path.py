"""`--ckpt_path FILE` for every stage: fit a few steps, then `validate` / `fit` with the checkpoint
file rebuild the model from its hyperparameters (the YAML may differ) and load its weights; a
checkpoint of another stage, or of a class outside the project, is refused with one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modules.cli.main import main
from tests.ddp_probe import stage_args, write_probe_data

STAGES = ("clip", "prior", "ar_prior", "decoder", "superres")
QUIET = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.max_time=null", "--trainer.limit_val_batches=1",
         "--trainer.num_sanity_val_steps=0", "--trainer.logger=false", "--trainer.callbacks=null",
         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--data.loader.batch_size=8", "--data.loader.num_workers=0"]


@pytest.fixture(scope="module")
def probe_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_probe_data(tmp_path_factory.mktemp("probe"))


def fit_stage(stage: str, data: dict[str, str], root: Path) -> Path:
    from modules.cli.lightning import UnclipCLI

    UnclipCLI(args=["fit", *stage_args(stage, data), *QUIET, "--trainer.max_steps=2", "--trainer.val_check_interval=2",
                    f"--trainer.default_root_dir={root}"])
    return root / "checkpoints" / "last.ckpt"


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_ckpt_path_file_round_trip(stage: str, probe_data: dict[str, str], tmp_path: Path, capsys) -> None:
    from modules.cli.lightning import UnclipCLI

    ckpt = fit_stage(stage, probe_data, tmp_path / stage)
    assert ckpt.is_file()
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    base = [*stage_args(stage, probe_data), *QUIET, f"--trainer.default_root_dir={tmp_path / 'again'}"]
    base += ["--data.val_shards", base[base.index("--data.train_shards") + 1]]
    cli = UnclipCLI(args=["validate", *base, "--ckpt_path", str(ckpt)])
    state = cli.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved["state_dict"].items())
    # fit resumes from the file: the step count continues
    again = UnclipCLI(args=["fit", *base, "--trainer.max_steps=3", "--ckpt_path", str(ckpt)])
    assert again.trainer.global_step == 3
    # a checkpoint of another stage is refused with one line naming the file and both classes
    other = "decoder" if stage != "decoder" else "clip"
    wrong = ["validate", *stage_args(other, probe_data), *QUIET, "--ckpt_path", str(ckpt)]
    assert main(wrong) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(ckpt) in err[0] and "model.class_path" in err[0], err
