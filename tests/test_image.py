"""load_image / list_images on generated good and bad files."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from d2r.features import ImageError, RootSIFT, list_images, load_image


def _save(path, im, **kw):
    im.save(path, **kw)
    return path


def test_image_error_is_value_error():
    assert issubclass(ImageError, ValueError)


@pytest.mark.parametrize("make, reason", [
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: p.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes()),
     "not a readable image"),
])
def test_bad_files(tmp_path, make, reason):
    p = tmp_path / "bad.jpg"
    make(p)
    with pytest.raises(ImageError, match=reason) as e:
        load_image(p)
    assert str(p) in str(e.value)


def test_truncated_jpeg(tmp_path, rng):
    arr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    p = tmp_path / "trunc.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated") as e:
        load_image(p)
    assert "trunc.jpg" in str(e.value)


def test_missing_and_directory(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.jpg")
    d = tmp_path / "folder.jpg"
    d.mkdir()
    with pytest.raises(ImageError, match="directory") as e:
        load_image(d)
    assert "folder.jpg" in str(e.value)


def test_png_with_alpha_drops_alpha(tmp_path, rng):
    arr = rng.integers(0, 256, (12, 17, 4), dtype=np.uint8)
    p = _save(tmp_path / "a.png", Image.fromarray(arr, "RGBA"))
    out = load_image(p)
    assert out.shape == (12, 17, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, arr[:, :, :3])


def test_16bit_png(tmp_path):
    arr = np.array([[0, 257, 65535], [257 * 100, 257 * 200, 128]], dtype=np.uint16)
    p = _save(tmp_path / "g16.png", Image.fromarray(arr))
    out = load_image(p)
    assert out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out[:, :, 0], [[0, 1, 255], [100, 200, 0]])
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 2])


def test_cmyk_jpeg(tmp_path):
    im = Image.new("CMYK", (16, 16), (0, 0, 0, 0))  # no ink = white
    im.paste((255, 0, 0, 0), (0, 0, 8, 16))  # full cyan on the left half
    p = _save(tmp_path / "cmyk.jpg", im, quality=100)
    out = load_image(p).astype(int)
    assert out.shape == (16, 16, 3)
    assert (out[:, 12:] > 240).all()  # white
    assert (out[:, :4, 0] < 30).all() and (out[:, :4, 1:] > 220).all()  # cyan = (0, 255, 255)


def test_grayscale_and_palette(tmp_path, rng):
    arr = rng.integers(0, 256, (9, 11), dtype=np.uint8)
    out = load_image(_save(tmp_path / "g.png", Image.fromarray(arr, "L")))
    np.testing.assert_array_equal(out, np.repeat(arr[:, :, None], 3, axis=2))
    pal = Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)).convert("P")
    out = load_image(_save(tmp_path / "p.png", pal))
    np.testing.assert_array_equal(out, np.asarray(pal.convert("RGB")))


def test_exif_orientation(tmp_path):
    arr = np.zeros((40, 80, 3), np.uint8)  # stored 40 rows x 80 columns
    arr[:20, :40] = (255, 0, 0)  # red top-left quadrant
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    p = _save(tmp_path / "rot.jpg", im, exif=exif.tobytes(), quality=95)
    out = load_image(p)
    assert out.shape == (80, 40, 3)
    # after a clockwise quarter turn, the old top-left quadrant is the top-right one
    assert out[5:35, 25:35, 0].min() > 200 and out[5:35, 25:35, 1].max() < 60
    assert out[50:75, 5:15].max() < 60


def test_tiny_image_is_valid_but_has_no_features(tmp_path):
    p = _save(tmp_path / "one.png", Image.new("RGB", (1, 1), (10, 20, 30)))
    out = load_image(p)
    assert out.shape == (1, 1, 3) and out.tolist() == [[[10, 20, 30]]]
    f = RootSIFT().extract(p)
    assert len(f) == 0 and f.descriptors.shape == (0, 128)


def _png_header_only(path, width, height):
    """A PNG whose valid IHDR announces width x height but that carries almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_refused_before_decoding(tmp_path):
    p = _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(ImageError, match="bomb") as e:
        load_image(p)
    assert "bomb.png" in str(e.value)
    # our own, lower limit: refused from the header (decoding would report truncation instead)
    p2 = _png_header_only(tmp_path / "big.png", 3000, 3000)
    with pytest.raises(ImageError, match="exceeds the limit of 1000000"):
        load_image(p2, max_pixels=1_000_000)
    with pytest.raises(ImageError, match="truncated"):
        load_image(p2)


