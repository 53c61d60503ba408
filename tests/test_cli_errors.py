"""A bad-input corpus per command: one line on stderr naming the file or option, the right exit code
(1 failure, 2 usage, 3 partial), no traceback, no folder left behind, nothing already indexed lost."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import d2r
import d2r.cli
from d2r.engine import Engine
from tests.corpus import CODEBOOK, new_engine, run_cli, textured, write_photos

REPO = Path(__file__).resolve().parents[1]


def _one_line_error(code, err, expected_code, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected_code, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    for i in range(4):
        Image.fromarray(textured(rng, 240, 320)).save(folder / f"im{i}.png")
    return folder


@pytest.fixture(scope="module")
def books(tmp_path_factory):
    """Codebooks that do not fit RootSIFT, and a truncated one."""
    folder = tmp_path_factory.mktemp("books")
    rng = np.random.default_rng(4)
    d2r.Codebook(rng.random((16, 64), np.float32), {"feature": "rootsift"}).save(folder / "d64.npz")
    d2r.Codebook(rng.random((16, 128), np.float32), {"feature": "delf"}).save(folder / "delf.npz")
    pca_meta = {"feature": "rootsift", "pca_fingerprint": "0badc0de"}
    d2r.Codebook(rng.random((16, 128), np.float32), pca_meta).save(folder / "pca.npz")
    good = folder / "good.npz"
    d2r.Codebook(rng.random((16, 128), np.float32), {"feature": "rootsift"}).save(good)
    (folder / "truncated.npz").write_bytes(good.read_bytes()[:200])
    (folder / "bad.yaml").write_text("index:\n  kernel: [asmk\n")
    (folder / "typo.yaml").write_text("features:\n  options:\n    max_featres: 300\n")
    return folder


@pytest.fixture(scope="module")
def engine_dir(photos, tmp_path_factory):
    path = tmp_path_factory.mktemp("eng") / "engine"
    code = d2r.cli.main(["index", "create", str(path), "--codebook-size", "16",
                         "--set", "codebook.iterations=3",
                         "--set", "features.options.max_features=200", "--images", str(photos), "--quiet"])
    assert code == 0
    return path


def _create_cases(photos, books, tmp):
    """(argv after `index create DIR`, exit code, words the message must hold)."""
    return [
        (["--codebook", books / "truncated.npz"], 1, ["truncated.npz", "not a d2r codebook"]),
        (["--codebook", books / "missing.npz"], 1, ["missing.npz", "not found"]),
        (["--codebook", books / "d64.npz"], 1, ["d64.npz", "D=64"]),
        (["--codebook", books / "delf.npz"], 1, ["delf.npz", "'delf'"]),
        (["--codebook", books / "pca.npz"], 1, ["pca.npz", "PCA"]),
        (["--config", books / "bad.yaml"], 1, ["bad.yaml", "invalid YAML", "line"]),
        (["--config", books / "typo.yaml"], 1, ["features.options.max_featres", "unknown option"]),
        (["--config", books / "none.yaml"], 1, ["none.yaml", "not found"]),
        (["--set", "rerank.descriptor_distance=abc"], 1, ["rerank.descriptor_distance", "expected a number"]),
        (["--set", "index.kernl=asmk"], 1, ["index.kernl", "no option"]),
        (["--set", "nosection.x=1"], 1, ["nosection.x", "no section"]),
        (["--set", "batch_size"], 2, ["--set", "KEY=VALUE"]),  # a malformed flag value: usage (was exit 1)
        (["--set", "features.options.max_featres=3"], 1, ["features.options.max_featres", "unknown option"]),
        (["--set", "features.options.max_features=many"], 1, ["features.options.max_features", "integer"]),
        (["--set", "batch_size=0"], 1, ["batch_size", "positive"]),
        (["--regions", "foo", "--images", photos], 1, ["regions.proposer", "'foo'"]),
        (["--features", "delf", "--model", tmp / "no-model", "--images", photos], 1,
         ["features.model", "no-model"]),
        (["--features", "delf"], 1, ["features.model", "SavedModel"]),
        (["--model", tmp], 1, ["features.model", "rootsift takes no model"]),
        (["--images", tmp / "no-photos"], 1, ["--images", "no-photos"]),
        (["--codebook-size", "100000", "--images", photos], 1, ["codebook.size", "K=100000", "4 image(s)"]),
        (["--kernel", "bogus"], 2, ["--kernel"]),
        (["--codebook-size", "0"], 2, ["--codebook-size", "at least 1"]),  # a bad flag value: usage (was 1)
    ]


def test_index_create_bad_inputs_leave_no_folder(photos, books, tmp_path, capsys):
    for i, (extra, want, needles) in enumerate(_create_cases(photos, books, tmp_path)):
        target = tmp_path / f"eng{i}"
        code, _, err = run_cli(capsys, "index", "create", target, "--quiet", *extra)
        if want == 2:  # argparse: usage line + error line
            assert code == 2 and "Traceback" not in err and all(n in err for n in needles), err
        else:
            _one_line_error(code, err, want, *needles)
        assert not target.exists(), (extra, sorted(p.name for p in target.iterdir()))
    # the failed creates left nothing that blocks the right one
    code, _, err = run_cli(capsys, "index", "create", tmp_path / "eng0", "--codebook", books / "good.npz",
                        "--quiet")
    assert code == 0, err


@pytest.mark.parametrize("setting", ["codebook.iterations=0", "codebook.sample_per_image=0",
                                     "codebook.max_samples=0", "codebook.seed=-1", "regions.max_boxes=-1",
                                     "features.options.n_octave_layers=0"])
def test_settings_that_failed_late_are_refused_at_create(tmp_path, capsys, setting):
    """These were accepted by `d2r index create` (folder made); the codebook ones failed only after every
    image was extracted ("expected non-negative integer", "per_image and max_total must be ≥ 1"), max_boxes
    when the proposer was built, n_octave_layers=0 on every image (an OpenCV assertion)."""
    code, _, err = run_cli(capsys, "index", "create", tmp_path / "eng", "--regions", "grid", "--set", setting,
                        "--quiet")
    name = setting.split("=")[0].replace("features.options.", "")
    assert code == 1 and name in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "eng").exists()


@pytest.mark.parametrize("setting", ["index.alpha=-1", "index.alpha=0", "index.tau=2", "index.tau=1"])
def test_selectivity_settings_out_of_range_are_refused_at_create(tmp_path, capsys, setting):
    """`index.alpha` <= 0 and `index.tau` outside [-1, 1) were accepted by `d2r index create`: the folder was
    made and the engine saved with a selectivity no search can use."""
    code, out, err = run_cli(capsys, "index", "create", tmp_path / "eng", "--codebook", CODEBOOK, "--quiet",
                          "--set", setting)
    assert code != 0
    assert setting.split("=")[0].split(".")[1] in err and "Traceback" not in err
    assert not (tmp_path / "eng").exists()


def test_debug_shows_the_traceback(books, tmp_path):
    with pytest.raises(ValueError, match="truncated.npz"):
        d2r.cli.main(["index", "create", str(tmp_path / "e"), "--codebook", str(books / "truncated.npz"),
                      "--debug"])
    assert not (tmp_path / "e").exists()


def test_index_add_search_info_remove_bad_inputs(engine_dir, photos, tmp_path, capsys):
    work = tmp_path / "engine"
    shutil.copytree(engine_dir, work)
    before = len(Engine.open(work))
    assert before == 4
    # bad arguments: nothing indexed is lost
    code, _, err = run_cli(capsys, "index", "add", work, tmp_path / "no-such-folder", "--quiet")
    _one_line_error(code, err, 1, "no-such-folder")
    code, _, err = run_cli(capsys, "index", "remove", work, "nope")
    _one_line_error(code, err, 1, "nope", "not in the index")
    code, _, err = run_cli(capsys, "search", tmp_path / "missing.jpg", "--index", work)
    _one_line_error(code, err, 1, "missing.jpg")
    Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / "blank.png")
    code, out, err = run_cli(capsys, "search", tmp_path / "blank.png", "--index", work, "--json")
    _one_line_error(code, err, 1, "blank.png", "no local features")
    assert out == ""
    code, _, err = run_cli(capsys, "search", photos / "im0.png", "--index", work, "--top-k", "0")
    _one_line_error(code, err, 2, "--top-k")  # a bad flag value: usage
    code, _, err = run_cli(capsys, "search", photos / "im0.png", "--index", work, "--bbox", "1,2")
    assert code == 2 and "--bbox" in err and "four numbers" in err, err  # a malformed flag value: usage
    # a partial failure: exit 3 and a summary; the good image is indexed
    extra = tmp_path / "more"
    extra.mkdir()
    Image.fromarray(textured(np.random.default_rng(9), 240, 320)).save(extra / "good.png")
    (extra / "broken.jpg").write_bytes(b"not a jpeg")
    code, _, err = run_cli(capsys, "index", "add", work, extra, "--quiet")
    assert code == 3 and "broken.jpg" in err and "partial failure: 1 image(s) failed, 1 indexed" in err
    assert "Traceback" not in err
    assert len(Engine.open(work)) == before + 1
    # corrupt bookkeeping files: one line naming the file, for every command that opens the engine
    bad_config = json.dumps({"format": "d2r-engine", "config": {"index": {"kernl": 1}}})
    for name, content in [("engine.json", "{not json"), ("sources.json", "[1, 2"),
                          ("failures.json", "\x00\x01"), ("engine.json", bad_config)]:
        broken = tmp_path / f"broken-{name}"
        shutil.copytree(work, broken, dirs_exist_ok=True)
        (broken / name).write_text(content)
        for argv in (["index", "info", broken], ["index", "add", broken, extra, "--quiet"],
                     ["index", "remove", broken, "good"], ["search", photos / "im0.png", "--index", broken]):
            code, _, err = run_cli(capsys, *argv)
            _one_line_error(code, err, 1, name)
    # a region source gone since the engine was made: one error before any image, nothing marked failed
    broken = tmp_path / "broken-regions"
    shutil.copytree(work, broken)
    meta = json.loads((broken / "engine.json").read_text())
    meta["config"]["regions"]["proposer"] = str(tmp_path / "gone-detector")
    (broken / "engine.json").write_text(json.dumps(meta))
    failures = (broken / "failures.json").read_text()
    code, _, err = run_cli(capsys, "index", "add", broken, extra, "--quiet")
    _one_line_error(code, err, 1, "regions.proposer", "gone-detector")
    assert (broken / "failures.json").read_text() == failures
    # a manifest missing a key names the manifest
    broken = tmp_path / "broken-manifest"
    shutil.copytree(work, broken)
    manifest = json.loads((broken / "index" / "manifest.json").read_text())
    del manifest["codebook"]
    (broken / "index" / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_cli(capsys, "index", "info", broken)
    _one_line_error(code, err, 1, "manifest.json")
    # after all that, the engine still holds every image
    assert len(Engine.open(work)) == before + 1


@pytest.mark.parametrize("table, kind", [('{"x.png": ["x", 1]}', "a list"), ('{"x.png": 5}', "a number"),
                                         ('{"x.png": null}', "null"), ('["x.png"]', "a list")])
def test_a_failures_table_of_wrong_types_is_one_line_naming_it(engine_dir, photos, tmp_path, capsys, table,
                                                               kind):
    """D15: a failures.json whose reasons were a list or a number passed `check`, then `index add` crashed
    with an AttributeError traceback. Every command that reads it now names the file in one line (exit 1),
    check flags it and repair resets it."""
    work = tmp_path / "engine"
    shutil.copytree(engine_dir, work)
    (work / "failures.json").write_text(table)
    for argv in (["index", "add", work, photos, "--quiet"], ["index", "info", work], ["index", "check", work],
                 ["search", photos / "im0.png", "--index", work, "--quiet"]):
        code, _, err = run_cli(capsys, *argv)
        _one_line_error(code, err, 1, "failures.json", kind)
    code, out, err = run_cli(capsys, "index", "repair", work, "--json")
    assert code == 0 and json.loads(out)["failures_reset"], (out, err)
    code, out, err = run_cli(capsys, "index", "add", work, photos, "--json")
    assert code == 0 and json.loads(out)["images_in_index"] == 4, err


@pytest.mark.parametrize("damage", ["index.num_assignments", "rerank.num_to_rerank", "features/manifest.json"])
def test_an_out_of_range_setting_or_a_lost_store_manifest_is_one_line_naming_it(engine_dir, photos, tmp_path,
                                                                               capsys, damage):
    """D13: an engine.json setting out of range (-7) or a deleted features/manifest.json of the engine was
    not named by the commands that read it. Each now fails in one line naming the setting's file or the
    manifest, `check` included."""
    work = tmp_path / "engine"
    shutil.copytree(engine_dir, work)
    if damage.endswith(".json"):
        (work / damage).unlink()
        name = damage
    else:
        meta = json.loads((work / "engine.json").read_text())
        section, key = damage.split(".")
        meta["config"][section][key] = -7
        (work / "engine.json").write_text(json.dumps(meta))
        name = "engine.json"
    for argv in (["index", "info", work], ["index", "check", work], ["index", "add", work, photos, "--quiet"],
                 ["search", photos / "im0.png", "--index", work, "--quiet"]):
        code, _, err = run_cli(capsys, *argv)
        _one_line_error(code, err, 1, name, *([damage, "-7"] if name == "engine.json" else []))


def test_a_binary_file_given_as_images_names_the_file(tmp_path, capsys):
    """A non-image, non-text file (e.g. a codebook passed by mistake) is read as a list file: the error was
    "'utf-8' codec can't decode byte ..." without the file's name (index add, search, extract, train-codebook)."""
    eng = new_engine(tmp_path)
    write_photos(tmp_path / "photos", ["p0"], 5)
    assert d2r.cli.main(["index", "add", str(eng), str(tmp_path / "photos"), "--quiet"]) == 0
    capsys.readouterr()
    binary = tmp_path / "book.npz"
    binary.write_bytes(CODEBOOK.read_bytes())
    for argv in (["index", "add", eng, binary], ["search", binary, "--index", eng],
                 ["extract", "--images", binary, "--features", "rootsift", "--out", tmp_path / "store"],
                 ["train-codebook", "--images", binary, "--size", 4, "--out", tmp_path / "cb.npz"]):
        code, _, err = run_cli(capsys, *argv, "--quiet")
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and f"{binary}: not a text list file" in lines[0], (argv, err)
    assert not (tmp_path / "store").exists()


