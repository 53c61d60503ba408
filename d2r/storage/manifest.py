"""Manifests are untrusted JSON: parsed into a dict, old keys converted, every field checked against a schema
(types and ranges), so a damaged manifest is a :class:`~d2r.storage.files.DamagedError` naming it, never a
TypeError further on.

A schema is plain data: a type (``int`` means an integer >= 0, ``str`` any text, ``dict`` any object), a
:class:`Int` range, a :class:`Text` pattern, a literal value, ``{key: schema}`` (every key required unless its
schema is :class:`Opt`), ``[schema]`` (a list of items) or :class:`Map` (an object of any keys).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from d2r.storage.files import DamagedError


@dataclass(frozen=True)
class Int:
    """An integer (never a bool) in ``[lo, hi]`` (``hi`` None: no upper bound)."""
    lo: int = 0
    hi: int | None = None


@dataclass(frozen=True)
class Text:
    """A string matching ``pattern`` in full."""
    pattern: str


@dataclass(frozen=True)
class Opt:
    """A key that may be absent or null."""
    schema: object


@dataclass(frozen=True)
class Map:
    """A JSON object whose values all match ``schema``."""
    schema: object


@dataclass(frozen=True)
class OneOf:
    """Any of the given schemas."""
    schemas: tuple


DIGEST = Text(r"[0-9a-f]{32}")
RECORD = {"size": int, "blake2b": DIGEST}  # a data file's record


def problem(value, schema, where: str = "") -> str | None:
    """What is wrong with ``value`` under ``schema`` (None: nothing), e.g. ``segments[2].images: -7 is not an
    integer >= 0``."""
    at = where or "the manifest"
    if isinstance(schema, OneOf):
        found = [problem(value, s, where) for s in schema.schemas]
        return None if None in found else found[0]
    if isinstance(schema, Opt):
        return None if value is None else problem(value, schema.schema, where)
    if schema is int:
        schema = Int()
    if isinstance(schema, Int):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= schema.lo
        if ok and (schema.hi is None or value <= schema.hi):
            return None
        upto = "" if schema.hi is None else f" and <= {schema.hi}"
        return f"{at}: {_show(value)} is not an integer >= {schema.lo}{upto}"
    if isinstance(schema, Text):
        if isinstance(value, str) and re.fullmatch(schema.pattern, value):
            return None
        return f"{at}: {_show(value)} is not a text of the form {schema.pattern}"
    if isinstance(schema, type):
        return None if isinstance(value, schema) and not isinstance(value, bool) else \
            f"{at}: {_show(value)} is not a JSON {_json_name(schema)}"
    if isinstance(schema, list):
        if not isinstance(value, list):
            return f"{at}: {_show(value)} is not a list"
        for i, item in enumerate(value):
            found = problem(item, schema[0], f"{where}[{i}]")
            if found:
                return found
        return None
    if isinstance(schema, Map):
        if not isinstance(value, dict):
            return f"{at}: {_show(value)} is not a JSON object"
        for key, item in value.items():
            found = problem(item, schema.schema, f"{where}.{key}" if where else str(key))
            if found:
                return found
        return None
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return f"{at}: {_show(value)} is not a JSON object"
        for key, sub in schema.items():
            inner = f"{where}.{key}" if where else key
            if key not in value:
                if isinstance(sub, Opt):
                    continue
                return f"{inner} missing"
            found = problem(value[key], sub, inner)
            if found:
                return found
        return None
    return None if value == schema else f"{at}: {_show(value)} is not {schema!r}"


def _show(value) -> str:
    plain = isinstance(value, (int, float, str, bool, type(None)))
    text = json.dumps(value) if plain else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _json_name(t: type) -> str:
    return {str: "string", dict: "object", list: "list", int: "integer", float: "number"}.get(t, t.__name__)


def load_json(file: Path, store: str) -> dict:
    """The JSON object in ``file``; :class:`DamagedError` when it is not one (FileNotFoundError when
    absent)."""
    try:
        raw = Path(file).read_bytes()
    except IsADirectoryError:
        raise DamagedError(file, "not a file", store) from None
    try:
        m = json.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise DamagedError(file, f"not valid JSON ({str(exc)[:120]})", store) from None
    if not isinstance(m, dict):
        raise DamagedError(file, f"not a JSON object (a {type(m).__name__})", store)
    return m


def validate(file: Path, manifest: dict, schema, store: str) -> dict:
    """``manifest`` when it matches ``schema``; else :class:`DamagedError` naming ``file`` and the first bad
    field."""
    found = problem(manifest, schema)
    if found:
        raise DamagedError(file, f"malformed manifest ({found})", store)
    return manifest


def convert(manifest: dict) -> dict:
    """Old spellings to today's, in place (the feature store of release a0fe626 and before): ``version`` →
    ``format_version``, file records ``{"size", "digest"}`` → ``{"size", "blake2b"}`` (objects of exactly
    these two keys: no other field of a manifest is spelled so)."""
    if "version" in manifest and "format_version" not in manifest:
        manifest["format_version"] = manifest.pop("version")
    stack = [manifest]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.keys() == {"size", "digest"}:
                node["blake2b"] = node.pop("digest")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return manifest
