"""Plain-data hyperparameters: checkpoints must load with `torch.load(weights_only=True)`.

Stage modules take typed dataclass configs (nice in YAML and code) but store them in the
checkpoint as plain dicts/strings/numbers; `as_config` turns either form back into the dataclass.
"""

from __future__ import annotations

import dataclasses
import typing
from enum import Enum
from typing import Any, TypeVar

T = TypeVar("T")


def to_plain(value: Any) -> Any:
    """Dataclasses -> dicts, enums -> member names, tuples -> lists, recursively."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def enum_member(enum_cls: type[Enum], value: Any) -> Enum:
    """Accept a member, its name (`COSINE`) or its value (`cosine`)."""
    if isinstance(value, enum_cls):
        return value
    if isinstance(value, str) and value in enum_cls.__members__:
        return enum_cls[value]
    return enum_cls(value)


def coerce_fields(obj: Any) -> None:
    """In a dataclass `__post_init__`: turn enum names/values and lists into the declared types."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), hints.get(f.name)
        if isinstance(hint, type) and issubclass(hint, Enum) and value is not None:
            setattr(obj, f.name, enum_member(hint, value))
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            setattr(obj, f.name, tuple(value))


def check_range(owner: str, name: str, value: Any, low: float, high: float) -> None:
    """Refuse a numeric field outside [low, high] (or not a number) with one line naming it.

    Sizes come from YAML, the command line and untrusted files (pipeline.json, checkpoints):
    bounding them where they enter keeps a typo like image_size 10^6 from allocating terabytes."""
    from modules.core.errors import ConfigError

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigError(f"{owner}.{name}: {value!r} is not a number in [{low}, {high}]")


def check_ranges(owner: str, obj: Any, ranges: dict[str, tuple[float, float]]) -> None:
    """`check_range` for several fields of `obj` (None values are skipped)."""
    for name, (low, high) in ranges.items():
        value = getattr(obj, name)
        if value is not None:
            check_range(owner, name, value, low, high)


def as_config(cls: type[T], value: T | dict | None) -> T:
    """A config dataclass from an instance, a plain dict (e.g. from a checkpoint) or None."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls(**value)
    raise TypeError(f"expected {cls.__name__} or dict, got {type(value).__name__}")


def init_args(frame_locals: dict[str, Any]) -> dict[str, Any]:
    """A constructor's arguments from its `locals()` taken on entry (for plain-data hparams)."""
    return {k: v for k, v in frame_locals.items() if k not in ("self", "__class__")}