def test_remove_of_an_unknown_id_is_an_error_line(tmp_path, capsys):
    """`d2r index remove` of an unknown id printed "d2r index remove: not in the index: ..." (no "error:", no
    engine named), unlike every other failure line."""
    eng = new_engine(tmp_path)
    code, out, err = run_cli(capsys, "index", "remove", eng, "nope", "--json")
    assert code == 1 and not out and err.strip() == f"d2r index remove: error: {eng}: not in the index: nope"


def test_search_of_an_empty_index_is_an_error(tmp_path, capsys):
    """`d2r search` of an index whose images were all removed (or a created, never filled one) printed an
    empty table and exited 0; `d2r serve` answers 409 "the index is empty"."""
    photos = write_photos(tmp_path / "photos", ["p0"], 12)
    eng = new_engine(tmp_path)
    assert d2r.cli.main(["index", "add", str(eng), str(photos), "--quiet"]) == 0
    assert d2r.cli.main(["index", "remove", str(eng), "p0", "--quiet"]) == 0
    capsys.readouterr()
    code, out, err = run_cli(capsys, "search", photos / "p0.png", "--index", eng, "--json")
    assert code == 1 and not out and err.strip() == f"d2r search: error: {eng}: the index is empty (every image " \
                                                    "removed, or none indexed yet)", err


