"""Test inputs generated on the fly (nothing downloaded, nothing committed): a bad-input corpus, textured
photos, small engines on the shipped codebook, and the in-process CLI runner."""

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CODEBOOK = REPO / "codebooks" / "rootsift-128d-k256-skimage-s0.npz"  # the shipped demo codebook


def _png_header_only(path: Path, width: int, height: int) -> None:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def textured(rng, h=240, w=320) -> np.ndarray:
    """A random blocky RGB image with plenty of SIFT keypoints."""
    small = rng.integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8)
    return np.kron(small, np.ones((8, 8, 1), np.uint8))


def write_corpus(folder: Path, seed: int = 0) -> dict[str, str]:
    """Write odd-but-valid and broken files into ``folder``. Returns name -> "ok" | "empty" | "bad"."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    kinds = {}
    (folder / "zero-bytes.jpg").write_bytes(b"")
    kinds["zero-bytes.jpg"] = "bad"
    buf = io.BytesIO()
    Image.fromarray(textured(rng)).save(buf, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    kinds["truncated.jpg"] = "bad"
    (folder / "random-bytes.jpg").write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    kinds["random-bytes.jpg"] = "bad"
    _png_header_only(folder / "bomb.png", 100_000, 100_000)
    kinds["bomb.png"] = "bad"
    (folder / "directory.jpg").mkdir()
    kinds["directory.jpg"] = "bad"
    rgba = np.concatenate([textured(rng), np.full((240, 320, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    kinds["alpha.png"] = "ok"
    Image.fromarray(textured(rng)[:, :, 0].astype(np.uint16) * 257).save(folder / "sixteen-bit.png")
    kinds["sixteen-bit.png"] = "ok"
    Image.fromarray(textured(rng)).convert("CMYK").save(folder / "cmyk.jpg")
    kinds["cmyk.jpg"] = "ok"
    Image.fromarray(textured(rng)[:, :, 0], "L").save(folder / "gray.jpg")
    kinds["gray.jpg"] = "ok"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(textured(rng)).save(folder / "exif-rotated.jpg", exif=exif.tobytes())
    kinds["exif-rotated.jpg"] = "ok"
    Image.new("RGB", (1, 1), (1, 2, 3)).save(folder / "one-pixel.png")
    kinds["one-pixel.png"] = "empty"
    Image.new("RGB", (50_000, 5), (200, 10, 10)).save(folder / "five-by-fifty-thousand.png")
    kinds["five-by-fifty-thousand.png"] = "empty"
    return kinds


def write_photos(folder: Path, names, seed: int) -> Path:
    """One textured 160×200 PNG per name in ``folder`` (created); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(textured(rng, 160, 200)).save(folder / f"{name}.png")
    return folder


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of ``d2r.cli.main(argv)`` in this process (argparse exits caught)."""
    import d2r.cli

    try:
        code = d2r.cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def small_config(**extra) -> dict:
    """An engine config on the shipped codebook, small enough for tests (200 features, 5 re-ranked, batches of
    2); ``extra`` replaces top-level sections."""
    cfg = {"features": {"options": {"max_features": 200}}, "codebook": {"path": str(CODEBOOK)},
           "rerank": {"num_to_rerank": 5}, "batch_size": 2}
    cfg.update(extra)
    return cfg


def new_engine(tmp_path: Path) -> Path:
    """An empty engine ``tmp_path/eng`` on the shipped codebook, made by `d2r index create` (200 features,
    3 re-ranked); returns its folder."""
    import d2r.cli

    eng = tmp_path / "eng"
    code = d2r.cli.main(["index", "create", str(eng), "--codebook", str(CODEBOOK), "--quiet",
                         "--set", "features.options.max_features=200", "--set", "rerank.num_to_rerank=3"])
    assert code == 0
    return eng
