"""Typed configuration: YAML files that compose, dotted command-line overrides, strict validation.

A run's config is one `Config` dataclass with a section per concern (model, data, train, parallel). Each section's
dataclass lives beside the code it configures (`atlas_train/<section>/config.py`) so that a module owns its keys;
this file only knows how to read, merge and check them.

- `load_config(["configs/model/demo.yaml", "configs/train/demo.yaml"], ["train.lr=3e-4"])` merges the files left
  to right, then the overrides, then builds the dataclasses.
- A YAML file may list others under `defaults:` (paths relative to it); they are merged first, the file on top.
- Every unknown key and every value of the wrong type is rejected with the key's dotted path, e.g.
  `config error: model.n_layrs: unknown key (known: ...)`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Iterable

import yaml


class ConfigError(ValueError):
    """A user error in a config file or override; its message names the key path."""


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict:
    """Read one YAML file and the files named in its `defaults:` list (merged beneath it)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({err.__class__.__name__}: {err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    merged: dict = {}
    for parent in data.pop("defaults", None) or []:
        merged = _merge(merged, read_yaml(path.parent / parent))
    return _merge(merged, data)


def parse_override(text: str) -> dict:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}; the value is parsed as YAML (numbers, bools, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key path")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    node: dict = {}
    cursor = node
    parts = key.split(".")
    for part in parts[:-1]:
        cursor[part] = {}
        cursor = cursor[part]
    cursor[parts[-1]] = value
    return node


def _check_value(tp: Any, value: Any, path: str) -> Any:
    """Validate (and gently coerce: int -> float, list -> tuple) one value against a type annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(arg, value, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{path}: bad value {value!r}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        items = [_check_value(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, path)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads "3e-4" as a string; accept what float() accepts
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported config type {tp!r}")


def build_dataclass(cls: type, data: Any, path: str = ""):
    """Build dataclass `cls` from a mapping, rejecting unknown keys and bad values by their dotted path.

    After construction, a `validate()` method on the dataclass (if any) checks cross-field rules; it raises
    ConfigError or ValueError, which is reported with the section's path.
    """
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{path or '<root>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(f"{sub}: unknown key (known: {', '.join(sorted(fields))})")
        kwargs[key] = _check_value(hints[key], value, sub)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(f"{path or '<root>'}: {err}") from None
    return obj


def to_dict(obj) -> dict:
    """A dataclass config as plain data (for YAML/JSON dumps and checkpoints)."""
    return dataclasses.asdict(obj)


def dump_yaml(obj, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))


def load_config(files: Iterable[str | Path] = (), overrides: Iterable[str] = (), cls: type | None = None):
    """Merge YAML files then `key=value` overrides, and build the typed config (the full `Config` by default)."""
    merged: dict = {}
    for file in files:
        merged = _merge(merged, read_yaml(file))
    for text in overrides:
        merged = _merge(merged, parse_override(text))
    if cls is None:
        from atlas_train.run_config import Config

        cls = Config
    return build_dataclass(cls, merged)
