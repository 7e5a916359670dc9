"""Logger plumbing: the resolved CLI config saved with the run, and reading offline W&B runs.

- `LoggerSaveConfigCallback` (LightningCLI `save_config_callback=`) writes `config.yaml` to the log
  dir as usual and also stores the resolved config with every logger: the W&B run config (key
  `cli`) plus `config.yaml` among the run's files; TensorBoard/CSV get it as hparams (`cli`).
- `read_offline_run(run_dir)` lists the scalars and images of a `wandb/offline-run-*` directory
  without syncing (W&B's transaction log is a LevelDB-style record log of protobuf `Record`s).
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import lightning.pytorch as pl
import yaml
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger


class LoggerSaveConfigCallback(SaveConfigCallback):
    """SaveConfigCallback that also records the resolved config in the loggers (rank zero)."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        resolved = yaml.safe_load(text)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                run = logger.experiment
                run.config.update({"cli": resolved}, allow_val_change=True)
                Path(run.dir, "config.yaml").write_text(text)  # in the run's files/
            else:
                logger.log_hyperparams({"cli": resolved})


# -- offline W&B runs -------------------------------------------------------------------------
_BLOCK, _HEADER, _FULL, _LAST = 32768, 7, 1, 4


def _records(raw: bytes) -> Iterator[bytes]:
    """Payloads of a W&B `.wandb` log: 7-byte file header, then 32 KiB blocks of records
    (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last)."""
    pos, chunks = _HEADER, b""
    while pos + _HEADER <= len(raw):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + _HEADER])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunks += raw[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind in (_FULL, _LAST):
            yield chunks
            chunks = b""


@dataclass
class OfflineRun:
    """What an offline W&B run directory holds."""

    path: Path
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per logged step
    config: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # project, name, group, job_type, tags
    images: list[Path] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    finished: bool = False  # the exit record is written

    def scalars(self) -> dict[str, list[float]]:
        """Numeric series by key (W&B's own `_step`, `_runtime`, ... left out)."""
        out: dict[str, list[float]] = {}
        for row in self.history:
            for k, v in row.items():
                if not k.startswith("_") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    out.setdefault(k, []).append(float(v))
        return out


def read_offline_run(run_dir: str | Path, wait_s: float = 0.0) -> OfflineRun:
    """Parse `run-*.wandb` of an offline run directory (history rows, config) and list its files.

    W&B's writer process may still be flushing just after `wandb.finish()`: with `wait_s`, re-read
    until the run's exit record is there (or the time is up). A record that does not parse is the
    writer's half-written tail while time is left, and re-read like an unfinished run.
    """
    from google.protobuf.message import DecodeError

    run_dir = Path(run_dir)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            run = _parse_run(run_dir)
        except DecodeError:
            if time.monotonic() >= deadline:
                raise
        else:
            if run.finished or time.monotonic() >= deadline:
                return run
        time.sleep(0.2)


def _parse_run(run_dir: Path) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2

    logs = sorted(run_dir.glob("run-*.wandb"))
    if not logs:
        raise FileNotFoundError(f"no run-*.wandb in {run_dir}")
    run = OfflineRun(run_dir)
    for payload in _records(logs[0].read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "config":
            run.config.update(_items(record.config.update))
        elif kind == "run":
            r = record.run
            run.meta = {"project": r.project, "name": r.display_name, "group": r.run_group, "job_type": r.job_type, "tags": list(r.tags)}
        run.finished = run.finished or kind == "exit"
    run.files = sorted(p for p in (run_dir / "files").rglob("*") if p.is_file())
    run.images = [p for p in run.files if p.suffix.lower() in (".png", ".jpg", ".jpeg")]
    return run


def _items(items: Any) -> dict[str, Any]:
    """{key: value} from W&B items; nested keys (images: ["samples/val", "captions"]) as nested dicts."""
    out: dict[str, Any] = {}
    for item in items:
        path = [item.key] if item.key else list(item.nested_key)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    return out
