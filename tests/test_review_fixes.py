"""Regression tests for defects found by using d2r as a new user would (the review round): each test failed
before its fix."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import d2r.cli
from d2r.engine import Engine
from tests.corpus import run_cli, write_photos

CODEBOOK = Path(__file__).resolve().parents[1] / "codebooks" / "rootsift-128d-k256-skimage-s0.npz"


def _engine(tmp_path) -> Path:
    eng = tmp_path / "eng"
    code = d2r.cli.main(["index", "create", str(eng), "--codebook", str(CODEBOOK), "--quiet",
                         "--set", "features.options.max_features=200", "--set", "rerank.num_to_rerank=3"])
    assert code == 0
    return eng


def test_index_add_takes_several_folders_and_list_files(tmp_path, capsys):
    """`d2r index add DIR A B` failed both folders ("is a directory, not an image file", exit 1)."""
    a = write_photos(tmp_path / "A", ["a0", "a1"], 1)
    b = write_photos(tmp_path / "B" / "sub", ["b0"], 2).parent
    c = write_photos(tmp_path / "C", ["c0"], 3)
    listing = tmp_path / "list.txt"
    listing.write_text("C/c0.png\n")
    eng = _engine(tmp_path)
    code, out, err = run_cli(capsys, "index", "add", eng, a, b, listing, "--json", "--quiet")
    report = json.loads(out)
    assert code == 0 and report["failed"] == {} and report["indexed"] == 4, err
    engine = Engine.open(eng)
    assert {"a0", "a1", "sub/b0", "C/c0"} <= set(engine._sources)  # ids relative to each folder / list file
    assert c.is_dir()


def test_interrupted_create_keeps_the_engine_and_resumes(tmp_path, capsys, monkeypatch):
    """Ctrl-C during `d2r index create --images` deleted the whole engine folder (features extracted so far
    included), so nothing could be resumed."""
    photos = write_photos(tmp_path / "photos", ["p0", "p1", "p2"], 4)
    eng = tmp_path / "eng"

    def interrupted(*args, **kwargs):  # Ctrl-C after the features were extracted and flushed to the store
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Engine, "_index_stored", interrupted)
        code, _, err = run_cli(capsys, "index", "create", eng, "--codebook", CODEBOOK, "--images", photos, "--quiet")
    assert code == 130 and "interrupted" in err and f"d2r index add {eng} {photos}" in err
    assert (eng / "engine.json").is_file()
    from d2r.features.store import FeatureStore

    assert len(FeatureStore.open(eng / "features").ids()) == 3  # the extraction is kept
    code, out, err = run_cli(capsys, "index", "add", eng, photos, "--json", "--quiet")
    assert code == 0 and json.loads(out)["indexed"] == 3 and len(Engine.open(eng)) == 3, err


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


def test_a_binary_file_given_as_images_names_the_file(tmp_path, capsys):
    """A non-image, non-text file (e.g. a codebook passed by mistake) is read as a list file: the error was
    "'utf-8' codec can't decode byte ..." without the file's name (index add, search, extract, train-codebook)."""
    eng = _engine(tmp_path)
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


