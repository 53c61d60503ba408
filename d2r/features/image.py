"""Image loading in one place: every extractor and tool reads pixels through :func:`load_image`.

A path, a numpy array or a PIL image becomes an (H, W, 3) uint8 RGB array: EXIF orientation applied;
grayscale, palette, RGBA/LA (alpha dropped), CMYK, 16-bit and float images converted; images whose header
announces more than ``max_pixels`` pixels are refused BEFORE their pixels are decoded (decompression bombs).
Anything unreadable (missing path, directory, empty, truncated, not an image) raises :class:`ImageError`
naming the file and the reason.
Tiny images (even 1×1) are valid; extractors return no features for images smaller than 10×10.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

# Same limit at which Pillow itself refuses an image (2 x Image.MAX_IMAGE_PIXELS).
DEFAULT_MAX_PIXELS = 178_956_970

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif",
)


class ImageError(ValueError):
    """An image that cannot be used: the message names the source and the reason."""


def load_image(source, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               max_side: int | None = None) -> np.ndarray:
    """Load ``source`` as a C-contiguous (H, W, 3) uint8 RGB array.

    Args:
        source: a path (str / Path), a PIL image, or a numpy array (H, W), (H, W, 1), (H, W, 3) RGB or
            (H, W, 4) RGBA of dtype uint8, uint16 (full 16-bit range), bool, or float (values in [0, 1] when
            the maximum is <= 1, else [0, 255]). Arrays are taken as RGB (convert OpenCV BGR arrays first).
        max_pixels: refuse images with more than this many pixels (checked from the header, before decoding);
            None disables the check (Pillow still refuses images above its own hard limit).
        max_side: if given, downscale (area filter) so that the longer side is at most ``max_side``.

    Raises:
        ImageError: missing path, directory, empty or truncated file, not an image, too many pixels,
            bad array.
    """
    if isinstance(source, (str, os.PathLike)):
        image = _load_path(Path(source), max_pixels)
    elif isinstance(source, np.ndarray):
        image = _from_array(source, "array", max_pixels)
    elif _is_pil(source):
        image = _from_pil(source, "PIL image", max_pixels)
    else:
        raise ImageError(f"cannot load an image from {type(source).__name__}: "
                         "expected a path, numpy array or PIL image")
    if max_side is not None:
        image = resize_max_side(image, max_side)
    return image


def resize_max_side(image: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale so the longer side is ``max_side`` (aspect kept, area filter); smaller images are
    returned as is."""
    if max_side <= 0:
        raise ValueError(f"max_side must be positive, got {max_side}")
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image
    import cv2

    s = max_side / max(h, w)
    size = (max(1, int(round(w * s))), max(1, int(round(h * s))))
    return np.ascontiguousarray(cv2.resize(image, size, interpolation=cv2.INTER_AREA))


def _is_pil(obj) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, Image.Image)


def _check_pixels(name: str, width: int, height: int, max_pixels: int | None) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: image has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} "
            "(possible decompression bomb)"
        )


def _load_path(path: Path, max_pixels: int | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    name = str(path)
    if not path.exists():
        if path.is_symlink():
            raise ImageError(f"{name}: broken symbolic link (its target {os.readlink(path)} is missing)")
        raise ImageError(f"{name}: no such file")
    if path.is_dir():
        raise ImageError(f"{name}: is a directory, not an image file")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageError(f"{name}: cannot stat ({exc})") from exc
    if size == 0:
        raise ImageError(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return _from_pil(im, name, max_pixels)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: too many pixels, refused as a possible decompression bomb ({exc})") \
            from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not a readable image (unknown or corrupt format)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{name}: corrupt or truncated image ({exc})") from exc


def _from_pil(im, name: str, max_pixels: int | None) -> np.ndarray:
    from PIL import Image, ImageOps

    # The header size is known without decoding: check it before touching pixel data.
    _check_pixels(name, im.width, im.height, max_pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im.load()  # raises OSError on truncated data
        try:
            im = ImageOps.exif_transpose(im)
        except Exception:  # malformed EXIF must not make a readable image unusable
            pass
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im)
        return _from_array(arr.astype(np.uint16) if mode != "I" else np.clip(arr, 0, 65535).astype(np.uint16),
                           name, max_pixels)
    if mode == "F":
        return _from_array(np.asarray(im, dtype=np.float32), name, max_pixels)
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))


