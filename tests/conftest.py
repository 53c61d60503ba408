"""Test-suite switches.

- ``dev`` tests need the shared dev photos / reference vectors (``../shared`` beside the checkout, or
  ``D2R_SHARED``). Without that folder they are skipped with the reason; under CI (``CI`` set) a missing
  folder fails them instead, so CI can never pass by skipping.
- ``slow`` tests (end to end, TensorFlow-heavy) run under CI, with ``-m slow`` (or any ``-m`` expression) or
  with ``D2R_SLOW=1``; a plain ``python -m pytest`` on a fresh clone skips them to stay within a few minutes.
"""

import os
from pathlib import Path

import numpy as np
import pytest

from tests.corpus import write_photos

REPO = Path(__file__).resolve().parents[1]
# Fixtures that read the shared folder: a test using one is a dev test even if it forgot the marker.
SHARED_FIXTURES = {"shared", "bench_dev"}


def shared_dir() -> Path:
    """../shared beside the checkout (CI lays it there); D2R_SHARED overrides."""
    return Path(os.environ.get("D2R_SHARED", REPO.parent / "shared"))


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _missing_shared_message() -> str:
    return (f"shared dev data not found at {shared_dir()} (lay ../shared beside the clone or set D2R_SHARED)")


def pytest_collection_modifyitems(config, items):
    have_shared = shared_dir().is_dir()
    run_slow = in_ci() or os.environ.get("D2R_SLOW", "") not in ("", "0") or bool(config.option.markexpr)
    skip_slow = pytest.mark.skip(reason="slow: runs under CI, with -m slow or D2R_SLOW=1")
    for item in items:
        uses_shared = SHARED_FIXTURES & set(getattr(item, "fixturenames", ()))
        if uses_shared and item.get_closest_marker("dev") is None:
            item.add_marker(pytest.mark.dev)
        if item.get_closest_marker("dev") is not None and not have_shared and not in_ci():
            item.add_marker(pytest.mark.skip(reason="dev: " + _missing_shared_message()))
        if item.get_closest_marker("slow") is not None and not run_slow:
            item.add_marker(skip_slow)


def pytest_runtest_setup(item):
    if item.get_closest_marker("dev") is not None and in_ci() and not shared_dir().is_dir():
        pytest.fail("CI is set but the " + _missing_shared_message(), pytrace=False)


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if not path.is_dir():
        if in_ci():
            pytest.fail("CI is set but the " + _missing_shared_message(), pytrace=False)
        pytest.skip("dev: " + _missing_shared_message())
    return path


@pytest.fixture(scope="session")
def bench_dev(shared) -> Path:
    """The real-photo dev set (read in place, never copied)."""
    return shared / "data" / "instance_bench_dev"


@pytest.fixture(scope="session")
def bundled_photos() -> dict:
    """Real photos that ship with scikit-image (licence-clean, offline): name -> (H, W, 3) uint8 RGB."""
    from skimage import data as sk

    def rgb(a):
        a = np.asarray(a)
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        return np.ascontiguousarray(a[:, :, :3]).astype(np.uint8)

    return {"astronaut": rgb(sk.astronaut()), "chelsea": rgb(sk.chelsea()), "coffee": rgb(sk.coffee()),
            "rocket": rgb(sk.rocket()), "camera": rgb(sk.camera())}


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def photos(tmp_path) -> Path:
    """Four textured 160×200 photos ``im0.png`` … ``im3.png`` in ``tmp_path/photos`` (a module's own
    ``photos`` fixture overrides this one)."""
    return write_photos(tmp_path / "photos", [f"im{i}" for i in range(4)], 11)
