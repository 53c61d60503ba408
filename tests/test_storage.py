"""The one storage layer (:mod:`d2r.storage`) under both stores: the same cases run against the index and the
feature store — generations as the commit point, lock-free readers of older generations, garbage collection
that keeps what a kept generation needs, check, repair, a killed writer — plus the primitives themselves
(hashed ``.npy`` writer, row reader, manifest schema, tier policy)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import d2r
from d2r.features import FeatureStore, LocalFeatures
from d2r.features.store import check_store, repair_store
from d2r.features.store import format as store_format
from d2r.index import Database, MergePolicy
from d2r.index import manifest as index_manifest
from d2r.index.manifest import check_database, repair_database
from d2r.storage import (DamagedError, Int, Map, NpyWriter, Opt, RowReader, Text, TierPolicy, file_record,
                         save_array, validate)
from d2r.storage.manifest import problem
from tests.corpus import new_engine, run_cli, write_photos

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
K, D = 16, 8
CENTS = np.random.default_rng(0).standard_normal((K, D)).astype(np.float32)
INFO = {"name": "toy", "config": {}, "fingerprint": "fp-toy", "dim": D}


def descriptors(image_id: str) -> np.ndarray:
    """Deterministic descriptors of an image id (any process can recompute them)."""
    rng = np.random.default_rng(int.from_bytes(image_id.encode()[-8:].rjust(8, b"\0"), "little"))
    return rng.standard_normal((int(rng.integers(3, 12)), D)).astype(np.float32)


def features(image_id: str) -> LocalFeatures:
    x = descriptors(image_id)
    n = x.shape[0]
    return LocalFeatures(np.arange(2 * n, dtype=np.float32).reshape(n, 2), np.ones(n, np.float32),
                         np.ones(n, np.float32), x)


class IndexKind:
    """The index (:class:`Database`) as a store under test: a part is a segment folder or a removal table."""
    name = "index"
    manifest_schema = index_manifest

    @staticmethod
    def create(path):
        db = Database.create(path, d2r.Codebook(CENTS), mode="search")
        db.close()

    @staticmethod
    def add(path, ids):
        """One commit holding ``ids`` (a new segment: merges only when asked)."""
        with Database.open(path, writable=True) as db:
            db.merge_policy = MergePolicy(factor=50, max_segments=50)
            for i in ids:
                db.add(i, descriptors(i))
            db.save()

    @staticmethod
    def remove(path, ids):
        with Database.open(path, writable=True) as db:
            for i in ids:
                db.remove(i)
            db.save()

    @staticmethod
    def merge(path):
        with Database.open(path, writable=True) as db:
            db.compact()
            db.save()

    @staticmethod
    def reader(path):
        db = Database.open(path)
        return lambda: [str(i) for i in db.ids()] if all(_same_scores(db, i) for i in db.ids()) else None

    @staticmethod
    def ids(path):
        return [str(i) for i in Database.open(path).ids()]

    @staticmethod
    def check(path):
        return sorted(str(path / d["file"]) for d in check_database(path))

    repair = staticmethod(repair_database)

    @staticmethod
    def data_files(path):
        return sorted(list(path.glob("seg-*/*.npy")))

    @staticmethod
    def payload_files(path):
        return sorted(path.glob("seg-*/bits.npy"))

    @staticmethod
    def parts_on_disk(path):
        return {p.name for p in path.iterdir() if p.name.startswith(("seg-", "removed-"))}

    parts = staticmethod(index_manifest.referenced)
    generations = staticmethod(lambda: index_manifest.GENERATIONS)


def _same_scores(db, image_id) -> bool:
    """The image is its own best match (the database reads what was written)."""
    return str(db.search(descriptors(str(image_id)), top_k=1).ids[0]) == str(image_id)


class StoreKind:
    """The feature store as a store under test: a part is a shard."""
    name = "features"
    manifest_schema = store_format

    @staticmethod
    def create(path):
        FeatureStore.create(path, INFO).close()

    @staticmethod
    def add(path, ids):
        with FeatureStore.open(path, "a") as store:
            for i in ids:
                store.add(i, features(i), source=f"/photos/{i}.jpg")

    @staticmethod
    def remove(path, ids):
        with FeatureStore.open(path, "a") as store:
            store.remove(ids)

    @staticmethod
    def merge(path):
        with FeatureStore.open(path, "a") as store:
            store.compact(full=True)

    @staticmethod
    def reader(path):
        store = FeatureStore.open(path)

        def read():
            got = {i: f for i, f in store}
            ok = all(np.array_equal(f.descriptors, descriptors(i)) for i, f in got.items())
            return list(got) if ok else None
        return read

    @staticmethod
    def ids(path):
        return FeatureStore.open(path).ids()

    @staticmethod
    def check(path):
        return sorted(d["file"] for d in check_store(path))

    repair = staticmethod(repair_store)

    @staticmethod
    def data_files(path):
        return sorted(path.glob("shard-*.npy"))

    @staticmethod
    def payload_files(path):
        return sorted(path.glob("shard-*.descriptors.npy"))

    @staticmethod
    def parts_on_disk(path):
        return {store_format.part_of(p.name) for p in path.iterdir()} - {None}

    parts = staticmethod(lambda m: {r["name"] for r in m["shards"]})
    generations = staticmethod(store_format.generations)


KINDS = [IndexKind, StoreKind]


@pytest.fixture(params=KINDS, ids=lambda k: k.name)
def kind(request):
    return request.param


def _built(kind, path, commits=4, per=3):
    kind.create(path)
    ids = []
    for c in range(commits):
        batch = [f"c{c}-{j}" for j in range(per)]
        kind.add(path, batch)
        ids += batch
    return ids


def _kept_parts(kind, path) -> set:
    gens = kind.generations().files(path)
    out = set()
    for g in sorted(gens)[-index_manifest.KEEP_GENERATIONS:]:
        out |= kind.parts(json.loads(gens[g].read_text()))
    return out


# ---- generations -------------------------------------------------------------------------------------------
def test_commit_writes_the_generation_file_then_the_commit_point(kind, tmp_path, monkeypatch):
    monkeypatch.setattr(store_format, "RETIRE_GRACE_SECONDS", 0.0)  # else young generations stay a minute
    path = tmp_path / kind.name
    _built(kind, path)
    current = json.loads((path / "manifest.json").read_text())
    gens = kind.generations().files(path)
    assert max(gens) == current["generation"] and json.loads(gens[max(gens)].read_text()) == current
    assert len(gens) == index_manifest.KEEP_GENERATIONS  # older generation files are collected


def test_a_reader_of_an_older_generation_keeps_reading_while_the_writer_merges(kind, tmp_path):
    path = tmp_path / kind.name
    ids = _built(kind, path)
    read = kind.reader(path)
    kind.merge(path)  # every part of the reader's generation is replaced
    kind.add(path, ["late"])
    assert read() == ids  # still the generation it opened, exact
    assert sorted(kind.ids(path)) == sorted(ids + ["late"])


def test_garbage_collection_keeps_what_kept_generations_need(kind, tmp_path, monkeypatch):
    monkeypatch.setattr(store_format, "RETIRE_GRACE_SECONDS", 0.0)
    path = tmp_path / kind.name
    ids = _built(kind, path, commits=6)
    kind.remove(path, ids[:2])
    kind.merge(path)
    kind.add(path, ["x", "y"])
    on_disk, kept = kind.parts_on_disk(path), _kept_parts(kind, path)
    assert on_disk == kept  # nothing a kept generation lists is gone, nothing else is left
    assert kind.check(path) == []


def test_stale_temporary_files_are_collected(kind, tmp_path, monkeypatch):
    """D19: a killed writer's temporary files (``.manifest.json.*.tmp``, ``.shard-*.npy.*.tmp``,
    ``.seg-*.tmp``) were never collected, even by later successful runs."""
    path = tmp_path / kind.name
    _built(kind, path, commits=1)
    own = path / ".manifest.json.k1ll3d.tmp"
    own.write_text("{")
    part = path / (".seg-00000009-deadbeef0000.tmp" if kind is IndexKind
                   else ".shard-deadbeef.descriptors.npy.x7r2.tmp")
    part.mkdir() if kind is IndexKind else part.write_bytes(b"\0" * 10)
    young = path / ".shard-cafe.ids.npy.k9q1.tmp"
    young.write_bytes(b"\0")
    kind.add(path, ["more"])
    assert not own.exists()  # the writer's own leftovers: only the lock holder writes manifests
    if kind is StoreKind:  # a worker's shard files may still be on their way: collected once old
        assert part.exists() and young.exists()
        old = time.time() - store_format.GC_GRACE_SECONDS - 60
        os.utime(part, (old, old))
        kind.add(path, ["again"])
        assert young.exists()
    assert not part.exists()


# ---- D1: a lost commit point -------------------------------------------------------------------------------
def test_a_lost_commit_point_stops_every_writer_and_repair_restores_it(kind, tmp_path):
    """D1: with ``manifest.json`` missing, a writer started a new, empty store and collected the old parts as
    garbage. Now writers and readers refuse in one line pointing at `d2r index repair`, and repair restores
    the newest generation."""
    path = tmp_path / kind.name
    ids = _built(kind, path)
    (path / "manifest.json").unlink()
    for attempt in (lambda: kind.create(path), lambda: kind.add(path, ["new"]), lambda: kind.ids(path)):
        with pytest.raises(DamagedError) as exc:
            attempt()
        message = str(exc.value)
        assert exc.value.file == str(path / "manifest.json") and "\n" not in message
        assert "missing, while the folder holds" in message and "`d2r index repair`" in message
    assert kind.check(path) == [str(path / "manifest.json")]
    report = kind.repair(path)
    assert report["manifest_restored_from"].startswith("manifest-") and not report["unrepairable"]
    assert kind.ids(path) == ids and kind.check(path) == []
    kind.add(path, ["after"])
    assert kind.ids(path) == ids + ["after"]


# ---- D12: manifests of the wrong shape ---------------------------------------------------------------------
@pytest.mark.parametrize("how", ["strings", "negative", "null", "list"])
def test_a_manifest_of_wrong_types_is_a_damaged_manifest(kind, tmp_path, how):
    """D12: numbers as strings ended in `TypeError: '>' not supported`, numbers set to -7 blamed 16 intact
    files (the codebook among them) and repair refused. Now the manifest itself is named as damaged, and
    repair falls back on its newest generation."""
    path = tmp_path / kind.name
    ids = _built(kind, path)
    m = json.loads((path / "manifest.json").read_text())
    if how == "strings":
        m = _map_numbers(m, str)
    elif how == "negative":
        m = _map_numbers(m, lambda v: -7)
    elif how == "null":
        m["generation"] = None
    else:
        m = [m]
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DamagedError) as exc:
        kind.ids(path)
    assert exc.value.file == str(path / "manifest.json") and "\n" not in str(exc.value)
    assert kind.check(path) == [str(path / "manifest.json")]
    with pytest.raises(DamagedError):
        kind.add(path, ["w"])
    assert kind.repair(path)["manifest_restored_from"].startswith("manifest-")
    assert kind.ids(path) == ids


@pytest.mark.parametrize("store, how", [("index", "strings"), ("index", "negative"), ("features", "strings"),
                                         ("features", "list")])
def test_a_manifest_of_wrong_types_through_the_cli(tmp_path, capsys, store, how):
    """D12 through the commands: an engine's index or feature-store manifest with numbers as strings or -7
    ended in "unexpected error (TypeError)". `index check`, `index info` and `search` now fail in one line
    naming the manifest, and `index repair` restores its newest intact generation."""
    photos = write_photos(tmp_path / "photos", ["p0", "p1"], 5)
    eng = new_engine(tmp_path)
    assert run_cli(capsys, "index", "add", eng, photos, "--quiet")[0] == 0
    manifest = eng / store / "manifest.json"
    m = json.loads(manifest.read_text())
    m = _map_numbers(m, str) if how == "strings" else _map_numbers(m, lambda v: -7) if how == "negative" else [m]
    manifest.write_text(json.dumps(m))
    for argv in (["index", "check", eng], ["index", "info", eng], ["search", photos / "p0.png", "--index", eng]):
        code, _, err = run_cli(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and f"{store}/manifest.json" in lines[0], (argv, err)
        assert "unexpected error" not in err and "Traceback" not in err
    code, out, err = run_cli(capsys, "index", "repair", eng)
    assert code == 0 and "manifest.json restored from manifest-" in out, (out, err)
    assert run_cli(capsys, "index", "check", eng)[0] == 0
    code, out, _ = run_cli(capsys, "search", photos / "p0.png", "--index", eng, "--json", "--quiet")
    assert code == 0 and json.loads(out)["hits"][0]["image_id"] == "p0"


def _map_numbers(node, f):
    if isinstance(node, dict):
        return {k: _map_numbers(v, f) for k, v in node.items()}
    if isinstance(node, list):
        return [_map_numbers(v, f) for v in node]
    return f(node) if isinstance(node, int) and not isinstance(node, bool) else node


def test_a_damaged_kept_generation_file_never_fails_a_commit(kind, tmp_path):
    """D12: a damaged copy ``manifest-<current>.json`` made the next `index add` fail (TypeError) after it had
    committed the image; the collection now skips (keeps everything) and the commit stands."""
    path = tmp_path / kind.name
    ids = _built(kind, path)
    gens = kind.generations().files(path)
    gens[max(gens)].write_text('{"format": 7}')
    kind.add(path, ["next"])
    assert kind.ids(path) == ids + ["next"] and kind.check(path) == []


# ---- D4: writers verify what they read ---------------------------------------------------------------------
def test_a_merge_refuses_damaged_input_and_never_launders_it(kind, tmp_path):
    """D4: a merge rewrote a bit-flipped file into a new part under a fresh checksum, and check said healthy.
    Now every input is verified first: the merge fails naming the file, nothing is committed, check still sees
    the damage."""
    path = tmp_path / kind.name
    _built(kind, path)
    victim = kind.payload_files(path)[1]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01  # same size: only the digest sees it
    victim.write_bytes(bytes(data))
    before = (path / "manifest.json").read_bytes()
    with pytest.raises(DamagedError, match=re.escape(str(victim)) + ": checksum mismatch"):
        kind.merge(path)
    assert (path / "manifest.json").read_bytes() == before
    assert kind.check(path) == [str(victim)]


def test_an_index_add_whose_tiered_merge_meets_a_damaged_segment_refuses(tmp_path, capsys):
    """D4 as the trial ran it: with one-image segments, the `index add` whose tiered merge took in a segment
    with a flipped bit in bits.npy exited 0, and `check` then said healthy (the flip made permanent). Now
    the add fails in one line naming the file, and check still names it."""
    import glob

    photos = write_photos(tmp_path / "photos", [f"p{i}" for i in range(10)], 6)
    eng = tmp_path / "eng"
    first = tmp_path / "first"
    first.mkdir()
    for i in range(9):
        os.link(photos / f"p{i}.png", first / f"p{i}.png")
    assert run_cli(capsys, "index", "create", eng, "--codebook-size", 16, "--set", "batch_size=1",
                   "--images", first, "--quiet")[0] == 0
    segments = sorted(glob.glob(str(eng / "index" / "seg-*")))
    assert len(segments) == 9  # the next add's save merges them (the default tier policy)
    bits = Path(segments[0]) / "bits.npy"
    a = np.load(bits)
    a[len(a) // 2] ^= 1
    np.save(bits, a)
    victim = str(bits.relative_to(eng))
    code, _, err = run_cli(capsys, "index", "add", eng, photos / "p9.png", "--quiet")
    assert code == 1 and len(err.strip().splitlines()) == 1 and victim in err, err
    code, _, err = run_cli(capsys, "index", "check", eng)
    assert code == 1 and victim in err, err


def test_a_damaged_removal_table_or_codebook_is_never_carried_forward(tmp_path):
    """D4: a value-corrupted removal table was rewritten by the next save (the engine then held 17 images
    instead of 40 with a clean check), and every save recomputed the codebook's record from the file."""
    path = tmp_path / "index"
    ids = _built(IndexKind, path)
    IndexKind.remove(path, ids[:2])
    table = next(path.glob("removed-*.npy"))
    data = bytearray(table.read_bytes())
    data[-1] ^= 0x01
    table.write_bytes(bytes(data))
    with pytest.raises(DamagedError, match=re.escape(str(table))):
        IndexKind.add(path, ["new"])
    assert IndexKind.check(path) == [str(table)]
    table.write_bytes(bytes(data[:-1]) + bytes([data[-1] ^ 0x01]))  # undo
    book = path / "codebook.npz"
    data = bytearray(book.read_bytes())
    data[-3] ^= 0x01
    book.write_bytes(bytes(data))
    try:
        IndexKind.add(path, ["new"])
    except (DamagedError, ValueError):
        pass  # refused, or saved with the codebook's old record: either way the damage stays visible
    assert str(book) in IndexKind.check(path)


