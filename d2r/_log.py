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


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def progress_bar(total: int, desc: str, progress: bool, unit: str = "img"):
    """A tqdm bar, or a do-nothing one when ``progress`` is off or there is nothing to do."""
    if not progress or total == 0:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit)
