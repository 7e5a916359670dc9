"""LightningCLI for every stage: YAML experiments with `class_path` / `init_args`.

Besides LightningCLI's own behaviour, `UnclipCLI`:
- reports configuration mistakes as `ConfigError` with one line naming the key (`summarize_error`
  condenses jsonargparse's nested union messages; `unclip` prints it, exit code 2);
- checks, before building anything, that every file an experiment names (upstream checkpoints,
  weights, `--ckpt_path`) exists;
- makes every trainer crash-safe: `AtomicCheckpointIO` replaces the default checkpoint writer, and
  `NonFiniteGuard`, `DataHealth`, `PreemptionCheckpoint` and `RNGState` are added unless the
  config already has one of the same class (then the configured one is used);
- trains a bf16 precision as `32-true` on a CPU without native bf16 (`precision_fallback`; one
  line says so), where bf16 would run an order of magnitude slower or not at all.
"""

from __future__ import annotations

import argparse
import os
import re
import traceback
from pathlib import Path
from typing import Any, Iterator, Optional

import lightning.pytorch as pl
import torch
import yaml
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks.weight_averaging import WeightAveraging
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from modules.core.errors import ConfigError, UserError
from modules.core.hardware import native_bf16, say_bf16_runs_in_fp32
from modules.core.safe_load import safe_torch_load
from modules.stages.registry import canonical_class_path, stage_kind

# Config keys whose string value names a file that must exist (`clip_weights`, `pretrained`,
# `inception_weights`, `ckpt_path`, ...). Lightning's special checkpoint names are exempt.
PATH_KEY = re.compile(r"(^|_)(weights|pretrained|checkpoint|ckpt|ckpt_path)$")
SPECIAL_CHECKPOINTS = ("last", "best", "hpc")
SHARDED_PARAMETER_STRATEGIES = ("FSDPStrategy", "ModelParallelStrategy")
DEBUG_ENV = "UNCLIP_DEBUG"  # set to 1 for full tracebacks of configuration errors


# ---------------------------------------------------------------------------------------------
# One-line errors
# ---------------------------------------------------------------------------------------------
_REASONS: list[tuple[re.Pattern[str], Any]] = [
    (re.compile(r"Option '([^']+)' is not accepted"), lambda m: (m[1], "unknown option")),
    (re.compile(r"Group '([^']+)' does not accept option '([^']+)'"), lambda m: (f"{m[1]}.{m[2]}", "unknown option")),
    (re.compile(r"Subcommand '[^']+' does not accept option '([^']+)'"), lambda m: (m[1], "unknown option")),
    (re.compile(r"Expected a <class '([^']+)'>\. Got value: (.*)"), lambda m: ("", f"expected {m[1]}, got {m[2].strip()!r}")),
    (re.compile(r"Expected a member of <enum '[^']+'>: \{([^}]*)\}\. Got value: (.*)"),
     lambda m: ("", f"expected one of {', '.join(m[1].split(','))}, got {m[2].strip()!r}")),
    (re.compile(r"File does not exist: '?([^']*)'?"), lambda m: ("", f"file not found: {m[1]}")),
    (re.compile(r"(\S+) either not accessible or invalid"), lambda m: ("", f"cannot import {m[1]!r}")),
]
_KEY = re.compile(r'Parser key "([^"]+)"')

# Keys that moved: an old YAML or command line gets one line naming the new key.
LOADER_KEYS = ("batch_size", "val_batch_size", "num_workers", "pin_memory", "persistent_workers", "prefetch_factor",
               "multiprocessing_context")
MOVED_KEYS = {f"data.{k}": f"data.loader.{k}" for k in LOADER_KEYS}


def check_config_files(argv: list[str]) -> None:
    """Each `--config FILE` is read before LightningCLI sees it: a missing file, bytes that are not
    UTF-8, YAML that does not parse or is not a mapping of keys give one line naming the file."""
    paths = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in ("--config", "-c")]
    paths += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
    for path in paths:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"--config {path}: file not found")
        try:
            text = file.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"--config {path}: not UTF-8 text (byte {exc.start})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"--config {path}: not valid YAML{where}") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"--config {path}: expected a mapping of keys (trainer:, model:, data:), got a {type(data).__name__}")


