"""Typed configs from plain data, one way for every config of the project.

A config arrives as the dataclass itself (Python), as nested dicts (a checkpoint's hyper-parameters, an exported
pipeline's JSON) or as LightningCLI's `{class_path, init_args}` (a preset). `coerce` rebuilds all three, and
`check_choices` gives every `Literal` field the same one-line check whichever way the config was built.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from typing import Any, Literal, TypeVar

T = TypeVar("T")


def coerce(cls: type[T], value: Any) -> T | None:
    """`value` as a `cls`: itself, None, a dict of its fields (nested dataclasses too), or `{class_path,
    init_args}` naming `cls` or a subclass."""
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"expected {cls.__name__} or a dict, got {type(value).__name__}")
    if "class_path" in value:
        module, _, name = value["class_path"].rpartition(".")
        target = getattr(importlib.import_module(module), name)
        if not (isinstance(target, type) and issubclass(target, cls)):
            raise TypeError(f"{value['class_path']} is not a {cls.__name__}")
        return target(**value.get("init_args", {}))
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in value:
            continue
        v, hint = value[f.name], hints[f.name]
        nested = next((t for t in typing.get_args(hint) or (hint,) if dataclasses.is_dataclass(t)), None)
        if nested is not None and isinstance(v, dict):
            v = coerce(nested, v)
        elif typing.get_origin(hint) is tuple and isinstance(v, list):  # JSON and YAML have no tuples
            v = tuple(v)
        kwargs[f.name] = v
    # keys the class no longer has are left out: a checkpoint or export from an older version still loads (the
    # CLI, where a user types the keys, rejects unknown ones through jsonargparse)
    return cls(**kwargs)


def _choices(hint: Any) -> tuple | None:
    """The values a `Literal[...]` or `Literal[...] | None` hint allows (None first), else None."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    args = typing.get_args(hint)
    if type(None) in args and len(args) == 2:
        (other,) = [a for a in args if a is not type(None)]
        if typing.get_origin(other) is Literal:
            return (None, *typing.get_args(other))
    return None


def check_choices(config: Any, prefix: str) -> None:
    """A one-line ValueError for a `Literal` (or optional `Literal`) field of the dataclass `config` holding a value
    it does not allow (jsonargparse checks these for the CLI; this checks them for Python and checkpoint configs as
    well)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        allowed = _choices(hints[f.name])
        value = getattr(config, f.name)
        if allowed is not None and value not in allowed:
            raise ValueError(f"{prefix}.{f.name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
