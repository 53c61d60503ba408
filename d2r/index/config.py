"""How a database aggregates and compares images: :class:`DatabaseConfig` (stored in its manifest)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from d2r.aggregate import Aggregator, get_kernel
from d2r.codebook import Codebook
from d2r.config import Config

MODES = ("aggregation", "search")


@dataclass
class DatabaseConfig(Config):
    """How images are aggregated and compared. Defaults: R-ASMK*/ASMK* with σ_{3,0} (strict τ), MA 1.

    ``normalize`` divides ASMK scores by sqrt(|W_q||W_d|); the shipped official R-ASMK* configuration has it
    off (raw sums: the paper's figures), the classic ASMK has it on. ``idf`` weights words by idf² with
    idf_c = log(N / max(df_c, 1)) over the live items (an extension, off in the official code).
    """
    kernel: str = "asmk_star"
    mode: str = "aggregation"
    alpha: float = 3.0
    tau: float = 0.0
    tau_inclusive: bool = False
    normalize: bool = True
    num_assignments: int = 1
    query_num_assignments: int = 1
    idf: bool = False

    def check(self, codebook: Codebook | None = None) -> None:
        """ValueError naming the option; without ``codebook``, assignments are checked against K later."""
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        kernel = get_kernel(self.kernel)
        for name in ("alpha", "tau"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0 (the selectivity exponent), got {self.alpha}")
        if not -1.0 <= self.tau < 1.0:
            raise ValueError(f"tau must lie in [-1, 1) (a similarity threshold), got {self.tau}")
        for name in ("num_assignments", "query_num_assignments"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if codebook is not None:
            Aggregator(codebook, self.kernel, self.num_assignments)  # validates the assignments against K
            Aggregator(codebook, self.kernel, self.query_num_assignments)
        if self.idf and not kernel.per_word:
            raise ValueError(f"idf applies to the ASMK kernels, not to {self.kernel!r}")
