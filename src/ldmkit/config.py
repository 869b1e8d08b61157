"""Dataclass configs: stored as JSON inside our checkpoints, loaded from YAML presets.

No string-to-class indirection: every config is a plain dataclass a reader can jump to."""

import dataclasses
import json
from typing import Any, TypeVar

from ldmkit.errors import ConfigError

T = TypeVar("T")


def to_dict(config: Any) -> dict:
    """A JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build `cls` from a dict, refusing unknown keys: a misspelt option must not be silently ignored."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown {cls.__name__} option(s) {unknown}; allowed: {sorted(names)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: invalid {cls.__name__}: {e}") from None
