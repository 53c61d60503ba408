"""d2r — Detect-to-Retrieve instance image retrieval.

Local features (DELF or RootSIFT) are assigned to a visual-word codebook and aggregated with the
VLAD / ASMK / ASMK* match kernels, per image or per detected region (R-VLAD, R-ASMK, R-ASMK*),
as in Teichmann et al., "Detect-to-Retrieve", CVPR 2019.
"""

from d2r._version import __version__  # noqa: E402

from d2r.aggregate import Aggregated, Aggregator, similarity  # noqa: E402
from d2r.codebook import Codebook  # noqa: E402
from d2r.index import Database, DatabaseConfig, Ranking  # noqa: E402
from d2r.engine import Engine, Hit  # noqa: E402
from d2r.engine.config import EngineConfig

__all__ = ["Aggregated", "Aggregator", "Codebook", "Database", "DatabaseConfig", "Engine", "EngineConfig", "Hit",
           "Ranking",
           "similarity", "__version__"]
