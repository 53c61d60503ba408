"""Benchmark runs of the ROxford/RParis (revisitop) and GLDv2 protocols over the product's query path."""

from d2r.bench.run import BenchConfig, load_config, per_query_ap, run_gldv2, run_revisitop

__all__ = ["BenchConfig", "load_config", "per_query_ap", "run_gldv2", "run_revisitop"]