def test_arrays_and_pil(rng):
    g = rng.integers(0, 256, (5, 6), dtype=np.uint8)
    np.testing.assert_array_equal(load_image(g), np.repeat(g[:, :, None], 3, 2))
    np.testing.assert_array_equal(load_image(g[:, :, None]), np.repeat(g[:, :, None], 3, 2))
    rgba = rng.integers(0, 256, (5, 6, 4), dtype=np.uint8)
    np.testing.assert_array_equal(load_image(rgba), rgba[:, :, :3])
    np.testing.assert_array_equal(load_image(np.full((2, 2, 3), 65535, np.uint16)), np.full((2, 2, 3), 255))
    np.testing.assert_array_equal(load_image(np.full((2, 2), 0.5, np.float32))[0, 0], [128, 128, 128])
    np.testing.assert_array_equal(load_image(np.full((2, 2), 200.0))[0, 0], [200, 200, 200])
    np.testing.assert_array_equal(load_image(Image.fromarray(rgba[:, :, :3])), rgba[:, :, :3])
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageError, match="NaN"):
        load_image(np.full((4, 4), np.nan))
    with pytest.raises(ImageError, match="exceeds"):
        load_image(np.zeros((100, 100), np.uint8), max_pixels=50)
    with pytest.raises(ImageError, match="int"):
        load_image(42)


def test_max_side(rng):
    a = rng.integers(0, 256, (300, 120, 3), dtype=np.uint8)
    out = load_image(a, max_side=100)
    assert out.shape == (100, 40, 3)
    assert load_image(a, max_side=400).shape == (300, 120, 3)


def test_list_images(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ["z.jpg", "a/x.PNG", "a/b/y.jpeg", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    pairs = list_images(tmp_path)
    assert [i for i, _ in pairs] == ["a/b/y", "a/x", "z"]
    assert pairs[0][1] == tmp_path / "a" / "b" / "y.jpeg"
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\nz.jpg\n\na/x.PNG\n")
    assert list_images(lst) == [("a/x", tmp_path / "a" / "x.PNG"), ("z", tmp_path / "z.jpg")]
    (tmp_path / "z.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="'z'"):
        list_images(tmp_path)
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "missing")


def test_list_file_with_a_bom_and_a_duplicate_line(tmp_path):
    """D16: a UTF-8 BOM (Windows editors) stayed in the first path ("no such file"), and a path listed twice
    aborted the whole run ("image id ... is given by two files: x and x")."""
    (tmp_path / "a").mkdir()
    for name in ["a/x.jpg", "y.png"]:
        (tmp_path / name).write_bytes(b"x")
    lst = tmp_path / "list.txt"
    lst.write_bytes("a/x.jpg\r\ny.png\na/x.jpg\n./a/../a/x.jpg\n".encode("utf-8-sig"))
    assert list_images(lst) == [("a/x", tmp_path / "a" / "x.jpg"), ("y", tmp_path / "y.png")]
    (tmp_path / "a" / "x.png").write_bytes(b"x")  # another file with the same id: still refused
    lst.write_text("a/x.jpg\na/x.png\n")
    with pytest.raises(ValueError, match="'a/x' is given by two files"):
        list_images(lst)


def test_a_folder_or_list_without_images_names_itself(tmp_path):
    """Item 10 of the newcomer trial: an empty folder was a silent success in most commands."""
    from d2r.features.image import listed_images

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no photos here")
    (tmp_path / "none.txt").write_text("# nothing\n\n")
    for source in (tmp_path / "empty", tmp_path / "none.txt", [tmp_path / "empty"]):
        with pytest.raises(ValueError, match="no images found") as e:
            listed_images(source)
        assert str(tmp_path) in str(e.value)
    assert listed_images([]) == []


def test_ids_of_list_files_with_paths_outside_their_folder(tmp_path):
    """Newcomer finding 18: ids of a list file's absolute paths outside its folder are those absolute paths
    without the extension (the documented rule; README and docstring say so), inside it relative ids."""
    (tmp_path / "photos" / "g").mkdir(parents=True)
    (tmp_path / "lists").mkdir()
    inside = tmp_path / "lists" / "in.jpg"
    outside = tmp_path / "photos" / "g" / "out.jpg"
    for p in (inside, outside):
        p.write_bytes(b"x")
    lst = tmp_path / "lists" / "l.txt"
    lst.write_text(f"{outside}\nin.jpg\n{inside}\n")
    ids = [i for i, _ in list_images(lst)]
    assert ids == [outside.with_suffix("").as_posix(), "in"]


def test_what_is_named_like_an_image_is_listed_and_fails_as_one(tmp_path):
    """A folder named like an image, a broken link and a link loop (D9) are listed: they fail with a reason
    when read, instead of being skipped in silence or aborting the run."""
    (tmp_path / "dir.jpg").mkdir()
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "a.jpg").symlink_to("b.jpg")
    (tmp_path / "b.jpg").symlink_to("a.jpg")
    pairs = dict(list_images(tmp_path))
    assert set(pairs) == {"dir", "gone", "a", "b"}
    for image_id, why in [("dir", "directory"), ("gone", "broken symbolic link"),
                          ("a", "symbolic link loop")]:
        with pytest.raises(ImageError, match=why):
            load_image(pairs[image_id])


def test_iterables_keep_their_order_and_their_pixels():
    pixels = np.zeros((4, 4, 3), np.uint8)
    pairs = list_images([("z", pixels), ("a", pixels)])
    assert [i for i, _ in pairs] == ["z", "a"] and pairs[0][1] is pixels
    with pytest.raises(ValueError, match="'z'"):
        list_images([("z", pixels), ("z", pixels.copy())])
