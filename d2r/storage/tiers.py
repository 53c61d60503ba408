"""The tier policy: which data parts (index segments, feature-store shards) merge next.

Parts of about the same size form a tier (``log_factor`` of their bytes over a floor); ``factor`` parts of one
tier merge into one part of the next, so every byte is rewritten once per tier and a store built by many small
commits writes O(n log n) bytes. The index merges adjacent segments only (the order of images decides ties);
the feature store merges any of its small shards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class TierPolicy:
    """When and what parts merge.

    factor: parts of one tier merged at a time (and the size ratio between tiers); floor_bytes: parts smaller
    than this count as this size (tiny parts merge eagerly); max_segments: above this many parts, the
    ``factor`` adjacent ones of least total size merge whatever their tiers (None: no such limit); adjacent:
    only neighbouring parts merge (the order of the parts is kept)."""

    factor: int = 10
    floor_bytes: int = 1 << 20
    max_segments: int | None = 64
    adjacent: bool = True

    def __post_init__(self):
        if (self.factor < 2 or self.floor_bytes < 1
                or (self.max_segments is not None and self.max_segments < self.factor)):
            raise ValueError(f"tier policy: need factor >= 2, max_segments >= factor, floor_bytes >= 1; "
                             f"got {self}")

    def tier(self, nbytes: int) -> int:
        return int(math.floor(math.log(max(nbytes, self.floor_bytes) / self.floor_bytes, self.factor) + 1e-9))

    def plan(self, sizes: list[int], eligible: list[bool] | None = None) -> list[int]:
        """Positions (ascending) of the parts to merge next, among those ``eligible`` (default: all); empty
        when nothing is due."""
        n, f = len(sizes), self.factor
        ok = [True] * n if eligible is None else [bool(e) for e in eligible]
        tiers = [self.tier(s) for s in sizes]
        if not self.adjacent:
            groups: dict[int, list[int]] = {}
            for i in range(n):
                if ok[i]:
                    groups.setdefault(tiers[i], []).append(i)
                    if len(groups[tiers[i]]) >= f:
                        return groups[tiers[i]]
            return []
        windows = [i for i in range(n - f + 1) if all(ok[i:i + f])]
        best = None
        for i in windows:
            if min(tiers[i:i + f]) == max(tiers[i:i + f]) and (best is None or tiers[i] <= tiers[best]):
                best = i  # lowest tier, newest window
        if best is None and windows and self.max_segments is not None and n > self.max_segments:
            best = min(windows, key=lambda i: sum(sizes[i:i + f]))
        return [] if best is None else list(range(best, best + f))
