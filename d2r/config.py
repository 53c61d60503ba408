"""Configuration dataclasses: official defaults, loadable from YAML or JSON, never global state.

Every stage's config is a dataclass deriving from :class:`Config`; a YAML/JSON section maps straight onto its
fields, unknown keys are refused (a typo must not silently fall back to a default), and ``to_dict`` is what a run
writes next to its outputs.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T", bound="Config")


def read_mapping(path) -> dict:
    """Read a YAML (.yaml/.yml) or JSON file holding a mapping; ValueError naming the file on bad syntax."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        text = path.read_text()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a text file ({exc.reason})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ValueError(f"{path}: invalid YAML{where}: {problem}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: "
                             f"{exc.msg}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


@dataclasses.dataclass
class Config:
    """Base class: ``from_dict`` / ``from_file`` / ``to_dict`` / ``replace`` for nested dataclass configs."""

    @classmethod
    def from_dict(cls: type[T], data: dict | None, _where: str = "") -> T:
        """Build from a mapping. Unknown keys and values of the wrong type raise ValueError naming the dotted
        option (``rerank.descriptor_distance: expected a number, got 'abc'``)."""
        if data is not None and not isinstance(data, dict):
            raise ValueError(f"{_where.rstrip('.') or cls.__name__}: expected a mapping, got {data!r}")
        data = dict(data or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            where = f"{_where}{unknown[0]}" if _where else cls.__name__
            raise ValueError(f"{where}: unknown option(s) {unknown}; known: {sorted(fields)}")
        import typing

        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            ftype = _nested_config_type(cls, name)
            if ftype is not None and not isinstance(value, ftype):  # a section: a mapping (else ValueError)
                value = ftype.from_dict(value, _where=f"{_where}{name}.")
            else:
                value = _checked(value, hints.get(name), f"{_where}{name}")
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
        """Apply ``{"section.field": value}`` overrides (command-line style); returns a new, checked config.

        None values are skipped (a flag that was not given). Keys inside a free-form mapping field (such as
        ``features.options.max_features``) may be new; every other key must exist."""
        data = self.to_dict()
        for key, value in dotted.items():
            if value is None:
                continue
            node: Any = data
            parts = key.split(".")
            for i, p in enumerate(parts[:-1]):
                if not isinstance(node, dict) or p not in node:
                    raise ValueError(f"{key}: no section {'.'.join(parts[:i + 1])!r}")
                if node[p] is None and i < len(parts) - 2:
                    raise ValueError(f"{key}: {'.'.join(parts[:i + 1])} is not a section")
                if node[p] is None:
                    node[p] = {}
                node = node[p]
            if not isinstance(node, dict):
                raise ValueError(f"{key}: {'.'.join(parts[:-1])} is not a section")
            free_form = len(parts) > 1 and _is_free_form(type(self), parts[:-1])
            if parts[-1] not in node and not free_form:
                raise ValueError(f"{key}: no option {parts[-1]!r}; known: {sorted(node)}")
            node[parts[-1]] = value
        return type(self).from_dict(data)


def parse_value(text: str):
    """A command-line value: YAML scalars and lists (``0.5``, ``true``, ``null``, ``[1, 2]``), else text."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(items, flag: str = "--set") -> dict[str, Any]:
    """``["a.b=c", ...]`` (repeated ``--set`` flags) → ``{"a.b": parsed c}``; ValueError naming the bad item.
    The one override parser of every command (its result goes to :meth:`Config.override`)."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ValueError(f"{flag} expects KEY=VALUE with a dotted KEY (e.g. index.kernel=asmk), "
                             f"got {item!r}")
        out[key] = parse_value(value.strip())
    return out


_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}


def _checked(value, hint, where: str):
    """``value`` if it fits the annotation ``hint`` (lists become tuples, ints become floats where a float is
    expected); ValueError naming ``where`` otherwise. Annotations it does not understand are not checked."""
    import types
    import typing

    if isinstance(value, list):
        value = tuple(value)
    if hint is None or hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _checked(value, option, where)
            except ValueError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
        return value
    base = origin or hint
    if base is tuple or base is list:
        if not isinstance(value, tuple):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return value
    if base not in _KINDS:
        return value
    ok = {
        bool: isinstance(value, (bool, np.bool_)),
        int: isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)),
        float: isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)),
        str: isinstance(value, (str, Path)),
        dict: isinstance(value, dict),
    }[base]
    if not ok:
        raise ValueError(f"{where}: expected {_KINDS[base]}, got {value!r}")
    if base is bool:
        return bool(value)  # np.bool_ is not JSON-serialisable
    if base is float:
        return float(value)
    if base is int:
        return int(value)
    if base is str and isinstance(value, Path):
        return str(value)
    return value


def _is_free_form(cls, parts) -> bool:
    """Whether the dotted field path ``parts`` of config class ``cls`` is a free-form mapping."""
    import typing

    for i, name in enumerate(parts):
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            return False
        hint = typing.get_type_hints(cls).get(name)
        nested = _nested_config_type(cls, name)
        if nested is not None:
            cls = nested
            continue
        return i == len(parts) - 1 and (hint is dict or typing.get_origin(hint) is dict)
    return False


def _nested_config_type(cls, name):
    import typing

    hints = typing.get_type_hints(cls)
    t = hints.get(name)
    if isinstance(t, type) and issubclass(t, Config):
        return t
    return None