def test_repair_reindex_of_a_database_folder_is_a_prefixed_usage_error(tmp_path, capsys):
    """`d2r index repair DB --reindex` printed "error: ..." without the command's name (exit 2)."""
    photos = write_photos(tmp_path / "photos", ["p0"], 13)
    eng = new_engine(tmp_path)
    assert d2r.cli.main(["index", "add", str(eng), str(photos), "--quiet"]) == 0
    capsys.readouterr()
    code, _, err = run_cli(capsys, "index", "repair", eng / "index", "--reindex")
    assert code == 2 and err.startswith(f"d2r index repair: error: {eng / 'index'}: --reindex needs an engine"), err


def test_extract_train_import_bench_bad_inputs(photos, books, tmp_path, capsys):
    store = tmp_path / "store"
    bench = ["bench", "revisitop", "--gnd", tmp_path / "gnd.pkl", "--images-root", photos,
             "--out", tmp_path / "run"]
    cases = [
        (["extract", "--images", tmp_path / "none", "--features", "rootsift", "--out", store], 1, ["none"]),
        (["extract", "--images", photos, "--features", "rootsift", "--model", tmp_path, "--out", store], 2,
         ["--model"]),
        (["extract", "--images", photos, "--features", "rootsift", "--max-features", "0", "--out", store], 2,
         ["--max-features"]),
        (["extract", "--images", photos, "--features", "delf", "--model", tmp_path / "m", "--out", store], 1,
         ["features.model"]),
        (["train-codebook", "--descriptors", books / "truncated.npz", "--size", "4",
          "--out", tmp_path / "o.npz"], 1, ["truncated.npz"]),
        (["train-codebook", "--store", tmp_path / "nostore", "--size", "4", "--out", tmp_path / "o.npz"], 1,
         ["nostore"]),
        (["train-codebook", "--images", photos, "--size", "4", "--out", tmp_path / "nodir" / "o.npz"], 1,
         ["nodir"]),
        (["import-codebook", tmp_path / "no-ckpt", "--out", tmp_path / "o.npz"], 1, ["no-ckpt"]),
        (bench + [], 1, ["gnd.pkl"]),
        (bench + ["--config", books / "bad.yaml"], 1, ["bad.yaml", "invalid YAML"]),
        (bench + ["--set", "rerank.descriptor_distance=abc"], 1, ["rerank.descriptor_distance"]),
    ]
    for argv, want, needles in cases:
        code, _, err = run_cli(capsys, *argv)
        if want == 2:
            assert code == 2 and "Traceback" not in err and all(n in err for n in needles), (argv, err)
        else:
            _one_line_error(code, err, want, *needles)
    assert not store.exists() and not (tmp_path / "run").exists() and not (tmp_path / "o.npz").exists()
    # a partial failure: exit 3 and a summary naming where the reasons are
    mixed = tmp_path / "mixed"
    shutil.copytree(photos, mixed)
    (mixed / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    code, _, err = run_cli(capsys, "extract", "--images", mixed, "--features", "rootsift", "--out", store,
                        "--quiet")
    assert code == 3 and "partial failure: 1 image(s) failed, 4 extracted" in err and "Traceback" not in err


def test_bench_validates_before_touching_images(photos, books, tmp_path, capsys):
    """A real ground truth and a codebook that does not fit: refused before the cache or run folder exists."""
    import pickle

    gnd = tmp_path / "gnd.pkl"
    gnd.write_bytes(pickle.dumps({"imlist": ["im0.png", "im1.png"], "qimlist": ["im0.png"],
                                  "gnd": [{"easy": [1], "hard": [], "junk": [], "bbx": None}]}))
    for extra, needles in [(["--codebook", books / "d64.npz"], ["d64.npz", "D=64"]),
                           (["--detector", "foo"], ["regions.proposer"]),
                           (["--set", "features.options.max_featres=1"], ["max_featres"])]:
        code, _, err = run_cli(capsys, "bench", "revisitop", "--gnd", gnd, "--images-root", photos,
                            "--out", tmp_path / "run", "--quiet", *extra)
        _one_line_error(code, err, 1, *needles)
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("protocol", ["revisitop", "gldv2"])
def test_bench_top_k_below_one_is_a_usage_error(tmp_path, capsys, protocol):
    """`d2r bench revisitop --top-k -5` extracted, indexed, then failed with "negative dimensions are not
    allowed" (an index/ folder left behind); --top-k 0 silently meant the default depth."""
    inputs = (["--gnd", tmp_path / "gnd.pkl"] if protocol == "revisitop" else
              ["--index-csv", tmp_path / "i.csv", "--test-csv", tmp_path / "t.csv", "--solution-csv",
               tmp_path / "s.csv"])
    for k in (0, -5):
        code, _, err = run_cli(capsys, "bench", protocol, *inputs, "--images-root", tmp_path, "--top-k", k,
                            "--out", tmp_path / "run", "--quiet")
        assert code == 2 and "--top-k must be at least 1" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "run").exists()


