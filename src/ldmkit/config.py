"""Dataclass configs: stored as JSON inside our checkpoints, loaded from YAML presets.

No string-to-class indirection: every config is a plain dataclass a reader can jump to. Loading is
strict: an unknown key or a value of the wrong type is an error naming the key and what is allowed."""

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from ldmkit.errors import ConfigError

T = TypeVar("T")


def widths_from_multipliers(d: dict, base_key: str, mult_key: str, default_base: int) -> dict:
    """A stored config that gave level widths as a base width times multipliers, with widths instead
    (`channels`): how configs written before widths were stored as widths still load."""
    if isinstance(d, dict) and mult_key in d and "channels" not in d:
        d = dict(d)
        base = d.pop(base_key, default_base)
        d["channels"] = [base * m for m in d.pop(mult_key)]
    return d


def model_name(text: str) -> str:
    """A config's model field (a bundled name or a path) with a leading ~ expanded, as run.dir's is: a
    bundled name never starts with ~, so it passes unchanged."""
    return str(Path(text).expanduser()) if text.startswith("~") else text


def to_dict(config: Any) -> dict:
    """A JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _check_type(value, hint, where: str):
    """Coerce YAML/JSON values to the field's type, or explain what was expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} is not one of {hint}")
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_dict(hint, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = typing.get_args(hint)[0] if typing.get_args(hint) else Any
        return tuple(_check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if origin is list or hint is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = typing.get_args(hint)[0] if typing.get_args(hint) else Any
        return [_check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build `cls` from a dict, refusing unknown keys and wrong types: a misspelt option must not be
    silently ignored."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    if hasattr(cls, "migrate"):  # a config class may read the spelling older files stored
        data = cls.migrate(data)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown {cls.__name__} option(s) {unknown}; allowed: {sorted(names)}")
    values = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: invalid {cls.__name__}: {e}") from None


def load_yaml(cls: type[T], path: str | Path) -> T:
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    return from_dict(cls, data, str(p))
