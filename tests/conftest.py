import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """../shared beside the checkout (CI lays it there); D2R_SHARED overrides."""
    return Path(os.environ.get("D2R_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if not path.is_dir():
        pytest.fail(f"shared data folder not found at {path} (set D2R_SHARED)")
    return path


@pytest.fixture(scope="session")
def bench_dev(shared) -> Path:
    """The real-photo dev set (read in place, never copied)."""
    return shared / "data" / "instance_bench_dev"


@pytest.fixture
def rng():
    return np.random.default_rng(0)