# ---- check and repair --------------------------------------------------------------------------------------
def test_check_names_exactly_the_damaged_file_and_repair_drops_its_part(kind, tmp_path):
    path = tmp_path / kind.name
    ids = _built(kind, path)
    victim = kind.data_files(path)[-1]
    victim.write_bytes(victim.read_bytes()[:-4])
    assert kind.check(path) == [str(victim)]
    report = kind.repair(path)
    dropped = report["dropped_segments" if kind is IndexKind else "dropped_shards"]
    assert len(dropped) == 1 and not report["unrepairable"]
    assert kind.check(path) == [] and set(kind.ids(path)) < set(ids)


# ---- a killed writer ---------------------------------------------------------------------------------------
WRITER = """
import sys
from tests.test_storage import KINDS
kind = {k.name: k for k in KINDS}[sys.argv[1]]
path = __import__("pathlib").Path(sys.argv[2])
for c in range(1000):
    kind.add(path, [f"{sys.argv[3]}k{c:04d}-{j}" for j in range(3)])
    if c % 4 == 3:
        kind.merge(path)
    print(c, flush=True)
"""


def test_a_writer_killed_at_any_moment_leaves_a_store_that_opens_checks_and_continues(kind, tmp_path):
    path = tmp_path / kind.name
    kind.create(path)
    done = 0
    for run, delay in enumerate((0.0, 0.05, 0.2)):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, kind.name, str(path), f"r{run}"], env=ENV,
                                  cwd=REPO, stdout=subprocess.PIPE, text=True)
        committed = int(writer.stdout.readline())  # at least one commit of this writer is done
        time.sleep(delay)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        ids = kind.ids(path)
        assert kind.check(path) == []
        assert len(ids) == len(set(ids)) and ids == sorted(ids) and len(ids) >= done + 3 * (committed + 1)
        done = len(ids)
    kind.add(path, ["last"])  # a new writer takes over and collects what the killed ones left
    assert kind.ids(path)[-1] == "last" and kind.check(path) == []
    assert not [p for p in path.iterdir() if p.name.endswith(".tmp") and p.name.startswith(".manifest")]