def _gldv2_csvs(tmp_path):
    (tmp_path / "index.csv").write_text("id\n0123456789abcdef\n")
    (tmp_path / "test.csv").write_text("id\nfedcba9876543210\n")
    (tmp_path / "solution.csv").write_text("id,images,Usage\nfedcba9876543210,0123456789abcdef,Public\n")
    (tmp_path / "binary.csv").write_bytes(b"\x00\x01\xff\xfe")
    return {k: tmp_path / f"{k}.csv" for k in ("index", "test", "solution", "binary")}


@pytest.mark.parametrize("bad", ["index-missing", "index-binary", "index-folder", "solution-binary"])
def test_bench_gldv2_unreadable_csv_named(tmp_path, capsys, bad):
    """An unreadable GLDv2 CSV gave '[Errno 2] No such file...' or "'utf-8' codec can't decode..." (no file
    named)."""
    csvs = _gldv2_csvs(tmp_path)
    which, problem = bad.split("-")
    csvs[which] = {"missing": tmp_path / "nope.csv", "binary": csvs["binary"], "folder": tmp_path}[problem]
    code, _, err = run_cli(capsys, "bench", "gldv2", "--index-csv", csvs["index"], "--test-csv", csvs["test"],
                        "--solution-csv", csvs["solution"], "--images-root", tmp_path,
                        "--out", tmp_path / "run",
                        "--codebook", CODEBOOK, "--quiet")
    assert code == 1 and f"error: {csvs[which]}: " in err and len(err.strip().splitlines()) == 1, err


