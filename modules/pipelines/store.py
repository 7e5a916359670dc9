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

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from modules.core.errors import CheckpointReadError, PipelineError, UserError
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
    remove_orphaned_temps(directory)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.{os.getpid()}.", dir=directory.parent))
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


def remove_orphaned_temps(directory: Path) -> None:
    """Remove `.{name}.{pid}.*` temp folders beside `directory` whose writer process is gone (a
    `kill -9` mid-write cannot clean up after itself); a live writer's folder is left alone."""
    for tmp in directory.parent.glob(f".{directory.name}.*.*"):
        pid = tmp.name[len(directory.name) + 2:].split(".", 1)[0]
        if tmp.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        spec = json.loads(spec_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{spec_path}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{spec_path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(spec, dict):
        raise PipelineError(f"{spec_path}: expected a JSON object, got {type(spec).__name__}")
    if spec.get("format") != fmt or spec.get("version") != version:
        raise PipelineError(f"{spec_path}: field 'format'/'version' is {spec.get('format')!r}/{spec.get('version')!r}, expected {fmt!r}/{version}")
    for key in required:
        if key not in spec:
            raise PipelineError(f"{spec_path}: missing field {key!r}")
    return spec, spec_path


def load_stage(kind: StageKind | str, entry: Any, directory: Path, spec_path: Path) -> nn.Module:
    """An allow-listed stage class built from its plain hparams, weights from safetensors.

    `pipeline.json` is untrusted input: the entry's fields are type-checked, the weight file must be
    a relative path that stays inside the folder (no absolute path, no `..`, no symlink out), the
    hparams go through the stage's typed configs (bounded sizes) before anything is allocated, and
    every failure is one `PipelineError` line naming the file and the field."""
    kind = StageKind(kind)
    where = f"{spec_path}: {kind.value}"
    if not isinstance(entry, dict):
        raise PipelineError(f"{where}: expected an object with class_path, hparams, weights; got {type(entry).__name__}")
    for key, typ in (("class_path", str), ("hparams", dict), ("weights", str)):
        if not isinstance(entry.get(key), typ):
            raise PipelineError(f"{where}.{key}: expected a {typ.__name__}, got {type(entry.get(key)).__name__}")
    cls = stage_class(kind, entry["class_path"], str(spec_path), PipelineError)
    weights = contained_file(directory, entry["weights"], f"{where}.weights")
    try:
        module = cls(**init_kwargs(entry["hparams"]))
    except UserError as exc:
        raise PipelineError(f"{where}.hparams: {exc}") from None
    except (TypeError, ValueError, KeyError) as exc:
        raise PipelineError(f"{where}.hparams: {first_line(exc)}") from None
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise PipelineError(f"{where}.weights: {entry['weights']!r} is not a readable safetensors file ({first_line(exc)})") from None
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise PipelineError(f"{where}.weights: {entry['weights']!r} does not fit {entry['class_path']} "
                            f"with these hparams ({first_line(exc, skip_header=True)})") from None
    return module


def contained_file(directory: Path, name: str, where: str) -> Path:
    """`directory / name` for a relative `name` that resolves (symlinks followed) inside `directory`."""
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise PipelineError(f"{where}: {name!r} must be a file name relative to the pipeline folder")
    path = directory / name
    if not path.resolve().is_relative_to(directory.resolve()):
        raise PipelineError(f"{where}: {name!r} leads outside the pipeline folder")
    if not path.is_file():
        raise PipelineError(f"{where}: weights file {name!r} is missing")
    return path


def upsampler_entries(spec: dict[str, Any], spec_path: Path) -> list[Any]:
    """The `upsamplers` list of a pipeline.json (empty when absent)."""
    entries = spec.get("upsamplers", [])
    if not isinstance(entries, list):
        raise PipelineError(f"{spec_path}: upsamplers: expected a list, got {type(entries).__name__}")
    return entries


def first_line(exc: BaseException, skip_header: bool = False) -> str:
    """A one-line reason: torch's multi-line load_state_dict errors give their first detail line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if skip_header and len(lines) > 1:
        lines = lines[1:]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def save_weights(module: nn.Module, path: Path) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(path))
