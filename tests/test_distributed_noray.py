"""Without Ray installed: d2r and d2r.distributed import, and every Ray entry point says how to install it."""

import subprocess
import sys

import numpy as np
import pytest


def test_core_does_not_import_ray():
    code = ("import sys, d2r, d2r.distributed, d2r.cli; d2r.cli.build_parser(); "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_missing_ray_is_a_clear_error(monkeypatch, tmp_path, capsys):
    import d2r.distributed as dist
    from d2r.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as without the extra
    with pytest.raises(ImportError, match=r"pip install -e '\.\[ray\]'"):
        dist.train_codebook(np.zeros((10, 4), np.float32), 2)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32))
    assert main(["train-codebook", "--descriptors", str(tmp_path / "x.npy"), "-k", "2", "--out",
                 str(tmp_path / "cb.npz"), "--ray", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "pip install -e '.[ray]'" in err and "Traceback" not in err and not (tmp_path / "cb.npz").exists()
    assert main(["extract", "--images", str(tmp_path), "--features", "rootsift", "--out", str(tmp_path / "s"),
                 "--ray", "--quiet"]) == 1
    assert "pip install -e '.[ray]'" in capsys.readouterr().err and not (tmp_path / "s").exists()
