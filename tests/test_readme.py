"""The README's two commands on a fresh clone without ../shared (CI only: slow)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    """The shell lines of the README's first code block (its first two lines are the contract)."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index("```bash") + 1
    block = lines[start:lines.index("```", start)]
    return [line.split("#", 1)[0].strip() for line in block if line.strip()]


@pytest.mark.slow
def test_readme_commands_on_a_fresh_clone(tmp_path):
    """Clone this checkout (its last commit) into an empty folder (no ../shared beside it), then run the
    README's commands there.

    Reuses the current Python environment instead of a new venv (the machines here cannot afford a TensorFlow
    install per test run): ``pip install -e .`` is replaced by putting the clone first on PYTHONPATH, which is
    what an editable install does; ``d2r demo`` and ``python -m pytest`` then run exactly as written, with the
    clone's code. The inner pytest runs without CI and D2R_SLOW, so dev tests skip and slow tests (this one
    included) do not recurse.
    """
    install, demo = _readme_commands()[0].split("&&")
    assert install.strip().startswith("pip install -e") and demo.strip() == "d2r demo"
    assert _readme_commands()[1] == "python -m pytest"
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    clone = tmp_path / "box" / "d2r"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    assert not (clone.parent / "shared").exists()
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "D2R_SLOW", "D2R_SHARED", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = str(clone)
    demo_run = subprocess.run([sys.executable, "-m", "d2r", "demo", "--quiet"], cwd=clone, env=env,
                              capture_output=True, text=True, timeout=900)
    assert demo_run.returncode == 0, demo_run.stderr[-2000:]
    assert "queries have the right instance first" in demo_run.stdout
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=clone,
                           env=env, capture_output=True, text=True, timeout=1800)
    assert tests.returncode == 0, tests.stdout[-3000:]
    assert " passed" in tests.stdout and "error" not in tests.stdout.splitlines()[-1]
