"""One typed config per stage, shared by Python, YAML (``--config``) and CLI flags.

Precedence: dataclass defaults < YAML file < explicitly given CLI flags.  Unknown YAML keys are
an error (a typo must not silently fall back to a default), at every level: a field whose type is
a dataclass (``TrainConfig.model``, ``ServeConfig.image_encoder``, a workflow's stage sections) is
a nested mapping, built by the same rules.  The flags themselves come from the same fields
(:mod:`align_ray.cli_args`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

import yaml

from align_ray import storage

T = TypeVar("T")


def _coerce(value: Any, tp: Any, source: str = "config") -> Any:
    """Best-effort conversion of YAML scalars/lists to the annotated field type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        return None
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], source) if len(inner) == 1 else value
    if origin in (list, tuple):
        seq = value if isinstance(value, (list, tuple)) else [value]
        item = args[0] if args else Any
        out = [_coerce(v, item, source) for v in seq]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        return dict(value)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{source}: expected a mapping, got {type(value).__name__}")
        return _nested(tp, value, source)
    if tp in (int, float, str) and not isinstance(value, bool):
        # a typo'd value names its key, not just Python's "invalid literal for int()"; a float
        # where an int belongs (steps: 2.5) is refused rather than cut to 2
        if isinstance(value, (dict, list)) or (
                tp is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{source}: expected {tp.__name__}, got {value!r}")
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: expected {tp.__name__}, got {value!r}") from None
    if tp is bool and isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return value


def _nested(tp: type, value: dict[str, Any], source: str) -> Any:
    """A nested dataclass from a mapping.  ``preset: NAME`` (optional) starts from the class's
    classmethod ``NAME(**rest)`` (e.g. ``ModelConfig.tiny``); otherwise from the field defaults."""
    data = dict(value)
    preset = data.pop("preset", None)
    if preset is None:
        return from_dict(tp, data, source=source)
    factory = getattr(tp, str(preset), None)
    if not callable(factory) or str(preset).startswith("_"):
        raise ValueError(f"{source}: unknown {tp.__name__} preset {preset!r}")
    return factory(**_typed(tp, data, source))


def check_mappings(cls: type, data: dict[str, Any], source: str = "config") -> None:
    """ValueError where a field whose type is a dataclass (a section) holds something other
    than a mapping, at any depth: for code that reads the sections as dicts before
    :func:`from_dict` builds them (the workflow chains their locations first)."""
    hints = typing.get_type_hints(cls)
    for k, v in data.items():
        tp = hints.get(k)
        if v is None or not (dataclasses.is_dataclass(tp) and isinstance(tp, type)):
            continue
        if not isinstance(v, dict):
            raise ValueError(f"{source}.{k}: expected a mapping, got {type(v).__name__}")
        check_mappings(tp, v, f"{source}.{k}")


def from_dict(cls: type[T], data: dict[str, Any], *, source: str = "config") -> T:
    """Build ``cls`` from a mapping, rejecting unknown keys with a clear message."""
    return cls(**_typed(cls, data, source))


def _typed(cls: type, data: dict[str, Any], source: str) -> dict[str, Any]:
    """``data`` coerced to ``cls``'s field types; unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    return {k: _coerce(v, hints[k], f"{source}.{k}") for k, v in data.items()}


def load(cls: type[T], yaml_path: str | None = None, **overrides: Any) -> T:
    """Defaults < YAML < overrides (overrides whose value is None are ignored)."""
    data: dict[str, Any] = {}
    if yaml_path:
        text = storage.read_text(yaml_path)   # a local path or an s3:// URI
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{yaml_path}: expected a mapping of option: value")
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(cls, data, source=yaml_path or "config")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