def test_serve_on_a_port_in_use_is_a_one_line_error(tmp_path, capsys):
    """`d2r serve` on a busy port logged uvicorn's error and exited with 3 (documented: partial failure)."""
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    import socket

    eng = _engine(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = run_cli(capsys, "serve", eng, "--port", port, "--quiet")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and f"--port {port}: cannot listen there" in lines[0], err


def test_bench_compare_errors_and_flags(tmp_path, capsys):
    """`d2r bench compare`: --resamples 0 was "index -1 is out of bounds" (exit 1), a missing run a raw
    "[Errno 2] ..." and a non-JSON metrics file "Expecting value ..." without the file's name, none with the
    "error:" prefix; --quiet (README: every command takes it) was a usage error; its help showed "95%%"."""
    run = tmp_path / "run"
    run.mkdir()
    per_query = {"queries": ["q0", "q1"], "stages": ["initial"], "easy": {"initial": [0.5, 1.0]},
                 "medium": {"initial": [0.5, 1.0]}, "hard": {"initial": [0.0, 0.25]}}
    (run / "metrics.json").write_text(json.dumps({"per_query": per_query}))
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    code, _, err = run_cli(capsys, "bench", "compare", run, run, "--resamples", 0)
    assert code == 2 and err.strip() == "d2r bench compare: error: --resamples must be at least 1, got 0"
    code, _, err = run_cli(capsys, "bench", "compare", run, tmp_path / "nope")
    assert code == 1 and err.startswith(f"d2r bench compare: error: {tmp_path / 'nope'}: ") and "Errno" not in err
    code, _, err = run_cli(capsys, "bench", "compare", run, bad)
    assert code == 1 and err.startswith(f"d2r bench compare: error: {bad}: not a metrics JSON"), err
    code, out, err = run_cli(capsys, "bench", "compare", run, run, "--quiet", "--resamples", 10)
    assert code == 0 and "medium" in out and not err, err
    code, out, _ = run_cli(capsys, "bench", "compare", "--help")
    assert code == 0 and "95% interval" in " ".join(out.split())


def test_quiet_index_and_search_print_no_log_lines(tmp_path):
    """`--quiet` ("no progress bars or log lines") still printed a WARNING log line for each failed image or
    featureless query, besides the command's own listing of the same failure."""
    import os
    import subprocess
    import sys

    eng = _engine(tmp_path)
    photos = write_photos(tmp_path / "photos", ["p0"], 6)
    (photos / "broken.jpg").write_bytes(b"not an image")
    Image.new("RGB", (200, 200), (90, 90, 90)).save(tmp_path / "blank.png")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    runs = [(["index", "add", eng, photos], 3), (["search", photos / "p0.png", tmp_path / "blank.png",
                                                  "--index", eng], 3)]
    for argv, expected in runs:
        proc = subprocess.run([sys.executable, "-m", "d2r", *map(str, argv), "--quiet"], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == expected, proc.stderr
        assert "WARNING" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 2, proc.stderr


def test_remove_of_an_unknown_id_is_an_error_line(tmp_path, capsys):
    """`d2r index remove` of an unknown id printed "d2r index remove: not in the index: ..." (no "error:", no
    engine named), unlike every other failure line."""
    eng = _engine(tmp_path)
    code, out, err = run_cli(capsys, "index", "remove", eng, "nope", "--json")
    assert code == 1 and not out and err.strip() == f"d2r index remove: error: {eng}: not in the index: nope"


@pytest.mark.parametrize("flag", ["--iterations", "--sample-per-image", "--max-samples", "--batch-size"])
def test_train_codebook_counts_are_usage_errors_naming_the_flag(tmp_path, capsys, flag):
    """`d2r train-codebook --iterations 0` failed (exit 1) with "iterations must be ≥ 1", --max-samples 0 with
    "per_image and max_total must be ≥ 1", after reading the data; --batch-size 0 was accepted."""
    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng(0).random((64, 128), np.float32))
    code, _, err = run_cli(capsys, "train-codebook", "--descriptors", x, "--size", 4, "--out", tmp_path / "cb.npz",
                        flag, 0, "--quiet")
    assert code == 2 and err.strip() == f"d2r train-codebook: error: {flag} must be positive, got 0", err
    assert not (tmp_path / "cb.npz").exists()


def test_a_config_section_that_is_not_a_mapping_is_named(tmp_path, capsys):
    """`index: 5` in a --config file was "unexpected error (AttributeError): 'int' object has no attribute
    'check'"."""
    from d2r.engine.config import EngineConfig

    config = tmp_path / "c.yaml"
    config.write_text("index: 5\n")
    code, _, err = run_cli(capsys, "index", "create", tmp_path / "eng", "--config", config, "--quiet")
    assert code == 1 and err.strip() == "d2r index create: error: index: expected a mapping, got 5", err
    assert not (tmp_path / "eng").exists()
    with pytest.raises(ValueError, match="rerank: expected a mapping"):
        EngineConfig.from_dict({"rerank": [1]})


def test_serve_follows_another_process_writing_the_engine(tmp_path):
    """`d2r serve` opened the engine once: images added by `d2r index add` meanwhile were "unknown", and once
    `d2r index remove` dropped an image's features, every search that verified it failed with a 500
    (KeyError: not in the feature store)."""
    from d2r.serve.app import Service

    photos = write_photos(tmp_path / "photos", ["p0", "p1", "p2"], 7)
    eng = _engine(tmp_path)
    Engine.open(eng).index([photos / "p0.png", photos / "p1.png"], progress=False)
    service = Service(eng)
    assert service.health()["images"] == 2
    writer = Engine.open(eng)  # another process's engine (`d2r index add`, `d2r index remove`)
    writer.index([("p2", photos / "p2.png")], progress=False)
    found = service.search(None, None, "p2", None, top_k=3, rerank=True)  # was ApiError 404: unknown image id
    assert found["hits"][0]["image_id"] == "p2" and service.health()["images"] == 3
    victim = found["hits"][1]["image_id"]
    writer.remove(victim)
    hits = service.search(None, None, "p2", None, top_k=3, rerank=True)["hits"]  # was KeyError (HTTP 500)
    assert victim not in [h["image_id"] for h in hits] and service.health()["images"] == 2


def test_index_commands_on_a_feature_store_say_what_it_is(tmp_path, capsys):
    """`d2r index info|check|repair` on a feature store (`d2r extract`'s output, an engine's features/) said
    "damaged manifest.json: not a d2r database manifest" and advised `d2r index repair` on it."""
    photos = write_photos(tmp_path / "photos", ["p0"], 8)
    eng = _engine(tmp_path)
    assert d2r.cli.main(["index", "add", str(eng), str(photos), "--quiet"]) == 0
    capsys.readouterr()
    for action in ("info", "check", "repair"):
        code, _, err = run_cli(capsys, "index", action, eng / "features", "--quiet")
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and "a feature store, not an engine or index" in lines[0], err
        assert "damaged" not in err
    assert run_cli(capsys, "index", "check", eng, "--quiet")[0] == 0


def test_demo_checks_its_flags_first(tmp_path, capsys):
    """`d2r demo --top-k 0` ran the whole demo and reported "0/10 queries have the right instance first"
    (exit 0); --out naming a file failed late with "[Errno 20] Not a directory: '.../images'"."""
    code, out, err = run_cli(capsys, "demo", "--top-k", 0, "--out", tmp_path / "demo", "--quiet")
    assert code == 2 and err.strip() == "d2r demo: error: --top-k must be at least 1, got 0" and not out
    assert not (tmp_path / "demo").exists()
    taken = tmp_path / "file"
    taken.write_text("x")
    code, _, err = run_cli(capsys, "demo", "--out", taken, "--quiet")
    assert code == 1 and err.strip() == f"d2r demo: error: --out {taken}: exists and is not a folder", err


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


def test_a_broken_symbolic_link_in_a_folder_is_reported(tmp_path, capsys):
    """A dangling symbolic link named like an image was silently skipped by `d2r index add FOLDER` (exit 0)."""
    photos = write_photos(tmp_path / "photos", ["p0"], 9)
    (photos / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    eng = _engine(tmp_path)
    code, out, err = run_cli(capsys, "index", "add", eng, photos, "--json", "--quiet")
    report = json.loads(out)
    assert code == 3 and report["indexed"] == 1, err
    assert "broken symbolic link" in report["failed"][str(photos / "gone.jpg")]


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


def test_the_same_shard_twice_is_refused(tmp_path, capsys):
    """`d2r search Q --index E --index E` (or E and E/index) searched the shard twice: every hit twice."""
    photos = write_photos(tmp_path / "photos", ["p0", "p1"], 10)
    eng = _engine(tmp_path)
    assert d2r.cli.main(["index", "add", str(eng), str(photos), "--quiet"]) == 0
    capsys.readouterr()
    for other in (eng, eng / "index", tmp_path / "." / "eng"):
        code, out, err = run_cli(capsys, "search", photos / "p0.png", "--index", eng, "--index", other, "--quiet")
        assert code == 1 and not out and "the same shard as" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("name", ["engine.json", "sources.json", "failures.json"])
def test_index_check_reads_the_engine_tables(tmp_path, capsys, name):
    """With engine.json, sources.json or failures.json garbled, every command failed on it but `d2r index check`
    said "healthy" (exit 0)."""
    photos = write_photos(tmp_path / "photos", ["p0"], 11)
    eng = _engine(tmp_path)
    assert d2r.cli.main(["index", "add", str(eng), str(photos), "--quiet"]) == 0
    capsys.readouterr()
    (eng / name).write_text("{garbled")
    code, out, err = run_cli(capsys, "index", "check", eng, "--json")
    report = json.loads(out)
    assert code == 1 and not report["healthy"] and [d["file"] for d in report["damaged"]] == [name], err
    assert "invalid JSON" in report["damaged"][0]["problem"]


def test_search_of_an_empty_index_is_an_error(tmp_path, capsys):
    """`d2r search` of an index whose images were all removed (or a created, never filled one) printed an
    empty table and exited 0; `d2r serve` answers 409 "the index is empty"."""
    photos = write_photos(tmp_path / "photos", ["p0"], 12)
    eng = _engine(tmp_path)
    assert d2r.cli.main(["index", "add", str(eng), str(photos), "--quiet"]) == 0
    assert d2r.cli.main(["index", "remove", str(eng), "p0", "--quiet"]) == 0
    capsys.readouterr()
    code, out, err = run_cli(capsys, "search", photos / "p0.png", "--index", eng, "--json")
    assert code == 1 and not out and err.strip() == f"d2r search: error: {eng}: the index is empty (every image " \
                                                    "removed, or none indexed yet)", err


def test_repair_reindex_of_a_database_folder_is_a_prefixed_usage_error(tmp_path, capsys):
    """`d2r index repair DB --reindex` printed "error: ..." without the command's name (exit 2)."""
    photos = write_photos(tmp_path / "photos", ["p0"], 13)
    eng = _engine(tmp_path)
    assert d2r.cli.main(["index", "add", str(eng), str(photos), "--quiet"]) == 0
    capsys.readouterr()
    code, _, err = run_cli(capsys, "index", "repair", eng / "index", "--reindex")
    assert code == 2 and err.startswith(f"d2r index repair: error: {eng / 'index'}: --reindex needs an engine"), err


@pytest.mark.slow
def test_a_relative_model_path_works_from_another_folder(tmp_path, monkeypatch):
    """`d2r index create eng --features delf --model m` saved "m" in engine.json: every later command run from
    another folder failed to find the model."""
    pytest.importorskip("tensorflow")
    from tests.test_delf import build_delf_model, two_layer_backbone

    from d2r.features.delf import DELF, DELFConfig

    dlf = DELF.from_keras(model=build_delf_model(two_layer_backbone(), attention_hidden=8),
                          config=DELFConfig(scales=(1.0,), score_threshold=0.0))
    dlf.fit_pca([np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)], dim=4)
    dlf.export(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    assert d2r.cli.main(["index", "create", "eng", "--features", "delf", "--model", "m", "--quiet"]) == 0
    saved = json.loads((tmp_path / "eng" / "engine.json").read_text())["config"]["features"]["model"]
    assert saved == str(tmp_path / "m")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert Engine.open(tmp_path / "eng").extractor is not None  # the model loads from another folder


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


def test_a_closed_output_pipe_is_not_an_error_line(tmp_path):
    """`d2r index info ENGINE | head -1` printed "d2r index info: error: [Errno 32] Broken pipe"."""
    import os
    import subprocess
    import sys

    eng = _engine(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "d2r", "index", "info", str(eng), "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before d2r writes
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Broken pipe" not in err and "Error" not in err and not err.strip(), err


@pytest.mark.parametrize("setting", ["index.alpha=-1", "index.alpha=0", "index.tau=2", "index.tau=1"])
def test_selectivity_settings_out_of_range_are_refused_at_create(tmp_path, capsys, setting):
    code, out, err = run_cli(capsys, "index", "create", tmp_path / "eng", "--codebook", CODEBOOK, "--quiet",
                          "--set", setting)
    assert code != 0
    assert setting.split("=")[0].split(".")[1] in err and "Traceback" not in err
    assert not (tmp_path / "eng").exists()


def test_ground_truth_json_and_compare_errors_name_the_file(tmp_path):
    from d2r.eval.compare import load_per_query, paired_difference
    from d2r.eval.revisitop import load_gnd

    gnd = {"imlist": ["a", "b", "c"], "qimlist": ["q"],
           "gnd": [{"easy": [1], "hard": [2], "junk": [0], "bbx": None}]}
    (tmp_path / "gnd.json").write_text(json.dumps(gnd))
    g = load_gnd(tmp_path / "gnd.json")
    assert g.imlist == ["a", "b", "c"] and list(g.gnd[0].easy) == [1] and list(g.gnd[0].hard) == [2]
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json"):
        load_gnd(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="missing.*not found"):
        load_per_query(tmp_path / "missing")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("not json")
    with pytest.raises(ValueError, match="metrics.json"):
        load_per_query(tmp_path / "run")
    with pytest.raises(ValueError, match="resamples"):
        paired_difference([1.0, 2.0], [2.0, 3.0], resamples=0)