def _from_array(arr: np.ndarray, name: str, max_pixels: int | None) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageError(f"{name}: expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array, "
                         f"got shape {arr.shape}")
    _check_pixels(name, arr.shape[1], arr.shape[0], max_pixels)
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype == np.bool_:
        out = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:
        out = np.round(arr.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        a = arr.astype(np.float32)
        if not np.isfinite(a).all():
            raise ImageError(f"{name}: array contains NaN or inf")
        if a.size and a.max() <= 1.0:
            a = a * 255.0
        out = np.clip(np.round(a), 0, 255).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.integer):
        out = np.clip(arr, 0, 255).astype(np.uint8)
    else:
        raise ImageError(f"{name}: unsupported array dtype {arr.dtype}")
    if out.ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)
    return np.ascontiguousarray(out)


def list_images(source, extensions=IMAGE_EXTENSIONS) -> list[tuple[str, Path]]:
    """List images as sorted ``(image_id, path)`` pairs.

    ``source`` is a directory (searched recursively for the common image extensions, case-insensitive) or a
    text file with one path per line (blank lines and ``#`` comments ignored; relative paths are relative to
    the list file's folder), or an iterable of paths.

    Image id convention (stable across runs and machines): the path relative to the root folder, POSIX
    separators, WITHOUT the extension — e.g. ``root/a/b/c123.jpg`` → ``"a/b/c123"``, which is what the
    revisitop ``imlist`` and GLDv2 ids look like. Paths outside the root (list files with absolute paths
    elsewhere) keep their full POSIX path minus the extension. Two files giving the same id (``x.jpg`` and
    ``x.png``) raise ValueError.
    """
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if root.is_dir():
            exts = {e.lower() for e in extensions}
            # a broken symbolic link named like an image is listed (and fails as one), never silently skipped
            paths = [p for p in root.rglob("*") if (p.is_file() or p.is_symlink() and not p.exists())
                     and p.suffix.lower() in exts]
            pairs = [(_image_id(p, root), p) for p in paths]
        elif root.is_file() and root.suffix.lower() in {e.lower() for e in extensions}:
            pairs = [(_image_id(root, root.parent), root)]  # one image, not a list file
        elif root.is_file():
            base = root.parent
            pairs = []
            for line in read_list_file(root):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                p = Path(line)
                if not p.is_absolute():
                    p = base / p
                pairs.append((_image_id(p, base), p))
        else:
            raise FileNotFoundError(f"{root}: no such image folder or list file")
    else:
        pairs = []
        for item in source:
            if isinstance(item, tuple):
                pairs.append((str(item[0]), Path(item[1])))
            else:
                p = Path(item)
                pairs.append((_image_id(p, None), p))
    pairs.sort(key=lambda t: t[0])
    for (a, pa), (b, pb) in zip(pairs, pairs[1:]):
        if a == b:
            raise ValueError(f"image id {a!r} is given by two files: {pa} and {pb}")
    return pairs


def read_list_file(path) -> list[str]:
    """The lines of a list file; ValueError naming it when it is not text (an image with an unknown
    extension, a codebook...)."""
    try:
        return Path(path).read_text().splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text list file of image paths (nor an image: unknown extension "
                         f"{Path(path).suffix!r})") from None


def _image_id(path: Path, root: Path | None) -> str:
    """Canonical id: the absolute, normalised path relative to ``root`` (so ``./a/../a/x.jpg`` and ``a/x.jpg``
    are one image), or the absolute path when there is no root or the file lies outside it; no extension."""
    path = Path(os.path.abspath(path))
    rel = path
    if root is not None:
        root = Path(os.path.abspath(root))
        try:
            rel = path.relative_to(root)
        except ValueError:
            try:  # reached through a symbolic link of the root (or of a folder above it)
                rel = path.resolve().relative_to(root.resolve())
            except ValueError:
                rel = path
    return rel.with_suffix("").as_posix()


def crop(pixels: np.ndarray, bbox, name: str = "image") -> np.ndarray:
    """Crop (H, W, 3) pixels to ``bbox`` = (x1, y1, x2, y2), rounded to whole pixels and clipped to the image.
    A box that is malformed or does not overlap the image raises ValueError naming the image."""
    try:
        x1, y1, x2, y2 = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: bbox must be four numbers x1,y1,x2,y2, got {bbox!r}") from None
    h, w = pixels.shape[:2]
    if not all(np.isfinite([x1, y1, x2, y2])) or x2 <= x1 or y2 <= y1:
        raise ValueError(f"{name}: bbox {bbox} is empty or not finite (need x1 < x2, y1 < y2)")
    c = [max(0, int(round(x1))), max(0, int(round(y1))), min(w, int(round(x2))), min(h, int(round(y2)))]
    if c[2] <= c[0] or c[3] <= c[1]:
        raise ValueError(f"{name}: bbox {bbox} lies outside the {w}x{h} image")
    return np.ascontiguousarray(pixels[c[1]:c[3], c[0]:c[2]])