# ---- D18: write errors name the file -----------------------------------------------------------------------
FULL = """
import resource, signal, sys
sys.path.insert(0, sys.argv[3])
from tests.test_storage import KINDS
kind = {k.name: k for k in KINDS}[sys.argv[1]]
path = __import__("pathlib").Path(sys.argv[2])
kind.create(path)
kind.add(path, ["warm"])  # kernels compiled or loaded from numba's cache before the limit
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of a signal
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
try:
    kind.add(path, [f"big{i:05d}" for i in range(2000)])
except OSError as exc:
    print(str(exc))
    sys.exit(3)
"""


def test_a_failed_write_names_the_file(kind, tmp_path):
    """D18: ENOSPC (`[Errno 28] No space left on device`) named no file. A file-size limit makes a real write
    fail the same way (EFBIG) in a child process: the error names the file it was writing."""
    path = tmp_path / kind.name
    out = subprocess.run([sys.executable, "-c", FULL, kind.name, str(path), str(REPO)], env=ENV, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 3, out.stderr
    message = out.stdout.strip()
    assert "File too large" in message and str(path) in message, message


# ---- primitives ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,shape", [(np.float32, (37, 5)), (np.uint16, (0,)), ("<U7", (4,)),
                                         (np.int64, ()), (np.uint8, (9, 16))])