def test_bench_out_that_is_a_file_refused_first(tmp_path, capsys):
    """`--out FILE` failed late with '[Errno 20] Not a directory: FILE/cache/db-...'."""
    csvs = _gldv2_csvs(tmp_path)
    code, _, err = run_cli(capsys, "bench", "gldv2", "--index-csv", csvs["index"], "--test-csv", csvs["test"],
                        "--solution-csv", csvs["solution"], "--images-root", tmp_path, "--out", csvs["test"],
                        "--codebook", CODEBOOK, "--quiet")
    assert code == 1 and f"--out {csvs['test']}: exists and is not a folder" in err, err


def test_subprocess_prints_one_line_and_debug_prints_a_traceback(books, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    argv = [sys.executable, "-m", "d2r", "index", "create", str(tmp_path / "e"),
            "--config", str(books / "bad.yaml")]
    run = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 1 and run.stderr.count("\n") == 1 and "bad.yaml" in run.stderr, run.stderr
    run = subprocess.run(argv + ["--debug"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 1 and "Traceback" in run.stderr
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_quiet_hides_tensorflow_log_lines(tmp_path):
    """`d2r import-codebook BAD --quiet` printed TensorFlow's C++ info/warning lines (cpu_feature_guard,
    tensor_slice_reader "Could not open ...") around the one error line."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("tensorflow is not installed")
    bad = tmp_path / "bad.ckpt"
    bad.write_text("not a checkpoint")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-m", "d2r", "import-codebook", str(bad), "--out",
                           str(tmp_path / "cb.npz"), "--quiet"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("d2r import-codebook: error:")
    assert "cpu_feature_guard" not in proc.stderr and "tensor_slice_reader" not in proc.stderr, proc.stderr


def test_a_closed_output_pipe_is_not_an_error_line(tmp_path):
    """`d2r index info ENGINE | head -1` printed "d2r index info: error: [Errno 32] Broken pipe"."""
    import os
    import subprocess
    import sys

    eng = new_engine(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "d2r", "index", "info", str(eng), "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before d2r writes
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Broken pipe" not in err and "Error" not in err and not err.strip(), err


def test_no_images_is_one_error_in_every_command(tmp_path, capsys):
    """An empty folder was a silent success in `index add`, `index create --images` and
    `extract`, and an unnamed error ("no descriptors found: the source is empty") in `index create`; now one
    line naming the folder, exit 1, nothing created, in every command."""
    empty = tmp_path / "emptydir"
    empty.mkdir()
    (empty / "README.txt").write_text("not a photo")
    books = tmp_path / "books"
    books.mkdir()
    d2r.Codebook(np.random.default_rng(0).random((16, 128), np.float32), {"feature": "rootsift"}).save(
        books / "cb.npz")
    eng = tmp_path / "eng"
    assert run_cli(capsys, "index", "create", eng, "--codebook", books / "cb.npz", "--quiet")[0] == 0
    cases = [["index", "add", eng, empty],
             ["index", "create", tmp_path / "e1", "--images", empty],
             ["index", "create", tmp_path / "e2", "--codebook", books / "cb.npz", "--images", empty],
             ["extract", "--images", empty, "--features", "rootsift", "--out", tmp_path / "st"],
             ["train-codebook", "--images", empty, "--size", "4", "--out", tmp_path / "o.npz"]]
    for argv in cases:
        code, _, err = run_cli(capsys, *argv)
        _one_line_error(code, err, 1, f"{empty}: no images found")
    assert not any((tmp_path / name).exists() for name in ("e1", "e2", "st", "o.npz"))
    assert not (eng / "features").exists() or len(Engine.open(eng)) == 0


def test_contradictions_and_malformed_flag_values_are_usage_errors(books, tmp_path, capsys):
    """`--codebook F --codebook-size K` silently ignored K, `--set KEY` (no '=')
    exited 1 in `bench`; `d2r --help` left out exit code 130."""
    code, _, err = run_cli(capsys, "index", "create", tmp_path / "e", "--codebook", books / "good.npz",
                           "--codebook-size", "64")
    _one_line_error(code, err, 2, "--codebook", "--codebook-size")
    assert not (tmp_path / "e").exists()
    code, _, err = run_cli(capsys, "bench", "revisitop", "--gnd", "g.pkl", "--images-root", tmp_path,
                           "--out", tmp_path / "run", "--set", "rerank.descriptor_distance")
    assert code == 2 and "KEY=VALUE" in err and not (tmp_path / "run").exists()
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "130 interrupted" in out


def test_flag_combinations_are_usage_errors(tmp_path, capsys):
    """Flag checks of `d2r search` (--bbox with several queries, --workers 0) and `d2r serve` (--port,
    --max-upload-mb) exited 1 as failures instead of 2 as usage errors, and `d2r index add --store`
    silently ignored --id-prefix and --retry-failed."""
    def usage(*args):
        code, _, err = run_cli(capsys, *args)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, (args, err)
        return lines[0]

    q = [tmp_path / "a.png", tmp_path / "b.png"]
    assert "--bbox" in usage("search", *q, "--index", tmp_path / "eng", "--bbox", "1,2,3,4")
    assert "--workers" in usage("search", q[0], "--index", tmp_path / "eng", "--workers", "0")
    assert "--port" in usage("serve", tmp_path / "eng", "--port", "70000")
    assert "--max-upload-mb" in usage("serve", tmp_path / "eng", "--max-upload-mb", "0")
    add = ("index", "add", tmp_path / "eng", "--store", tmp_path / "s")
    assert "--id-prefix" in usage(*add, "--id-prefix", "x/")
    assert "--retry-failed" in usage(*add, "--retry-failed")
    assert "--lock-timeout" in usage("index", "repair", tmp_path / "eng", "--lock-timeout", "-2")
    assert not (tmp_path / "eng").exists()


def test_bench_json_is_a_flag_and_json_out_a_file(tmp_path):
    """`--json` took a FILE in `bench` and was a flag elsewhere."""
    parser = d2r.cli.build_parser()
    common = ["--images-root", str(tmp_path), "--out", str(tmp_path / "r")]
    args = parser.parse_args(["bench", "revisitop", "--gnd", "g.pkl", *common, "--json"])
    assert args.json == "-" and args.json_out is None
    args = parser.parse_args(["bench", "compare", "a", "b", "--json", "-", "--json-out", "c.json"])
    assert args.json == "-" and args.json_out == "c.json"
    assert parser.parse_args(["bench", "compare", "a", "b"]).json is None


def test_a_file_that_is_not_a_codebook_says_so(tmp_path, capsys):
    """A text file given as the codebook got numpy's advice to load it with allow_pickle."""
    text = tmp_path / "notnpz.npz"
    text.write_text("just some text\n")
    code, _, err = run_cli(capsys, "index", "create", tmp_path / "e", "--codebook", text)
    _one_line_error(code, err, 1, "notnpz.npz", "not a d2r codebook")
    assert "pickle" not in err and not (tmp_path / "e").exists()


@pytest.mark.parametrize("kind", ["npy", "folder", "list-metadata"])
def test_unreadable_codebook_is_a_one_line_error(tmp_path, capsys, kind):
    """A .npy array given as --codebook was an "unexpected error (TypeError)"; a folder was "not found"."""
    book = tmp_path / f"book.{kind}"
    if kind == "npy":
        np.save(book, np.ones((16, 128), np.float32))
    elif kind == "folder":
        book.mkdir()
    else:
        np.savez(book, centroids=np.ones((16, 128), np.float32), metadata=np.array(json.dumps([1, 2])))
        book = book.with_name(book.name + ".npz")
    code, out, err = run_cli(capsys, "index", "create", tmp_path / "eng", "--codebook", book, "--quiet")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "unexpected" not in err and f"{book}: " in lines[0], err
    assert not (tmp_path / "eng").exists()
    with pytest.raises(ValueError if kind != "folder" else OSError, match=str(book)):
        d2r.Codebook.load(book)


def test_serve_help_gives_the_readme_install_command(capsys):
    """Newcomer 13: `d2r serve --help` said `pip install 'd2r[serve]'`, which outside the checkout fetches a
    different PyPI package; the README's command is `pip install -e ".[serve]"`. Kept out of
    the serve tests, which skip without FastAPI: the help is read before the extra is installed."""
    with pytest.raises(SystemExit):
        d2r.cli.main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert 'pip install -e ".[serve]"' in text and "d2r[serve]" not in text
    assert 'pip install -e ".[serve]"' in (REPO / "README.md").read_text()


def _subparsers(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def test_help_describes_every_index_subcommand_and_every_option(capsys):
    """`index create|add|remove|info|check|repair --help` had no description paragraph,
    `repair` said `--lock-timeout LOCK_TIMEOUT` where the others said SECONDS, and several `train-codebook`
    options had no help text."""
    commands = dict(_subparsers(d2r.cli.build_parser()))
    index = dict(_subparsers(commands["index"]))
    assert {"create", "add", "remove", "info", "check", "repair"} <= set(index)
    for name, p in index.items():
        assert p.description and len(p.description) > 40, name
    lock = [a for p in list(index.values()) + [commands["extract"]] for a in p._actions
            if "--lock-timeout" in a.option_strings]
    assert len(lock) >= 5 and {a.metavar for a in lock} == {"SECONDS"}
    code, out, _ = run_cli(capsys, "index", "repair", "--help")
    assert code == 0 and "--lock-timeout SECONDS" in out and "--reindex" in out
    # --seed, --method and --init are documented by the k-means seeding work
    for a in commands["train-codebook"]._actions:
        if a.option_strings and not {"-h", "--seed", "--method", "--init"} & set(a.option_strings):
            assert a.help, a.option_strings
