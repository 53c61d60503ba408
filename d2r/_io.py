"""Crash-safe file writing: write a temporary file beside the target, fsync, rename over it.

A process killed at any moment leaves either the old file or the new one, never a torn file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def fsync_dir(path) -> None:
    """fsync a directory so a rename inside it survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to ``path``; on success fsync it and rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_npy(path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def save_npz(path, **arrays) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def file_digest(path, chunk: int = 1 << 20) -> str:
    """BLAKE2b-128 hex digest of a file's bytes, read in ``chunk``-byte pieces (constant memory)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def read_json(path: Path, default):
    """The JSON in ``path`` (``default`` when absent); ValueError naming the file when it is not valid JSON or
    not of the type of ``default``."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return default
    return parse_json(path, raw, default)


def parse_json(path: Path, raw: bytes, default):
    """``raw`` (the bytes of ``path``) as JSON of the type of ``default`` (any when None); ValueError naming
    the file otherwise."""
    try:
        data = json.loads(raw.decode())
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (corrupted?)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg} "
                         "(corrupted?)") from None
    if default is not None and not isinstance(data, type(default)):
        raise ValueError(f"{path}: expected a JSON {type(default).__name__}, got {type(data).__name__}")
    return data
