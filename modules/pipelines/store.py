"""Pipeline directories: `pipeline.json` (format, version, and per stage its class path, plain
hyperparameters and weight file) plus one `.safetensors` per stage. No pickle anywhere; only the
project's stage classes (`modules.stages.registry`) may be named; written atomically.

Shared by `UnCLIPPipeline` and `ImagenPipeline`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from safetensors.torch import load_file, save_file
from torch import nn

from modules.core.errors import CheckpointReadError, PipelineError
from modules.core.safe_load import read_lightning_checkpoint
from modules.stages.registry import StageKind, init_kwargs, stage_class


def class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def load_stage_checkpoint(kind: StageKind | str, path: str | Path, class_path: str) -> nn.Module:
    """A stage module from a Lightning checkpoint, loaded with `weights_only=True` (EMA weights
    when the run used `EMAWeightAveraging`, which stores the average as `state_dict`)."""
    kind = StageKind(kind)
    try:
        ckpt = read_lightning_checkpoint(path, f"{kind.value} checkpoint")
    except CheckpointReadError as exc:
        raise PipelineError(str(exc)) from None
    module = stage_class(kind, class_path, str(path), PipelineError)(**init_kwargs(ckpt.get("hyper_parameters", {})))
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()


@contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Yield a fresh folder beside `directory`; when the block succeeds it replaces `directory`
    with `os.replace`, so readers see the old or the new pipeline, never half of one."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)


def save_stage(module: nn.Module, directory: Path, name: str) -> dict[str, Any]:
    """Write `name.safetensors`; returns the stage's `pipeline.json` entry."""
    save_weights(module, directory / f"{name}.safetensors")
    return {"class_path": class_path(module), "hparams": init_kwargs(dict(module.hparams)), "weights": f"{name}.safetensors"}


def read_spec(directory: Path, fmt: str, version: int, required: tuple[str, ...]) -> tuple[dict[str, Any], Path]:
    """`pipeline.json` of `directory`, checked for format, version and required fields."""
    spec_path = directory / "pipeline.json"
    if not spec_path.is_file():
        raise PipelineError(f"not a pipeline directory (no pipeline.json): {directory}")
    try:
        spec = json.loads(spec_path.read_text())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{spec_path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if spec.get("format") != fmt or spec.get("version") != version:
        raise PipelineError(f"{spec_path}: field 'format'/'version' is {spec.get('format')!r}/{spec.get('version')!r}, expected {fmt!r}/{version}")
    for key in required:
        if key not in spec:
            raise PipelineError(f"{spec_path}: missing field {key!r}")
    return spec, spec_path


def load_stage(kind: StageKind | str, entry: dict[str, Any], directory: Path, spec_path: Path) -> nn.Module:
    """An allow-listed stage class built from its plain hparams, weights from safetensors."""
    kind = StageKind(kind)
    module = stage_class(kind, entry["class_path"], str(spec_path), PipelineError)(**init_kwargs(entry["hparams"]))
    weights = directory / entry["weights"]
    if not weights.is_file():
        raise PipelineError(f"{spec_path}: weights file {entry['weights']!r} is missing")
    module.load_state_dict(load_file(str(weights)))
    return module


def save_weights(module: nn.Module, path: Path) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(path))
