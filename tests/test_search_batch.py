"""Many queries per process: ``Engine.search_batch`` and multi-image ``d2r search``."""

import json

import numpy as np
import pytest
from PIL import Image

import d2r.cli
from d2r.engine import Engine
from d2r.engine.config import EngineConfig
from tests.corpus import textured


@pytest.fixture(scope="module")
def small_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    folder = root / "photos"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for g in range(3):  # three scenes, three shifted views each
        base = textured(rng, 240, 320)
        for i in range(3):
            Image.fromarray(np.roll(base, 16 * i, axis=1)).save(folder / f"s{g}_{i}.png")
    cfg = EngineConfig.from_dict({"features": {"options": {"max_features": 300}},
                                  "codebook": {"size": 32, "iterations": 3}, "rerank": {"num_to_rerank": 6}})
    engine = Engine.create(root / "eng", cfg)
    engine.index(folder, progress=False)
    (folder / "broken.png").write_bytes(b"not an image")
    return engine, folder


def test_search_batch_equals_one_by_one(small_engine):
    engine, folder = small_engine
    queries = [folder / f"s{g}_{i}.png" for g in range(3) for i in (0, 2)] + [folder / "broken.png"]
    for workers in (1, 3):
        got = engine.search_batch(queries, top_k=4, workers=workers)
        assert len(got) == len(queries)
        assert isinstance(got[-1], Exception) and "broken.png" in str(got[-1])
        for q, hits in zip(queries[:-1], got[:-1]):
            want = engine.search(q, top_k=4)
            assert [(h.image_id, h.score, h.inliers) for h in hits] == [(h.image_id, h.score, h.inliers)
                                                                         for h in want]
            assert {h.image_id for h in hits[:3]} == {f"{q.stem[:2]}_{i}" for i in range(3)}


def test_cli_several_images_folders_and_list_files(small_engine, tmp_path, capsys):
    engine, folder = small_engine
    sub = tmp_path / "sub"
    sub.mkdir()
    Image.open(folder / "s1_1.png").save(sub / "q.png")
    listing = tmp_path / "queries.txt"
    listing.write_text(f"# two queries\n{folder / 's2_0.png'}\n\n{folder / 'broken.png'}\n")
    code = d2r.cli.main(["search", str(folder / "s0_0.png"), str(sub), str(listing), "--index", str(engine.path),
                         "--json", "--top-k", "3", "--workers", "2"])
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 3 and "broken.png" in err and "Traceback" not in err  # one bad query: reported, exit 3 (partial)
    assert [line["query"] for line in lines] == [str(folder / "s0_0.png"), str(sub / "q.png"),
                                                 str(folder / "s2_0.png"), str(folder / "broken.png")]
    assert "error" in lines[3] and "hits" not in lines[3]
    for line, scene in zip(lines[:3], ["s0", "s1", "s2"]):
        assert {h["image_id"] for h in line["hits"]} == {f"{scene}_{i}" for i in range(3)}
    code = d2r.cli.main(["search", str(folder / "s0_0.png"), str(folder / "s1_0.png"), "--index",
                         str(engine.path), "--quiet"])
    out, _ = capsys.readouterr()
    assert code == 0 and out.count("rank") == 2 and f"# {folder / 's1_0.png'}" in out
    code = d2r.cli.main(["search", str(folder / "s0_0.png"), str(sub), "--index", str(engine.path), "--bbox",
                         "1,1,50,50"])
    _, err = capsys.readouterr()
    assert code == 2 and "--bbox" in err  # a usage error: --bbox needs a single query
    empty = tmp_path / "empty"
    empty.mkdir()
    code = d2r.cli.main(["search", str(empty), "--index", str(engine.path)])
    _, err = capsys.readouterr()
    assert code == 1 and "no images" in err


