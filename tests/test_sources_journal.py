"""The sources table as a snapshot plus an append-only journal (d2r/engine/sources.py): replay, linear bytes
written, torn and garbled logs, old engines, concurrent readers, serve noticing appends."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from d2r.engine import sources as _sources
from d2r.engine.sources import LOG, SNAPSHOT, SourcesTable, read_sources

ROOT = Path(__file__).resolve().parents[1]


def _random_changes(rng, table: SourcesTable, model: dict, n: int) -> None:
    for _ in range(n):
        image_id = f"img/{int(rng.integers(0, 300)):04d}"
        if rng.random() < 0.3 and model:
            victim = sorted(model)[int(rng.integers(0, len(model)))]
            del table[victim]
            del model[victim]
        else:
            path = f"/photos/{image_id}-{int(rng.integers(0, 1000))}.jpg"
            table[image_id] = model[image_id] = path


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_replay_equals_the_dict_after_random_sets_and_deletes_with_compactions(tmp_path, monkeypatch, seed):
    monkeypatch.setattr(_sources, "COMPACT_FLOOR", 2048)  # many compactions
    rng = np.random.default_rng(seed)
    table, model = SourcesTable(tmp_path), {}
    compactions, last_snapshot = 0, None
    for step in range(300):
        _random_changes(rng, table, model, int(rng.integers(0, 8)))
        table.save()
        snap = (tmp_path / SNAPSHOT).stat().st_ino if (tmp_path / SNAPSHOT).exists() else None
        compactions += snap != last_snapshot
        last_snapshot = snap
        assert read_sources(tmp_path)[0] == model, step
        assert dict(SourcesTable(tmp_path)) == model
    assert compactions >= 5
    # the snapshot stays a plain {id: path} object that old readers parse
    assert isinstance(json.loads((tmp_path / SNAPSHOT).read_text()), dict)


def _written_bytes() -> int:
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["wchar"])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
@pytest.mark.parametrize("floor", [None, 64 << 10])
def test_bytes_written_grow_linearly(tmp_path, monkeypatch, floor):
    """2,000 saves of 50 new ids each: the bytes written (as the kernel counts them) stay a small multiple of
    the final files' size (rewriting the whole table each save wrote ~1,000 times it)."""
    if floor is not None:
        monkeypatch.setattr(_sources, "COMPACT_FLOOR", floor)
    table = SourcesTable(tmp_path)
    before = _written_bytes()
    for save in range(2000):
        for k in range(50):
            image_id = f"landmarks/{save:05d}/{k:02d}"
            table[image_id] = f"/data/gldv2/train/{image_id}.jpg"
        table.save()
    written = _written_bytes() - before
    final = sum((tmp_path / name).stat().st_size for name in (SNAPSHOT, LOG) if (tmp_path / name).exists())
    assert len(read_sources(tmp_path)[0]) == 100_000
    assert written < 4 * final, (written, final)


def test_torn_last_line_is_ignored_and_cut_off_at_the_next_save(tmp_path):
    table = SourcesTable(tmp_path)
    table["a"] = "/p/a.jpg"
    table.save()
    table["b"] = "/p/b.jpg"
    table.save()
    log = tmp_path / LOG
    good = log.read_bytes()
    for torn in (b'{"set":{"c":"/p/c', b'{"set":{"c":"/p/c\n', b"\x00\x00\x00"):  # cut short, or zeros
        log.write_bytes(good + torn)
        assert read_sources(tmp_path)[0] == {"a": "/p/a.jpg", "b": "/p/b.jpg"}
    again = SourcesTable(tmp_path)
    again["d"] = "/p/d.jpg"
    again.save()
    assert log.read_bytes().startswith(good) and b"\x00" not in log.read_bytes()
    assert read_sources(tmp_path)[0] == {"a": "/p/a.jpg", "b": "/p/b.jpg", "d": "/p/d.jpg"}


@pytest.mark.parametrize("damage", [b"garbage\n", b'{"set": ["a"]}\n', b'{"put": {}}\n'])
def test_a_garbled_log_is_an_error_naming_the_file(tmp_path, damage):
    table = SourcesTable(tmp_path)
    table["a"] = "/p/a.jpg"
    table.save()
    log = tmp_path / LOG
    log.write_bytes(damage + log.read_bytes())  # damage before a good line: not a torn tail
    with pytest.raises(ValueError, match=f"^{log}: line 1 .*corrupted"):
        read_sources(tmp_path)


def test_index_check_names_a_garbled_log_and_an_old_engine_opens(tmp_path):
    from d2r.engine import Engine
    from d2r.engine.config import EngineConfig
    from d2r.engine.check import check_engine

    eng = tmp_path / "eng"
    Engine.create(eng, EngineConfig())
    # an engine written by an older d2r: sources.json only, indented
    (eng / SNAPSHOT).write_text(json.dumps({"x": "/p/x.jpg", "y": "/p/y.jpg"}, indent=2))
    engine = Engine.open(eng)
    assert engine._sources.get("x") == "/p/x.jpg" and len(engine._sources) == 2
    assert check_engine(eng) == []
    engine._sources["z"] = "/p/z.jpg"
    del engine._sources["x"]
    engine._sources.save()
    # appended to the log, the snapshot not rewritten
    assert json.loads((eng / SNAPSHOT).read_text()) == {"x": "/p/x.jpg", "y": "/p/y.jpg"}
    assert dict(Engine.open(eng)._sources) == {"y": "/p/y.jpg", "z": "/p/z.jpg"}
    (eng / LOG).write_bytes(b"{oops\n" + (eng / LOG).read_bytes())
    damaged = check_engine(eng)
    assert [d["file"] for d in damaged] == [LOG] and "line 1" in damaged[0]["problem"], damaged
    with pytest.raises(ValueError, match=str(eng / LOG)):
        Engine.open(eng).info()