def test_npy_writer_record_equals_the_file(tmp_path, dtype, shape):
    rng = np.random.default_rng(1)
    a = (np.array(["a", "bcd", "", "éöü"], dtype) if np.dtype(dtype).kind == "U"
         else rng.integers(0, 200, shape).astype(dtype))
    rec = save_array(tmp_path / "a.npy", a, chunk_rows=4)
    assert rec == file_record(tmp_path / "a.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), a)
    rec2 = save_array(tmp_path / "b.npy", a, atomic=True)
    assert rec2 == rec and not list(tmp_path.glob(".*.tmp"))


def test_npy_writer_refuses_a_wrong_row_count(tmp_path):
    w = NpyWriter(tmp_path / "a.npy", (3, 2), np.float32)
    w.write(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="wrote 2 rows for an array of shape"):
        w.close()


def test_row_reader_reads_rows_and_verifies_streamed_and_random_reads(tmp_path):
    a = np.arange(200, dtype=np.float32).reshape(50, 4)
    rec = save_array(tmp_path / "a.npy", a)
    r = RowReader(tmp_path / "a.npy")
    for start in range(0, 50, 7):  # in order: hashed on the way
        np.testing.assert_array_equal(r.read(start, min(start + 7, 50)), a[start:start + 7])
    r.verify(rec)
    np.testing.assert_array_equal(RowReader(tmp_path / "a.npy")[10:13], a[10:13])
    with pytest.raises(DamagedError, match="checksum mismatch"):
        RowReader(tmp_path / "a.npy").verify(dict(rec, blake2b="0" * 32))
    streamed = RowReader(tmp_path / "a.npy")
    streamed.read(0, 50)
    with pytest.raises(DamagedError, match="checksum mismatch"):
        streamed.verify(dict(rec, blake2b="0" * 32))
    (tmp_path / "a.npy").write_bytes((tmp_path / "a.npy").read_bytes()[:-8])
    with pytest.raises(DamagedError, match="truncated"):
        RowReader(tmp_path / "a.npy")


def test_schema_names_the_first_bad_field():
    schema = {"n": Int(1, 3), "name": Text(r"seg-\d+"), "opt": Opt(int), "files": Map({"size": int})}
    assert problem({"n": 2, "name": "seg-1", "files": {}}, schema) is None
    assert problem({"n": True, "name": "seg-1", "files": {}}, schema) == "n: true is not an integer >= 1 and <= 3"
    assert problem({"n": 2, "name": "seg-x", "files": {}}, schema).startswith("name: \"seg-x\" is not")
    assert problem({"n": 2, "name": "seg-1", "files": {"a": {"size": -7}}}, schema) == \
        "files.a.size: -7 is not an integer >= 0"
    assert problem({"n": 2, "name": "seg-1"}, schema) == "files missing"
    with pytest.raises(DamagedError, match=r"m.json: malformed manifest \(n: \"2\""):
        validate(Path("m.json"), {"n": "2", "name": "seg-1", "files": {}}, schema, "index")


def test_tier_policy_merges_one_tier_at_a_time():
    index = TierPolicy(factor=3, floor_bytes=100)
    assert index.plan([50, 60, 70]) == [0, 1, 2]  # all below the floor: one tier
    assert index.plan([5000, 60, 70]) == []  # not adjacent of one tier
    assert index.plan([5000, 60, 70, 80]) == [1, 2, 3]
    assert index.plan([60, 70, 80], eligible=[True, False, True]) == []
    store = TierPolicy(factor=3, floor_bytes=1, max_segments=None, adjacent=False)
    assert store.plan([10, 5000, 12, 20], eligible=[True, True, True, True]) == [0, 2, 3]
    assert store.plan([10, 5000, 12, 20], eligible=[True, True, False, True]) == []
    with pytest.raises(ValueError, match="factor >= 2"):
        TierPolicy(factor=1)


def test_index_add_on_an_engine_whose_index_manifest_is_lost_refuses(tmp_path, capsys):
    """D1 (the trial's reproduction): with ``index/manifest.json`` deleted, `d2r index add` of one photo
    trained a new codebook, deleted the old segments and reported a healthy 1-image index. Now it refuses
    before any work (exit 1, one line naming the manifest and pointing at repair), and `d2r index repair`
    restores the index."""
    from PIL import Image

    from d2r.cli import main
    from tests.corpus import textured

    rng = np.random.default_rng(4)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(4):
        Image.fromarray(textured(rng, 160, 200)).save(photos / f"p{i}.png")
    extra = tmp_path / "extra.png"
    Image.fromarray(textured(rng, 160, 200)).save(extra)
    engine = tmp_path / "E"
    assert main(["index", "create", str(engine), "--codebook-size", "16", "--images", str(photos), "--quiet"]) == 0
    book = (engine / "index" / "codebook.npz").read_bytes()
    (engine / "index" / "manifest.json").unlink()
    capsys.readouterr()
    assert main(["index", "add", str(engine), str(extra), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "index/manifest.json: missing" in err and "d2r index repair" in err
    assert (engine / "index" / "codebook.npz").read_bytes() == book  # nothing was trained or written
    assert main(["index", "check", str(engine), "--quiet"]) == 1
    assert main(["index", "repair", str(engine), "--quiet"]) == 0
    assert main(["index", "add", str(engine), str(extra), "--quiet", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["images_in_index"] == 5 and not out["codebook_trained"]


def test_index_check_and_repair_work_on_a_feature_store(tmp_path, capsys):
    """D1/D7: the feature store's damage message points at `d2r index check` and `d2r index repair`, which
    only looked at `index/`: on a store folder they now check it and restore its lost manifest."""
    from d2r.cli import main

    path = tmp_path / "store"
    ids = _built(StoreKind, path)
    (path / "manifest.json").unlink()
    capsys.readouterr()
    assert main(["index", "check", str(path)]) == 1
    assert "manifest.json" in capsys.readouterr().err
    assert main(["index", "repair", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["manifest_restored_from"].startswith("manifest-") and StoreKind.ids(path) == ids
    assert main(["index", "check", str(path), "--quiet"]) == 0


def test_index_commands_on_a_feature_store_say_what_it_is(tmp_path, capsys):
    """`d2r index info|check|repair` on a feature store (`d2r extract`'s output, an engine's features/) said
    "damaged manifest.json: not a d2r database manifest" and advised `d2r index repair` on it."""
    photos = write_photos(tmp_path / "photos", ["p0"], 8)
    eng = new_engine(tmp_path)
    assert d2r.cli.main(["index", "add", str(eng), str(photos), "--quiet"]) == 0
    capsys.readouterr()
    code, _, err = run_cli(capsys, "index", "info", eng / "features", "--quiet")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "a feature store, not an engine or index" in lines[0], err
    for action in ("check", "repair"):  # the feature store's own check and repair (its damage hint names them)
        code, out, err = run_cli(capsys, "index", action, eng / "features")
        assert code == 0 and "damaged" not in err and ("healthy" in out or "nothing to repair" in out), out
    assert run_cli(capsys, "index", "check", eng, "--quiet")[0] == 0
