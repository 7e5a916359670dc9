"""The project's stage classes by kind: the one allow-list that pipeline folders, checkpoints and
`unclip evaluate` consult, and the class paths that moved when `modules/` became folders by layer.

A pipeline file or checkpoint may name only these classes (it cannot make the loader import
arbitrary code). A class path from before the move is read as its new path, so older pipeline
folders and checkpoints keep loading; a YAML that names one is refused with the new path.
"""

from __future__ import annotations

import importlib
from enum import Enum

from modules.core.errors import UserError


class StageKind(str, Enum):
    """A training stage of the cascade (also the key of its entry in `pipeline.json`)."""

    CLIP = "clip"
    PRIOR = "prior"
    DECODER = "decoder"
    UPSAMPLER = "upsampler"
    LAYOUT = "layout"


STAGE_CLASSES: dict[StageKind, tuple[str, ...]] = {
    StageKind.CLIP: ("modules.stages.clip.CLIPModule",),
    StageKind.PRIOR: ("modules.stages.prior.PriorModule", "modules.stages.ar_prior.ARPriorModule"),
    StageKind.DECODER: ("modules.stages.decoder.DecoderModule",),
    StageKind.UPSAMPLER: ("modules.stages.superres.SuperResModule",),
    StageKind.LAYOUT: ("modules.stages.layout.LayoutModule",),
}

MOVED_CLASS_PATHS: dict[str, str] = {
    "modules.clip_module.CLIPModule": "modules.stages.clip.CLIPModule",
    "modules.prior_module.PriorModule": "modules.stages.prior.PriorModule",
    "modules.ar_prior_module.ARPriorModule": "modules.stages.ar_prior.ARPriorModule",
    "modules.decoder_module.DecoderModule": "modules.stages.decoder.DecoderModule",
    "modules.superres_module.SuperResModule": "modules.stages.superres.SuperResModule",
}


def class_path_of(obj: object) -> str:
    """`module.Class` of an object: stored as `_class_path` in every stage's hyperparameters, so
    `--ckpt_path FILE` and the loaders know which stage a checkpoint holds."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def init_kwargs(hparams: dict) -> dict:
    """A stage's constructor arguments from its stored hyperparameters (`_`-prefixed keys such as
    `_class_path` and Lightning's `_instantiator` are records, not arguments)."""
    return {k: v for k, v in hparams.items() if not str(k).startswith("_")}


def canonical_class_path(class_path: str) -> str:
    """The current path of a stage class (a path from before the move maps to its new one)."""
    return MOVED_CLASS_PATHS.get(class_path, class_path)


def stage_kind(class_path: str) -> StageKind | None:
    """The kind of an allowed stage class path, or None for any other class."""
    path = canonical_class_path(class_path)
    return next((kind for kind, paths in STAGE_CLASSES.items() if path in paths), None)


def stage_class(kind: StageKind, class_path: str, where: str, error: type[UserError] = UserError) -> type:
    """The allowed class `class_path` of `kind`; anything else raises `error` naming `where`."""
    path = canonical_class_path(class_path)
    if path not in STAGE_CLASSES[kind]:
        allowed = ", ".join(STAGE_CLASSES[kind])
        raise error(f"{where}: class {class_path!r} is not an allowed {kind.value} stage ({allowed})")
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)