def test_small_work_starts_no_thread_pool_and_batch_threads_run_numba_and_blas_on_one_thread(small_engine,
                                                                                          monkeypatch):
    """Small searches lost their lead to single-threaded peers under contention: small work must run on the
    calling thread (no pool for a query under 1,024 descriptors, one candidate, a batch of one), and a query
    thread of a batch must run numba and BLAS on one thread (threads times BLAS threads oversubscribed the
    cores)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import numba
    from threadpoolctl import threadpool_info

    import d2r.index.search

    try:  # faiss's OpenBLAS is threaded by OpenMP: its limit is per thread (how the full suite failed this)
        import faiss  # noqa: F401
    except ImportError:
        pass
    engine, folder = small_engine
    query = folder / "s1_0.png"
    assert len(engine.extract(query).descriptors) < 1024
    started = []
    pool_init, thread_start = ThreadPoolExecutor.__init__, threading.Thread.start
    scan_pool = d2r.index.search._scan_pool
    monkeypatch.setattr(ThreadPoolExecutor, "__init__",
                        lambda self, *a, **k: (started.append("pool"), pool_init(self, *a, **k))[1])
    monkeypatch.setattr(threading.Thread, "start",
                        lambda self: (started.append(self.name), thread_start(self))[1])
    monkeypatch.setattr(d2r.index.search, "_scan_pool", lambda: (started.append("scan pool"), scan_pool())[1])
    monkeypatch.setattr(engine.config.rerank, "num_to_rerank", 1)
    engine.search(query, top_k=4)
    assert engine.search_batch([query], top_k=4)[0][0].image_id == "s1_0"
    assert started == []
    monkeypatch.setattr(engine.config.rerank, "num_to_rerank", 6)
    seen, search = [], engine.search

    def recording(*args, **kwargs):
        blas = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
        seen.append((threading.current_thread() is not threading.main_thread(), numba.get_num_threads(), blas))
        return search(*args, **kwargs)

    monkeypatch.setattr(engine, "search", recording)
    got = engine.search_batch([folder / "s0_0.png", query, folder / "s2_0.png"], top_k=4, workers=3)
    assert [hits[0].image_id for hits in got] == ["s0_0", "s1_0", "s2_0"]
    assert len(seen) == 3 and all(in_thread and threads == 1 and blas and set(blas) == {1}
                                  for in_thread, threads, blas in seen), seen


def test_one_blas_thread_also_limits_a_blas_loaded_after_its_first_use():
    """The one-BLAS-thread block inspected the loaded libraries once: scipy's own OpenBLAS, loaded later,
    kept its threads inside every later block (a batch's query threads each running a multi-threaded GEMM),
    seen when a test run had imported scipy after the first search."""
    import ast
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("from threadpoolctl import threadpool_info; from d2r._threads import one_blas_thread\n"
            "with one_blas_thread():\n    pass\n"
            "import scipy.linalg\n"
            "with one_blas_thread():\n"
            "    print([(i['filepath'], i['num_threads']) for i in threadpool_info() if i['user_api'] == 'blas'])")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr
    libs = ast.literal_eval(out.stdout.strip())
    assert libs and all(n == 1 for _, n in libs), libs


def test_one_blas_thread_entered_inside_a_running_block_limits_a_blas_loaded_meanwhile():
    """A block left open (a server thread, a hung query) kept the limit of the libraries loaded when it began:
    a BLAS loaded later ran at its own thread count inside every later block (seen in the full suite: one
    OpenBLAS at 2 threads inside a batch's query threads)."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("faiss") is None:  # a BLAS that `import d2r` does not load already
        pytest.skip('faiss not installed (pip install -e ".[faiss]")')
    code = """
import threading
from threadpoolctl import threadpool_info
from d2r._threads import one_blas_thread
inside, leave = threading.Event(), threading.Event()
def long_block():
    with one_blas_thread():
        inside.set()
        leave.wait()
t = threading.Thread(target=long_block)
t.start()
inside.wait()
import faiss  # its own OpenBLAS, loaded while the first block runs
with one_blas_thread():
    during = sorted({l["num_threads"] for l in threadpool_info() if l["user_api"] == "blas"})
leave.set()
t.join()
print(during)
"""
    env = {"OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"}
    import os

    env.update({k: v for k, v in os.environ.items() if k in ("PYTHONPATH", "HOME")})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[1]", out.stdout  # every BLAS at one thread, faiss's included
