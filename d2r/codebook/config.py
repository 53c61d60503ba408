"""The engine's codebook section: an existing codebook file, or k-means on the first images indexed."""

from __future__ import annotations

from dataclasses import dataclass

from d2r.config import Config


@dataclass
class CodebookConfig(Config):
    """The visual vocabulary: an existing codebook file (``path``), or one trained with k-means on the first
    images indexed (``size`` words, ``sample_per_image`` descriptors of each, at most ``max_samples``)."""

    path: str | None = None
    size: int = 1024
    iterations: int = 20
    method: str = "lloyd"  # or "minibatch": much faster for large K at ~0.5% higher inertia
    sample_per_image: int = 300
    max_samples: int = 1_000_000
    seed: int = 0
