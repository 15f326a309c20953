"""Settings read from files written elsewhere (checkpoints, model folders, hub repositories) are data, not code.

A training checkpoint stores the run's resolved config, and model folders store a `config.json`; both are
read back to rebuild a model. Handing such a node to Hydra's `instantiate` would run whatever `_target_` the
file names, so nothing read from a file is ever instantiated. Instead it is checked here, field by field,
against the project's own settings dataclasses: only plain values (strings, numbers, booleans, None, lists and
string-keyed mappings of those) of the declared types are accepted, and the builder that consumes them is
fixed in code. Only the user's own command line and config files may name targets.

Refused, with an error naming the place: any Hydra instantiation key (`_target_`, `_partial_`, `_args_`,
`_recursive_`, `_convert_`) at any depth, OmegaConf interpolations (`${...}`: they would read the environment
or other nodes when the settings are later merged into a run config), unknown fields, and values of the wrong
type.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

INSTANTIATE_KEYS = frozenset({"_target_", "_partial_", "_args_", "_recursive_", "_convert_"})
"""Keys through which Hydra's `instantiate` would call code."""

T = TypeVar("T")


class ConfigRefused(ValueError):
    """Settings read from a file that are not plain data of the expected shape."""


def check_plain_data(value: Any, where: str) -> Any:
    """Return `value` unchanged when it is plain data without instantiation keys or interpolations.

    Plain data: None, bool, int, float, str, lists/tuples of plain data, and mappings with string keys of
    plain data. `where` names the value in errors (e.g. `checkpoint.ckpt: model.projector`).
    """
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        if "${" in value:
            raise ConfigRefused(
                f"{where} holds an interpolation ({value!r}): settings read from a file are taken literally, "
                "never resolved"
            )
        return value
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_plain_data(item, f"{where}[{i}]")
        return value
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigRefused(f"{where} has a non-string key {key!r}")
            if key in INSTANTIATE_KEYS:
                raise ConfigRefused(
                    f"{where}.{key} is set ({item!r:.80}): settings read from a file are data and are never "
                    "instantiated; only your own command line and config files may name targets"
                )
            check_plain_data(item, f"{where}.{key}")
        return value
    raise ConfigRefused(f"{where} is a {type(value).__name__}, not plain data")


def dataclass_from_data(cls: type[T], data: Any, where: str) -> T:
    """Build the settings dataclass `cls` from plain `data`, checking every field's type.

    Nested dataclass fields are built the same way. Unknown keys, missing required fields and values of the
    wrong type raise `ConfigRefused` naming the field.
    """
    if not isinstance(data, Mapping):
        raise ConfigRefused(f"{where} must be a mapping of settings, got {type(data).__name__}")
    check_plain_data(data, where)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigRefused(f"{where} has unknown settings {unknown}; {cls.__name__} has {names}")
    values = {name: _typed(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigRefused(f"{where} lacks the required settings {missing}")
    return cls(**values)


def _typed(value: Any, annotation: Any, where: str) -> Any:
    """`value` checked against `annotation` (the annotation forms the settings dataclasses use)."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        return dataclass_from_data(annotation, value, where)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            try:
                return _typed(value, option, where)
            except ConfigRefused as err:
                errors.append(str(err))
        raise ConfigRefused(f"{where} = {value!r:.80} is none of {_describe(annotation)}")
    if origin is Literal:
        if value in typing.get_args(annotation) and not isinstance(value, bool):
            return value
        raise ConfigRefused(f"{where} = {value!r:.80}; allowed: {list(typing.get_args(annotation))}")
    if annotation is type(None):
        if value is None:
            return value
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is Any:
        return check_plain_data(value, where)
    elif origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, (list, tuple)):
            return [_typed(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]
    elif origin is dict:
        key_type, _ = typing.get_args(annotation)
        if isinstance(value, Mapping) and all(isinstance(k, key_type) for k in value):
            return dict(check_plain_data(value, where))
    else:
        raise TypeError(f"{where}: no check for the annotation {annotation!r}")
    raise ConfigRefused(f"{where} = {value!r:.80} is not {_describe(annotation)}")


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))
