"""Configuration dataclasses: official defaults, loadable from YAML or JSON, never global state.

Every stage's config is a dataclass deriving from :class:`Config`; a YAML/JSON section maps straight onto its
fields, unknown keys are refused (a typo must not silently fall back to a default), and ``to_dict`` is what a run
writes next to its outputs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T", bound="Config")


def read_mapping(path) -> dict:
    """Read a YAML (.yaml/.yml) or JSON file holding a mapping."""
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


@dataclasses.dataclass
class Config:
    """Base class: ``from_dict`` / ``from_file`` / ``to_dict`` / ``replace`` for nested dataclass configs."""

    @classmethod
    def from_dict(cls: type[T], data: dict | None) -> T:
        data = dict(data or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown option(s) {unknown}; known: {sorted(fields)}")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            ftype = _nested_config_type(cls, name)
            if ftype is not None and isinstance(value, dict):
                value = ftype.from_dict(value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[name] = value
        return cls(**kwargs)

    @classmethod
    def from_file(cls: type[T], path) -> T:
        return cls.from_dict(read_mapping(path))

    def to_dict(self) -> dict:
        def convert(v):
            if isinstance(v, Config):
                return v.to_dict()
            if isinstance(v, tuple):
                return [convert(x) for x in v]
            return v

        return {f.name: convert(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self: T, **changes) -> T:
        return dataclasses.replace(self, **changes)

    def override(self: T, dotted: dict[str, Any]) -> T:
        """Apply ``{"section.field": value}`` overrides (command-line style) and return a new config."""
        data = self.to_dict()
        for key, value in dotted.items():
            node = data
            parts = key.split(".")
            for p in parts[:-1]:
                if p not in node or not isinstance(node[p], dict):
                    raise ValueError(f"override {key!r}: no section {p!r}")
                node = node[p]
            if parts[-1] not in node:
                raise ValueError(f"override {key!r}: no option {parts[-1]!r}")
            node[parts[-1]] = value
        return type(self).from_dict(data)


def _nested_config_type(cls, name):
    import typing

    hints = typing.get_type_hints(cls)
    t = hints.get(name)
    if isinstance(t, type) and issubclass(t, Config):
        return t
    return None