def moved_hint(summary: str) -> str:
    """`summary` with the new name of a key or stage class path that moved, if it names one."""
    from modules.stages.registry import MOVED_CLASS_PATHS

    key = summary.split(":", 1)[0]
    if key in MOVED_KEYS and "unknown option" in summary:
        return f"{key}: moved to {MOVED_KEYS[key]} (DataModules take a nested `loader:` block)"
    for old, new in MOVED_CLASS_PATHS.items():
        if old in summary:
            return f"model.class_path: {old} moved to {new}"
    return summary


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" -"))


def summarize_error(message: str) -> str:
    """jsonargparse's (often nested, multi-line) error -> `key.path: reason` on one line."""
    lines = [line for line in message.splitlines() if line.strip()]
    if not lines:
        return "invalid configuration"
    if lines[0].startswith("unrecognized arguments:"):
        args = lines[0].split(":", 1)[1].split()
        args = [a for a in args if a not in ("fit", "validate", "test", "predict")]
        return f"unrecognized arguments: {' '.join(args)}" if args else "unrecognized option in the config file"
    if lines[0].startswith("Problems parsing config"):
        return "cannot parse config: " + " ".join(line.strip() for line in lines[1:4])
    stack: list[tuple[int, str]] = []
    best: tuple[int, str, str] | None = None  # (indent, key, reason)
    for line in lines:
        indent = _indent(line)
        stack = [(i, k) for i, k in stack if i < indent]
        key = _KEY.search(line)
        if key:
            stack.append((indent, key[1]))
            rest = line[key.end():].strip(" :")
            if not rest:
                continue
            line = rest
        if "<class 'NoneType'>" in line:
            continue
        for pattern, build in _REASONS:
            match = pattern.search(line)
            if match:
                leaf, reason = build(match)
                path = ".".join([k for _, k in stack] + ([leaf] if leaf else []))
                if best is None or indent >= best[0]:
                    best = (indent, path, reason)
                break
    if best is not None:
        return f"{best[1]}: {best[2]}" if best[1] else best[2]
    # A Union of subtypes nests the real reason (e.g. a config dataclass's own range check,
    # "unet.image_size: 0 is not a number in [1, 4096]") under "Does not validate ..." lines: take
    # the deepest one that is a reason.
    errors = [(_indent(line), line.strip(" -")) for line in lines if line.lstrip().startswith("- ") and "NoneType" not in line]
    reasons = [(i, text) for i, text in errors if not text.startswith("Does not validate")]
    if reasons:
        deepest = max(i for i, _ in reasons)
        return next(text for i, text in reasons if i == deepest)
    return errors[0][1] if errors else lines[0].strip()


def _class_path_in(message: str) -> str | None:
    match = re.search(r"class_path='([^']+)'", message)
    return match[1] if match else None


def instantiation_error(exc: BaseException, sections: dict[str, str]) -> ConfigError:
    """An exception raised while building the model / data / trainer from the config;
    `sections` maps class paths to their config section (`model`, `data`)."""
    text = str(exc)
    frames = traceback.extract_tb(exc.__traceback__)
    if any(f.filename.endswith(os.path.join("trainer", "trainer.py")) for f in frames):
        where = "trainer"
    else:
        class_path = _class_path_in(text)
        where = f"{sections[class_path]} ({class_path})" if class_path in sections else class_path or "config"
    return ConfigError(moved_hint(f"{where}: {summarize_error(text)}"))


# ---------------------------------------------------------------------------------------------
# Files named by the config
# ---------------------------------------------------------------------------------------------
def named_paths(value: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, path) for every string under a PATH_KEY-named key (`init_args` elided)."""
    if isinstance(value, dict):
        for k, v in value.items():
            child = key if k == "init_args" else (f"{key}.{k}" if key else str(k))
            if k != "init_args" and PATH_KEY.search(str(k)) and isinstance(v, str):
                yield child, v
            else:
                yield from named_paths(v, child)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from named_paths(v, f"{key}[{i}]")


def check_named_files(config: dict[str, Any]) -> None:
    """Raise `ConfigError` naming the first key whose file (or shard pattern) does not exist."""
    from datamodules.shards import ShardPatternError, expand_shards

    data = (config.get("data") or {}).get("init_args") or {}
    for key, value in data.items():
        if key.endswith("shards") and value:
            try:
                expand_shards(value, allow_pipe=bool(data.get("allow_pipe", False)))
            except ShardPatternError as exc:
                raise ConfigError(f"data.{key}: {exc}") from None
    for key, path in named_paths(config):
        if not path or path in SPECIAL_CHECKPOINTS or "://" in path:
            continue
        if not os.path.exists(os.path.expanduser(path)):
            hint = " (an upstream stage's checkpoint? train that stage first, or set it to null)" if key != "ckpt_path" else ""
            raise ConfigError(f"{key}: file not found: {path}{hint}")


# ---------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------
def run_name(root_dir: str) -> str:
    """A run's name from its folder: `runs/demo/decoder` -> `demo-decoder`."""
    parts = [p for p in os.path.normpath(root_dir).split(os.sep) if p not in ("", ".", "runs")]
    return "-".join(parts) or "run"


