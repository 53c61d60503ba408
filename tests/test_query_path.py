"""The query path of a fresh process: no JIT compilation after the first run, no TensorFlow for RootSIFT."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from d2r.engine import Engine
from d2r.engine.config import EngineConfig
from tests.corpus import textured

ROOT = Path(__file__).resolve().parents[1]

# Runs the d2r CLI in this process and writes what numba compiled (from numba's own compile events) to a file.
PROBE = """
import json, sys
from numba.core import event

compiled = []

class Probe(event.Listener):
    def on_start(self, ev):
        compiled.append(ev.data["dispatcher"].py_func.__qualname__)

    def on_end(self, ev):
        pass

event.register("numba:compile", Probe())
from d2r.cli import main

code = main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump({"code": code, "compiled": compiled, "tensorflow": "tensorflow" in sys.modules}, f)
"""


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def _run_probe(tmp_path, name, args, **env):
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, "-c", PROBE, str(out), *map(str, args)], env=_env(**env),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-2000:]
    return json.loads(out.read_text())


def test_importing_d2r_does_not_import_tensorflow():
    code = ("import sys, d2r, d2r.engine, d2r.cli, d2r.features\n"
            "d2r.cli.build_parser()\n"
            "print('tensorflow' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"


def _small_engine(tmp_path):
    """Six photos (three shifted copies of one texture, three others) in a RootSIFT engine; returns the folder."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    base = textured(rng, 240, 320)
    for i in range(6):
        Image.fromarray(np.roll(base, 16 * i, axis=1) if i < 3 else textured(rng)).save(folder / f"p{i}.png")
    cfg = EngineConfig.from_dict({"features": {"options": {"max_features": 300}},
                                  "codebook": {"size": 32, "iterations": 3}, "rerank": {"num_to_rerank": 5}})
    Engine.create(tmp_path / "eng", cfg).index(folder, progress=False)
    return folder


def test_warm_up_thread_leaves_search_results_unchanged(tmp_path):
    folder = _small_engine(tmp_path)
    expected = [h.to_dict() for h in Engine.open(tmp_path / "eng").search(folder / "p0.png", top_k=6)]
    assert expected and expected[0]["image_id"] == "p0"  # the query photo itself comes first
    engine = Engine.open(tmp_path / "eng")
    thread = engine.warm_up()
    assert thread is not None and thread.daemon
    got = [h.to_dict() for h in engine.search(folder / "p0.png", top_k=6)]  # while the warm-up may still run
    thread.join()
    assert got == expected
    assert not thread.is_alive()
    Engine.create(tmp_path / "empty", EngineConfig.from_dict({"codebook": {"size": 32}}))
    assert Engine.open(tmp_path / "empty").warm_up() is None  # nothing indexed: nothing to warm


@pytest.mark.slow
def test_second_search_process_compiles_nothing(tmp_path):
    folder = _small_engine(tmp_path)
    args = ["search", folder / "p0.png", "--index", tmp_path / "eng", "--json", "--quiet"]
    cache = str(tmp_path / "numba-cache")  # an empty cache: the first process must compile
    first = _run_probe(tmp_path, "first", args, NUMBA_CACHE_DIR=cache)
    assert first["code"] == 0
    # the empty cache made the first process compile the query path (assignment, scan; usac re-ranking is OpenCV)
    assert "update_shortlist" in first["compiled"] and "refine_or_scan" in first["compiled"], first
    second = _run_probe(tmp_path, "second", args, NUMBA_CACHE_DIR=cache)
    assert second["code"] == 0 and second["compiled"] == [], second
    other_threads = _run_probe(tmp_path, "threads", args, NUMBA_CACHE_DIR=cache, NUMBA_NUM_THREADS="1")
    assert other_threads["code"] == 0 and other_threads["compiled"] == [], other_threads
    assert not second["tensorflow"]


def test_search_program_output_and_exit_codes_survive_the_fast_exit(tmp_path):
    # Run as a program, `d2r search` ends with os._exit after printing: the output must be complete and flushed
    # and the exit code kept (0 ok, 3 partial failure), also when stdout is a pipe (block-buffered).
    folder = _small_engine(tmp_path)
    base = [sys.executable, "-m", "d2r", "search", "--index", str(tmp_path / "eng"), "--json", "--top-k", "6"]
    ok = subprocess.run(base + [str(folder / "p0.png")], env=_env(), capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    hits = json.loads(ok.stdout.strip().splitlines()[-1])["hits"]
    assert len(hits) == 6 and hits[0]["image_id"] == "p0"
    expected = [h.to_dict() for h in Engine.open(tmp_path / "eng").search(folder / "p0.png", top_k=6)]
    assert [h["image_id"] for h in hits] == [h["image_id"] for h in expected]
    partial = subprocess.run(base + [str(folder / "p1.png"), str(tmp_path / "missing.png")], env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert partial.returncode == 3, partial.stderr[-2000:]
    lines = [json.loads(line) for line in partial.stdout.strip().splitlines()]
    assert [("error" in line) for line in lines] == [False, True]
    assert "missing.png" in partial.stderr and "partial failure" in partial.stderr