_WRITER = """
import sys
from d2r.engine import sources as _sources
_sources.COMPACT_FLOOR = 4096
table = _sources.SourcesTable(sys.argv[1])
for save in range(int(sys.argv[2])):
    for k in range(20):
        table[f"{save:05d}/{k:02d}"] = f"/photos/{save:05d}/{k:02d}.jpg"
    if save >= 10:
        del table[f"{save - 10:05d}/00"]
    table.save()
    print(save, flush=True)
"""

_READER = """
import sys, time
from d2r.engine.sources import read_sources
last, seen = -1, 0
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    table = read_sources(sys.argv[1])[0]
    saves = sorted({int(i.split("/")[0]) for i in table})
    top = saves[-1] if saves else -1
    # a consistent table is exactly the state after save `top`: saves 0..top, each whole, minus the deleted
    want = {f"{s:05d}/{k:02d}" for s in range(top + 1) for k in range(20) if not (k == 0 and s <= top - 10)}
    assert set(table) == want, (top, len(table), len(want))
    assert top >= last, (top, last)
    last, seen = top, seen + 1
    if top == int(sys.argv[2]) - 1:
        break
print(seen, last)
"""


def test_a_reader_process_sees_consistent_monotone_tables_while_a_writer_saves_and_compacts(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    saves = 600
    reader = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_READER), str(tmp_path), str(saves)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    writer = subprocess.run([sys.executable, "-c", textwrap.dedent(_WRITER), str(tmp_path), str(saves)],
                            capture_output=True, text=True, env=env, timeout=120)
    out, err = reader.communicate(timeout=120)
    assert writer.returncode == 0, writer.stderr
    assert reader.returncode == 0, err
    seen, last = map(int, out.split())
    assert last == saves - 1 and seen >= 2
    assert (tmp_path / SNAPSHOT).exists()  # it compacted meanwhile


def test_serve_notices_a_commit_that_only_appended_to_the_log(tmp_path):
    pytest.importorskip("fastapi")
    from d2r.engine import Engine
    from d2r.engine.config import EngineConfig
    from d2r.serve.app import Service

    eng = tmp_path / "eng"
    Engine.create(eng, EngineConfig())
    table = SourcesTable(eng)
    table["a"] = "/p/a.jpg"
    table.save()
    service = Service(eng)
    assert service.engine._sources.get("a") == "/p/a.jpg"
    snapshot = (eng / SNAPSHOT).stat() if (eng / SNAPSHOT).exists() else None
    table["b"] = "/p/b.jpg"
    table.save()  # another process's commit: only the log grows
    now = (eng / SNAPSHOT).stat() if (eng / SNAPSHOT).exists() else None
    assert (snapshot is None and now is None) or snapshot.st_ino == now.st_ino
    old = service.engine
    service.health()
    assert service.engine is not old and service.engine._sources.get("b") == "/p/b.jpg"


def test_repair_rebuilds_a_garbled_log_from_its_good_lines_and_the_feature_store(tmp_path, capsys):
    """D7: a garbled `sources.log` line made `repair` refuse (the table could not be read), leaving every
    command that reads it failing. Repair now rebuilds the table from the good lines plus the files the
    feature store records, and says what it could not read."""
    import d2r.cli
    from tests.test_engine import _photos

    def cli(*args):
        code = d2r.cli.main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    photos, more, eng = _photos(tmp_path / "photos", 6), _photos(tmp_path / "more", 4, seed=8), tmp_path / "eng"
    assert cli("index", "create", eng, "--codebook-size", 16, "--images", photos, "--quiet")[0] == 0
    assert cli("index", "add", eng, more, "--id-prefix", "b", "--quiet")[0] == 0
    lines = (eng / LOG).read_bytes().splitlines(keepends=True)
    assert len(lines) == 2
    (eng / LOG).write_bytes(b'{"set": {"im0": 7}}\n' + lines[1])  # the first add's line garbled
    code, _, err = cli("index", "check", eng)
    assert code == 1 and f"{LOG}: line 1 is not a sources record" in err, err
    code, out, err = cli("index", "repair", eng, "--json")
    report = json.loads(out)
    assert code == 0 and report["sources_rebuilt"] == {"log_lines": [1], "without_file": 0}, (out, err)
    assert report["sources_restored"] == 6  # the garbled line's images, from the feature store
    assert cli("index", "check", eng)[0] == 0
    table = read_sources(eng)[0]
    assert table["im0"] == str(photos / "im0.png") and table["bim3"] == str(more / "im3.png")
    assert len(table) == 10
    (eng / LOG).write_bytes(b"garbage\n" + (eng / LOG).read_bytes() + b"{}\n")
    code, out, err = cli("index", "repair", eng)
    assert code == 0 and "line(s) 1 of sources.log unreadable" in out and "rebuilt" in out, (out, err)
    assert read_sources(eng)[0] == table
