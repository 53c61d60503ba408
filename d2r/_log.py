"""Logging helpers shared by the CLI and the distributed runners."""

from __future__ import annotations

import contextlib
import logging


@contextlib.contextmanager
def muted(name: str):
    """No WARNING lines from logger ``name`` inside the block: for a command that lists those failures itself
    (each failed image or query is listed once), or a third-party notice under --quiet."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
