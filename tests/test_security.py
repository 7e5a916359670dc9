"""Loading is safe: a crafted pickle that would run code is refused by every loader path (CLIP
weights, stage checkpoints, pipelines, evaluation, FID weights, `--ckpt_path` resume), and
WebDataset `pipe:` URLs (shell commands) are refused unless the config allows them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from callbacks.checkpointing import AtomicCheckpointIO
from modules.core.errors import UnsafeCheckpointError, UserError
from modules.core.safe_load import safe_torch_load
from datamodules.shards import ShardPatternError, expand_shards
from datamodules.image_text import LoaderConfig
from modules.cli import main as cli
from tests.ddp_probe import write_image_shards

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this runs `exec`, which writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.fixture
def evil(tmp_path: Path) -> tuple[Path, Path]:
    """(a checkpoint-looking file whose unpickling runs code, the marker it would write)."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {}, "payload": Payload(marker)}, path)
    return path, marker


def test_the_payload_is_live_when_loaded_unsafely(evil):
    path, marker = evil
    torch.load(path, weights_only=False)  # what a naive loader would do
    assert marker.read_text() == "pwned"
    marker.unlink()


def test_clip_weight_loaders_refuse_it(evil):
    from modules.stages.clip import CLIPModule
    from modules.networks.clip import FrozenCLIP, read_state_dict

    path, marker = evil
    for load in (lambda: read_state_dict(path), lambda: FrozenCLIP("tiny-vit", str(path)),
                 lambda: CLIPModule(model_name="tiny-vit", pretrained=str(path))):
        with pytest.raises(ValueError, match="refusing to load"):
            load()
    assert not marker.exists()


def test_stage_checkpoint_and_evaluation_loaders_refuse_it(evil):
    from callbacks.feature_extractors import load_inception
    from modules.evaluation.evaluate import load_checkpoint
    from modules.core.errors import PipelineError
    from modules.pipelines.store import load_stage_checkpoint

    path, marker = evil
    with pytest.raises(PipelineError, match="refusing to load"):
        load_stage_checkpoint("decoder", path, "modules.stages.decoder.DecoderModule")
    with pytest.raises(UserError, match="refusing to load"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="weights_only"):
        load_inception(path, "inception_weights")
    with pytest.raises(UnsafeCheckpointError):
        safe_torch_load(path)
    assert not marker.exists()


def test_resume_loaders_refuse_it(evil, tmp_path: Path, capsys):
    path, marker = evil
    with pytest.raises(UnsafeCheckpointError, match="arbitrary pickle"):
        AtomicCheckpointIO().load_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)  # never, even when asked
    shards = write_image_shards(tmp_path / "shards", shards=1, per_shard=4)
    code = cli.main(["fit", "--config", str(ROOT / "experiments/clip/tiny.yaml"), "--data.train_shards", shards,
                     "--data.val_shards=null", "--data.loader.num_workers=0", "--data.loader.batch_size=2", "--data.image_size=32",
                     "--trainer.logger=false", "--trainer.callbacks=null", "--trainer.max_steps=1", "--trainer.max_time=null",
                     f"--trainer.default_root_dir={tmp_path}", "--ckpt_path", str(path)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("unclip fit: error")]
    assert code == 2 and len(errors) == 1 and str(path) in errors[0] and "arbitrary pickle" in errors[0]
    assert not marker.exists()


def test_pipeline_directories_cannot_run_code(evil, tmp_path: Path):
    from modules.core.errors import PipelineError
    from modules.pipelines.unclip import UnCLIPPipeline

    path, marker = evil
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "clip.safetensors").write_bytes(path.read_bytes())  # a pickle under a safetensors name
    (pipe / "pipeline.json").write_text(json.dumps({
        "format": "unclip-pipeline", "version": 1, "clip": {"model_name": "tiny-vit", "weights": "clip.safetensors"},
        "decoder": {"class_path": "modules.stages.decoder.DecoderModule", "hparams": {}, "weights": "decoder.safetensors"},
    }))
    with pytest.raises(Exception, match="deserializing header"):  # safetensors never unpickles
        UnCLIPPipeline.load(pipe)
    spec = json.loads((pipe / "pipeline.json").read_text())
    spec["clip"]["weights"] = "none.safetensors"
    from safetensors.torch import save_file

    from modules.networks.clip import create_clip

    save_file({k: v.contiguous() for k, v in create_clip("tiny-vit").state_dict().items()}, str(pipe / "none.safetensors"))
    spec["decoder"]["class_path"] = "builtins.exec"  # a pipeline file may only name the project's stage classes
    (pipe / "pipeline.json").write_text(json.dumps(spec))
    with pytest.raises(PipelineError, match="not an allowed decoder stage"):
        UnCLIPPipeline.load(pipe)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# pipe: URLs
# ---------------------------------------------------------------------------------------------
def test_pipe_urls_are_refused_unless_allowed(tmp_path: Path):
    from datamodules.embeddings import EmbeddingDataModule
    from datamodules.image_text import ImageTextDataModule

    marker = tmp_path / "RAN"
    url = f"pipe:touch {marker}"
    with pytest.raises(ShardPatternError, match="pipe:"):
        ImageTextDataModule(train_shards=url, tokenizer=None).setup("fit")
    with pytest.raises(ShardPatternError, match="allow_pipe"):
        EmbeddingDataModule(train_shards=url).setup("fit")
    assert not marker.exists()
    shard = write_image_shards(tmp_path / "s", shards=1, per_shard=4).replace("{000000..000000}", "000000")
    dm = ImageTextDataModule(train_shards=f"pipe:cat {shard}", image_size=16, tokenizer=None, allow_pipe=True, shuffle_buffer=0, loader=LoaderConfig(batch_size=2, num_workers=0))
    dm.setup("fit")
    assert sum(len(b["key"]) for b in dm.train_dataloader()) == 4, "allowed explicitly, a pipe: URL works"
    assert expand_shards(["pipe:true"], allow_pipe=True) == ["pipe:true"]


def test_pipe_url_on_the_command_line_is_one_clear_line(tmp_path: Path, capsys):
    marker = tmp_path / "RAN"
    code = cli.main(["fit", "--config", str(ROOT / "experiments/decoder/tiny.yaml"), f"--data.train_shards=pipe:touch {marker}"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("unclip fit: error")]
    assert code == 2 and len(errors) == 1 and "data.train_shards" in errors[0] and "allow_pipe" in errors[0]
    assert not marker.exists()