def add_run_defaults(trainer: pl.Trainer, logger_configured: bool, checkpoint_configured: bool, stage: str | None,
                     job_type: str | None = None) -> None:
    """What every run wants, so an experiment YAML states only what differs (one place):
    a W&B logger (offline unless `WANDB_MODE=online`) in `default_root_dir` when the config names
    no logger; `ModelCheckpoint` (`last.ckpt` in `<default_root_dir>/checkpoints`, every
    `val_check_interval` steps) and `SaveOnTrainEnd` (the final step is always saved) unless the
    config has a checkpoint callback; a `LearningRateMonitor` when something logs."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
    from lightning.pytorch.loggers import WandbLogger

    from callbacks.final_checkpoint import SaveOnTrainEnd
    from callbacks.progress import StepBudgetProgressBar

    root = trainer.default_root_dir
    if not logger_configured:
        offline = os.environ.get("WANDB_MODE", "offline") != "online"
        trainer.loggers = [WandbLogger(project="unclip-lightning", name=run_name(root), group=stage, job_type=job_type,
                                       save_dir=root, offline=offline)]
    callbacks = trainer.callbacks
    if not checkpoint_configured and trainer.checkpoint_callback is not None:  # replace Lightning's default one
        every = trainer.val_check_interval if isinstance(trainer.val_check_interval, int) else None
        callbacks[:] = [cb for cb in callbacks if not isinstance(cb, ModelCheckpoint)]
        callbacks.append(ModelCheckpoint(dirpath=os.path.join(root, "checkpoints"), save_last=True, every_n_train_steps=every))
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.dirpath and not any(isinstance(cb, SaveOnTrainEnd) for cb in callbacks):
        callbacks.append(SaveOnTrainEnd(checkpoint.dirpath))
    if trainer.loggers and not any(isinstance(cb, LearningRateMonitor) for cb in callbacks):
        callbacks.insert(0, LearningRateMonitor(logging_interval="step"))
    for i, cb in enumerate(callbacks):  # Lightning's default bar titles a step budget "Epoch 1/-2"
        if type(cb) is RichProgressBar:
            callbacks[i] = StepBudgetProgressBar()


def add_reliability(trainer: pl.Trainer) -> None:
    """Atomic checkpoint writes and the reliability callbacks, unless configured otherwise."""
    from callbacks.checkpointing import AtomicCheckpointIO, RNGState
    from callbacks.reliability import DataHealth, NonFiniteGuard, PreemptionCheckpoint

    strategy = type(trainer.strategy).__name__
    if strategy in SHARDED_PARAMETER_STRATEGIES and any(isinstance(cb, WeightAveraging) for cb in trainer.callbacks):
        raise ConfigError(
            f"trainer.strategy: {strategy} shards parameters, which EMAWeightAveraging cannot average; use DDP or "
            "deepspeed_stage_2 (experiments/common/deepspeed.yaml), or drop the EMA callback (experiments/common/fsdp.yaml)"
        )
    if "DeepSpeed" not in strategy and type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    callbacks = trainer.callbacks
    if not any(isinstance(cb, RNGState) for cb in callbacks):
        callbacks.insert(0, RNGState())  # first: every other callback's batch hooks see the step's draws
    first_checkpoint = next((i for i, cb in enumerate(callbacks) if isinstance(cb, pl.callbacks.Checkpoint)), len(callbacks))
    for cls in (NonFiniteGuard, DataHealth, PreemptionCheckpoint):
        if not any(isinstance(cb, cls) for cb in callbacks):
            callbacks.insert(first_checkpoint, cls())
            first_checkpoint += 1


def precision_fallback(trainer: dict[str, Any]) -> str | None:
    """The precision a bf16 trainer runs in on a CPU without native bf16 (`modules.core.hardware`):
    ``"32-true"`` there, None (keep the configured one) everywhere else: other precisions, GPUs, and
    CPUs with native bf16."""
    precision = str(trainer.get("precision"))
    if not precision.startswith("bf16"):
        return None
    accelerator = str(trainer.get("accelerator") or "auto")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()
                                      and not torch.backends.mps.is_available())
    return "32-true" if on_cpu and not native_bf16("cpu") else None


class UnclipCLI(LightningCLI):
    """`unclip fit|validate|test|predict --config experiments/<stage>/<name>.yaml`.

    Any LightningModule / LightningDataModule subclass is accepted by class path; the resolved
    config is saved next to the logs (`config.yaml`) so a run records its lineage.
    """

    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        os.environ.setdefault("WANDB_MODE", "offline")  # never needs a network unless asked
        super().__init__(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            **kwargs,
        )

    def _parse_ckpt_path(self) -> None:
        """`--ckpt_path FILE`: the model is rebuilt from the checkpoint's hyperparameters, for every
        stage. The file is read with `torch.load(weights_only=True)` (a refused or unreadable one is
        one line naming it); its `_class_path` (or, without one, the config's model) must be one of
        the project's stage classes and the class the config names; the hyperparameters become the
        model's `init_args`, validated against its signature like the YAML's."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        path = config.get("ckpt_path")
        if not path or not os.path.isfile(path):
            return
        ckpt = safe_torch_load(path)  # CheckpointReadError / UnsafeCheckpointError name the file
        hparams = dict(ckpt.get("hyper_parameters") or {}) if isinstance(ckpt, dict) else {}
        hparams.pop("_instantiator", None)
        stored = hparams.pop("_class_path", None)
        if not hparams and stored is None:
            return
        configured = str((config.get("model") or {}).get("class_path") or "")
        class_path = canonical_class_path(str(stored or configured))
        if stage_kind(class_path) is None:
            raise ConfigError(f"ckpt_path: {path} holds {class_path or 'no class'}, which is not one of the project's stages")
        if configured and canonical_class_path(configured) != class_path:
            raise ConfigError(f"ckpt_path: {path} is a {class_path} checkpoint but model.class_path is {configured}")
        override = {subcommand: {"model": {"class_path": class_path, "init_args": hparams}}}
        try:
            self.config = self.parser.parse_object(override, self.config)
        except (argparse.ArgumentError, SystemExit) as exc:
            raise ConfigError(f"ckpt_path: {path}: hyperparameters do not fit {class_path}: {summarize_error(str(exc))}") from None

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand is not None else self.config
        if config.get("torch_threads"):
            torch.set_num_threads(config["torch_threads"])
        fallback = precision_fallback(config["trainer"])
        if fallback is not None:
            say_bf16_runs_in_fp32(f"trainer.precision {config['trainer']['precision']}")
            config["trainer"]["precision"] = fallback
        if self.subcommand is not None:  # a real run (not `run=False` introspection)
            check_named_files(config.as_dict())

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, ImportError, KeyError) as exc:
            if os.environ.get(DEBUG_ENV) == "1" or isinstance(exc, UserError):
                raise
            config = self.config[self.subcommand] if self.subcommand else self.config
            sections = {str(config[k]["class_path"]): k for k in ("model", "data") if config.get(k)}
            raise instantiation_error(exc, sections) from exc

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--torch_threads", type=Optional[int], default=None,
            help="intra-op threads of the training process (data workers use 1 each); oversubscribing "
            "a small machine slows training several-fold",
        )

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        config = self.config[self.subcommand] if self.subcommand else self.config
        kind = stage_kind(str((config.get("model") or {}).get("class_path", "")))
        callbacks = config["trainer"].get("callbacks") or []
        has_checkpoint = any("ModelCheckpoint" in str(cb.get("class_path", "")) for cb in callbacks)
        add_run_defaults(trainer, config["trainer"].get("logger") is not None, has_checkpoint, kind.value if kind else None,
                         self.subcommand)
        add_reliability(trainer)
        return trainer


def parse_error(exc: argparse.ArgumentError) -> ConfigError:
    return ConfigError(moved_hint(summarize_error(str(exc))))
