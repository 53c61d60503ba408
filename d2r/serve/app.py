"""The FastAPI application behind ``d2r serve`` (see :mod:`d2r.serve` for the API, its limits and its security)."""

import errno
import io
import json
import logging
import math
import os
import re
import shutil
import socket
import stat
import threading
import time
import warnings
from collections import OrderedDict, deque
from pathlib import Path
from urllib.parse import urlsplit
from d2r import _io
from d2r._lock import LockedError
from d2r.engine import Engine
from d2r.features.image import ImageError, load_image
from d2r.serve.page import PAGE, PAGE_CSP

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 50_000_000  # a 48-Mpx phone photo passes; JPEGs are decoded at reduced size, the rest are budgeted
MEMORY_BYTES = 1024 * 1024 * 1024  # decode + describe working memory of all requests together (--memory-mb)
MAX_TOP_K = 1000
THUMB_SIZES = (64, 128, 256, 512)
MAX_BODIES_IN_FLIGHT = 32  # requests with a body being received or served at once; more get 503
BUDGET_WAIT_SECONDS = 120.0  # a request waits this long for memory, then gets 503
MULTIPART_SLACK = 64 * 1024  # multipart headers and form fields around the file, on top of the upload limit
# Working memory per pixel, measured as the peak RSS (VmHWM) of one decode in a fresh process (Pillow 13, a
# 7000x7000 image) and rounded up: what a request is charged against the memory budget.
DECODE_BYTES = 6  # Pillow decoding the pixels it decodes (after JPEG draft): 4 B RGBX + a mode conversion (3.9)
LOAD_BYTES = 14  # load_image of a decoded image: upright copy, RGB, the numpy array (13.6 for a whole JPEG)
EXTRACT_BYTES = 240  # RootSIFT on its working image: OpenCV's doubled first octave (224 at 1024x1024)

_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")
_FORMATS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif",
            "WEBP": ".webp", "PPM": ".ppm"}
# Formats a browser shows, served as stored; any other image is served as a re-encoded JPEG.
_MEDIA_TYPES = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "GIF": "image/gif",
                "WEBP": "image/webp", "BMP": "image/bmp"}
_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")  # Pillow's messages name the file object by its repr
_ABSOLUTE = re.compile(r"(?<![\w.~-])/[^\s'\",;:()\[\]{}]+")  # an absolute POSIX path inside a message


class ApiError(Exception):
    """A request the service refuses: HTTP ``status`` and a one-line ``message``."""
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class ReadWriteLock:
    """Many readers or one writer; a waiting writer holds back new readers (no writer starvation)."""
    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    def read(self):
        return _Held(self._acquire_read, self._release_read)

    def write(self):
        return _Held(self._acquire_write, self._release_write)

    def _acquire_read(self):
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1

    def _release_read(self):
        with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    def _acquire_write(self):
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True

    def _release_write(self):
        with self._cond:
            self._writer = False
            self._cond.notify_all()


class _Held:
    def __init__(self, acquire, release):
        self._acquire, self._release = acquire, release

    def __enter__(self):
        self._acquire()
        return self

    def __exit__(self, *exc):
        self._release()


class MemoryBudget:
    """The bytes that decoding and describing images may use at once, shared by all requests (first come, first
    served, so a large image is not starved by small ones). A request needing more than the whole budget is
    refused (413); one that finds it busy waits up to ``wait`` seconds, then gets 503."""
    def __init__(self, total: int, wait: float = BUDGET_WAIT_SECONDS):
        self.total = int(total)
        self.wait = float(wait)
        self.used = 0
        self.peak = 0  # the most ever held at once (tests and benchmarks read it)
        self._cond = threading.Condition()
        self._queue: deque = deque()

    def hold(self, cost: int, name: str):
        return _Held(lambda: self._acquire(int(cost), name), lambda: self._release(int(cost)))

    def _acquire(self, cost: int, name: str) -> None:
        if cost > self.total:
            raise ApiError(413, f"{name}: decoding and describing it needs about {_mb(cost)} MB, over the "
                                f"service's {_mb(self.total)} MB budget (d2r serve --memory-mb)")
        ticket = object()
        deadline = time.monotonic() + self.wait
        with self._cond:
            self._queue.append(ticket)
            try:
                while self._queue[0] is not ticket or self.used + cost > self.total:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise ApiError(503, f"{name}: the service is busy decoding other images; retry",
                                       {"Retry-After": "5"})
                    self._cond.wait(left)
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()  # the next in line may fit now
            self.used += cost
            self.peak = max(self.peak, self.used)

    def _release(self, cost: int) -> None:
        with self._cond:
            self.used -= cost
            self._cond.notify_all()
        _trim()


def _mb(n: int) -> int:
    return int(math.ceil(n / 2**20))


def _load_trim():
    """glibc's ``malloc_trim``, or None (another C library: nothing to do)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_trim()


def _trim() -> None:
    """Give the memory that decoding and describing freed back to the system. glibc keeps freed blocks in the
    arena of the thread that used them, and after the first large free it serves blocks up to 32 MB (image
    blocks, SIFT octaves) from those arenas, not from mmap: without this, 16 concurrent 49-Mpx uploads under
    the 1024 MB budget raised the RSS by 1.8 GB (JPEG) and 5.0 GB (PNG), kept afterwards
    (benchmarks/results/serve_memory.md). Costs a few percent of an extraction's CPU (pinning
    M_MMAP_THRESHOLD instead: ~18 %)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


# ---- images: opened from untrusted bytes, decoded no larger than the extractor needs ---------------------------
def _clean(exc: Exception) -> str:
    """An exception as a one-line message without Python reprs (``<_io.BytesIO object at 0x...>``)."""
    return " ".join(_REPR.sub("the file", str(exc)).split()) or type(exc).__name__


class _Image:
    """An image file opened and its header read, its pixels not decoded yet: its upright size, and what decoding
    it costs. ``status`` is the HTTP status of an unreadable file (415 for an upload, 410 for an indexed file)."""
    def __init__(self, file, name: str, max_pixels: int, status: int = 415):
        from PIL import Image, UnidentifiedImageError

        self.name, self.status = name, status
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                self.im = Image.open(file)
        except Image.DecompressionBombError:
            raise ApiError(413, f"{name}: too many pixels") from None
        except UnidentifiedImageError:
            raise ApiError(status, f"{name}: not a readable image (unknown or corrupt format)") from None
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise ApiError(status, f"{name}: not a readable image ({_clean(exc)})") from None
        w, h = self.im.size
        if w * h > max_pixels:
            raise ApiError(413, f"{name}: {w}x{h} pixels is over the limit of {max_pixels} pixels")
        self.width, self.height = _upright_size(self.im)
        self.format = self.im.format
        self.factor = 1

    def plan(self, max_side: int | None, box=None) -> int:
        """Decode at the smallest size at which ``box`` (upright pixels; None: the whole image) still has
        ``max_side`` pixels on its longer side: the extractor's working size, so the extractor still downscales
        to it itself (JPEG: DCT scaling while decoding; other formats: an integer ``reduce`` after it). Returns
        the bytes the decode and the extraction will use, at most."""
        bw, bh = (box[2] - box[0], box[3] - box[1]) if box is not None else (self.width, self.height)
        scale = 1.0 if not max_side else min(1.0, max_side / max(bw, bh))
        w, h = self.im.size  # stored orientation
        if scale < 1:
            self.im.draft(None, (math.ceil(w * scale), math.ceil(h * scale)))  # JPEG only; never below that
        dw, dh = self.im.size
        self.factor = max(1, int(dw / (w * scale) + 1e-9))
        rw, rh = math.ceil(dw / self.factor), math.ceil(dh / self.factor)
        return dw * dh * DECODE_BYTES + rw * rh * LOAD_BYTES + int(bw * bh * scale * scale) * EXTRACT_BYTES

    def decode(self):
        """(pixels (H, W, 3) uint8 upright, (sx, sy): decoded pixels per upright pixel of the file)."""
        from PIL import Image


        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = self.im
                im.load()
                if self.factor > 1:  # keeps the file's EXIF: load_image turns the smaller image upright
                    im = _reducible(im).reduce(self.factor)
                pixels = load_image(im, max_pixels=None)
        except (ImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
            raise ApiError(self.status, f"{self.name}: not a readable image ({_clean(exc)})") from None
        if (pixels.shape[1] > pixels.shape[0]) != (self.width > self.height) and self.width != self.height:
            self.width, self.height = self.height, self.width  # a format that turned itself unannounced
        return pixels, (pixels.shape[1] / self.width, pixels.shape[0] / self.height)

    def thumbnail(self, size: int) -> bytes:
        """A JPEG of the upright image fitting in ``size`` x ``size`` (call :meth:`plan_thumbnail` first)."""
        from PIL import Image


        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = _reducible(self.im)
                im.thumbnail((size, size))  # in place: keeps the EXIF orientation that load_image applies
                small = Image.fromarray(load_image(im, max_pixels=None))  # upright, every mode to RGB
        except (ImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
            raise ApiError(self.status, f"{self.name}: not a readable image ({_clean(exc)})") from None
        buf = io.BytesIO()
        small.save(buf, format="JPEG", quality=85)
        return buf.getvalue()

    def plan_thumbnail(self, size: int) -> int:
        self.im.draft(None, (2 * size, 2 * size))  # what Image.thumbnail would draft (its reducing_gap of 2)
        dw, dh = self.im.size
        return dw * dh * DECODE_BYTES + 4 * size * size * LOAD_BYTES

    def index_cost(self, max_side: int | None) -> int:
        """What the engine's own decode (the whole file, by load_image) and its extraction use."""
        w, h = self.width, self.height
        scale = 1.0 if not max_side else min(1.0, max_side / max(w, h))
        return w * h * LOAD_BYTES + int(w * h * scale * scale) * EXTRACT_BYTES


def _upright_size(im) -> tuple[int, int]:
    """(width, height) of an opened image once upright, as load_image gives it, from its header: EXIF
    orientations 5-8 turn it by a quarter, unless the format reports the turned size already (and turns the
    pixels on load: TIFF in recent Pillow; its tiles keep the stored size)."""
    from PIL import Image

    w, h = im.size
    try:
        if im.format == "PNG":  # its getexif() decodes the whole image to look for EXIF after the pixels
            exif = Image.Exif()
            if "exif" in im.info:
                exif.load(im.info["exif"])
        else:
            exif = im.getexif()
        orientation = exif.get(0x0112, 1)
    except Exception:  # malformed EXIF: the image stays usable (and unturned), as in load_image
        orientation = 1
    if orientation not in (5, 6, 7, 8):
        return w, h
    try:
        stored = max(t[1][2] for t in im.tile), max(t[1][3] for t in im.tile)
    except (TypeError, ValueError, IndexError):
        stored = (w, h)
    return (w, h) if stored == (h, w) and w != h else (h, w)


def _reducible(im):
    """``im`` loaded, in a mode that ``Image.reduce`` averages correctly (palette and 1-bit images converted,
    16-bit ones widened to 32-bit)."""
    im.load()
    if im.mode in ("P", "PA"):
        return im.convert("RGB")  # load_image drops alpha too
    if im.mode == "1":
        return im.convert("L")
    if im.mode.startswith("I;16"):
        return im.convert("I")  # load_image maps 0..65535 to 0..255 for both
    return im


def _as_file(data):
    """A binary file object for ``data`` (bytes, or a file object already)."""
    return io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data


def _file_size(f) -> int:
    here = f.tell()
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(here)
    return size


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


# ---- the service ------------------------------------------------------------------------------------------------
class Service:
    """The engine plus everything the HTTP layer needs; no FastAPI in here (testable on its own)."""
    def __init__(self, path, max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS,
                 memory_bytes: int = MEMORY_BYTES):
        self.path = Path(path)
        self._stamp = self._disk_stamp()
        self.engine = Engine.open(path)
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_pixels = int(max_pixels)
        self.budget = MemoryBudget(memory_bytes)
        self.lock = ReadWriteLock()
        self.uploads = os.path.realpath(self.path / "uploads")
        self._thumbs: OrderedDict = OrderedDict()
        self._sizes: dict = {}
        self._folders: list[str] | None = None
        self._ids: list[str] | None = None
        self._cache_lock = threading.Lock()

    def _disk_stamp(self) -> tuple:
        """What a commit of the engine changes (atomic renames: a new inode): the index and feature-store
        manifests and the sources table (its snapshot, and its log: appended in place, its size changes)."""
        stamp = []
        for name in ("index/manifest.json", "features/manifest.json", "sources.json", "sources.log"):
            try:
                st = (self.path / name).stat()
                stamp.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                stamp.append(None)
        return tuple(stamp)

    def _refresh(self, force: bool = False) -> None:
        """Reopen the engine when another process (``d2r index add/remove``) committed since it was opened,
        so that its images are found and removed ones are not searched (their features are gone)."""
        if not force and self._disk_stamp() == self._stamp:
            return
        with self.lock.write():  # running searches finish on the old engine first
            stamp = self._disk_stamp()
            if force or stamp != self._stamp:
                self.engine = Engine.open(self.path)
                self._stamp = stamp
                with self._cache_lock:
                    self._sizes.clear()
                    self._thumbs.clear()
                    self._folders = self._ids = None

    def _max_side(self) -> int | None:
        """The extractor's working size (the longer side it downscales images to), None when it takes them whole."""
        return getattr(getattr(self.engine.extractor, "config", None), "max_side", None)

    # ---- reads -------------------------------------------------------------------------------------------------
    def health(self) -> dict:
        self._refresh()
        return {"status": "ok", "images": len(self.engine)}

    def info(self) -> dict:
        """The engine's :meth:`~d2r.engine.Engine.info` without server-side paths (made relative to the engine
        folder, or cut to the file's name)."""
        self._refresh()
        with self.lock.read():
            return _without_paths(self.engine.info(), self.path)

    def ids(self, offset: int, limit: int, contains: str | None = None) -> dict:
        if offset < 0 or not 1 <= limit <= 10_000:
            raise ApiError(400, f"offset must be >= 0 and limit in [1, 10000], got offset={offset}, limit={limit}")
        self._refresh()
        with self._cache_lock:
            ids = self._ids
        if ids is None:
            with self.lock.read():  # writers clear the cache under the write lock: never a stale list kept
                db = self.engine.database
                ids = sorted(str(i) for i in db.ids()) if db is not None else []
                with self._cache_lock:
                    self._ids = ids  # sorted once per engine state: stable pages, one sort
        if contains:
            needle = contains.lower()
            ids = [i for i in ids if needle in i.lower()]
        return {"total": len(ids), "offset": offset, "ids": ids[offset:offset + limit]}

    def search(self, data, filename: str | None, image_id: str | None, box: str | None,
               top_k: int, rerank: bool) -> dict:
        """Search with an uploaded file (``data``: bytes or a binary file) or an indexed image (``image_id``)."""
        if not 1 <= top_k <= MAX_TOP_K:
            raise ApiError(400, f"top_k must be in [1, {MAX_TOP_K}], got {top_k}")
        if (data is None) == (image_id is None):
            raise ApiError(400, "send either an image file (field 'file') or an indexed image id (field 'id')")
        self._refresh()
        if data is not None:
            file, name, query, status = _as_file(data), filename or "upload", {"file": filename}, 415
        else:
            file, name, query, status = self._open_source(image_id), image_id, {"id": image_id}, 410
        try:
            image = _Image(file, name, self.max_pixels, status)
            bbox = _parse_box(box, image.width, image.height) if box else None
            query.update(width=image.width, height=image.height, box=bbox)
            # memory first, then the engine: nothing waits for memory while holding the engine's read lock
            with self.budget.hold(image.plan(self._max_side(), bbox), name):
                pixels, (sx, sy) = image.decode()
                scaled = None if bbox is None else [bbox[0] * sx, bbox[1] * sy, bbox[2] * sx, bbox[3] * sy]
                t0 = time.perf_counter()
                hits = self._search(pixels, scaled, top_k, rerank)
                seconds = time.perf_counter() - t0
        finally:
            if data is None:
                file.close()
        out = []
        for hit in hits:
            d = hit.to_dict()
            d.pop("path", None)  # server-side paths are not the client's business
            d["box"] = None if hit.box is None else [round(float(v), 1) for v in hit.box]
            d["width"], d["height"] = self._size(hit.image_id)
            d["thumb"] = f"/api/thumb?id={_quote(hit.image_id)}&size=256"
            out.append(d)
        return {"query": query, "seconds": round(seconds, 4), "hits": out}

    def _search(self, pixels, bbox, top_k: int, rerank: bool):
        for attempt in range(2):
            if attempt:  # features of a hit removed by another process meanwhile: reopen, search again
                self._refresh(force=True)
            with self.lock.read():
                if self.engine.database is None or len(self.engine) == 0:
                    raise ApiError(409, "the index is empty: add images first")
                try:
                    return self.engine.search(pixels, bbox=bbox, top_k=top_k, rerank=rerank)
                except KeyError as exc:
                    if attempt:
                        raise ApiError(409, f"the index changed during the search ({exc}); retry") from None
                except ValueError as exc:  # a box that covers no whole pixel once decoded at reduced size
                    raise ApiError(400, f"query: {exc}") from None

    def image(self, image_id: str):
        """The file of an indexed image: ``(file, media type, size)`` of the stored file when in a format browsers
        show (the caller closes it), else ``(bytes, "image/jpeg", size)`` of a re-encoded copy. Only an image
        file under the engine's image folders is served (403 outside, 404 unknown, 410 gone or not an image)."""
        from PIL import Image

        self._refresh()
        file = self._open_source(image_id)
        handed = False
        try:
            image = _Image(file, image_id, self.max_pixels, status=410)
            if image.format in _MEDIA_TYPES:
                file.seek(0)
                handed = True
                return file, _MEDIA_TYPES[image.format], os.fstat(file.fileno()).st_size
            with self.budget.hold(image.plan(None), image_id):
                pixels, _ = image.decode()
        finally:
            if not handed:
                file.close()
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=92)
        return buf.getvalue(), "image/jpeg", buf.tell()

    def thumbnail(self, image_id: str, size: int) -> bytes:
        if size not in THUMB_SIZES:
            raise ApiError(400, f"size must be one of {list(THUMB_SIZES)}, got {size}")
        key = (image_id, size)
        with self._cache_lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        self._refresh()
        with self._open_source(image_id) as file:
            image = _Image(file, image_id, self.max_pixels, status=410)
            with self.budget.hold(image.plan_thumbnail(size), image_id):
                data = image.thumbnail(size)
        with self._cache_lock:
            self._thumbs[key] = data
            while len(self._thumbs) > 1024:
                self._thumbs.popitem(last=False)
        return data

    # ---- writes (single writer) --------------------------------------------------------------------------------
    def add(self, data, filename: str | None, image_id: str | None) -> dict:
        """Index an uploaded file (bytes or a binary file) under ``image_id``; it is kept in ``uploads/``."""
        file = _as_file(data)
        if file is None or _file_size(file) == 0:
            raise ApiError(400, "field 'file' is empty")
        image_id = image_id if image_id else Path(filename or "").stem
        image_id = _check_id(image_id)
        image = _Image(file, filename or image_id, self.max_pixels)
        self._refresh()
        with self.budget.hold(image.index_cost(self._max_side()), filename or image_id), self.lock.write():
            if image_id in self.engine:
                raise ApiError(409, f"image id {image_id!r} is already indexed (remove it first)")
            target = self.path / "uploads" / (image_id + _FORMATS.get(image.format, ".img"))
            file.seek(0)
            with _io.atomic_path(target) as tmp, open(tmp, "wb") as out:
                shutil.copyfileobj(file, out, 1 << 20)
            try:  # a re-upload of a file that failed before is tried again (the user sent it on purpose)
                report = self.engine.index([(image_id, target)], progress=False, retry_failed=True)
            except BaseException:  # e.g. LockedError (another writer): nothing indexed, nothing kept
                self._drop_upload(str(target), image_id)
                raise
            if image_id not in report.indexed:
                self._drop_upload(str(target), image_id)
                reason = report.failed.get(str(target), "not indexed")
                raise ApiError(400, f"image {image_id!r} was not indexed: {_clean_paths(reason, self.path)}")
            self._stamp = self._disk_stamp()  # its own commit: nothing to reopen
            self._forget(image_id)
        return {"added": image_id, "images": len(self.engine)}

    def remove(self, image_id: str) -> dict:
        """Remove an image from the index; its upload (if the service stored it) is deleted too."""
        self._refresh()
        with self.lock.write():
            if image_id not in self.engine:
                raise ApiError(404, f"unknown image id {image_id!r}")
            source = self.engine._sources.get(image_id)
            self.engine.remove(image_id)
            self._stamp = self._disk_stamp()
            if source is not None:
                self._drop_upload(source, image_id)
            self._forget(image_id)
        return {"removed": image_id, "images": len(self.engine)}

    # ---- helpers -----------------------------------------------------------------------------------------------
    def _image_folders(self) -> list[str]:
        with self._cache_lock:
            if self._folders is None:
                self._folders = [self.uploads] + [str(f) for f in self.engine.image_folders()]
            return self._folders

    def _open_source(self, image_id: str):
        """The file of an indexed image, opened for reading: a regular file under the engine's uploads folder or
        a folder holding indexed images (:meth:`~d2r.engine.Engine.image_folders`), checked on the file actually
        opened, so that a file or folder replaced by a symbolic link to elsewhere is refused (403)."""
        if image_id not in self.engine:
            raise ApiError(404, f"unknown image id {image_id!r}")
        source = self.engine._sources.get(image_id)
        if source is None:
            raise ApiError(410, f"image {image_id!r} is indexed but the engine does not know its file")
        folders = self._image_folders()
        outside = ApiError(403, f"image {image_id!r}: its file is no longer under the indexed image folders "
                                "(replaced by a link to elsewhere?): not served")
        real = os.path.realpath(source)
        if not os.path.isabs(source) or not any(_within(real, f) for f in folders):
            raise outside
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | os.O_CLOEXEC
        try:
            fd = os.open(real, flags)  # no link followed at the last step, no wait on a FIFO put in its place
        except FileNotFoundError:
            raise ApiError(410, f"image {image_id!r} is indexed but its file is gone") from None
        except OSError as exc:  # ELOOP: the file became a link after realpath
            if exc.errno == errno.ELOOP:
                raise outside from None
            raise ApiError(410, f"image {image_id!r}: its file cannot be opened ({exc.strerror})") from None
        try:
            opened = os.readlink(f"/proc/self/fd/{fd}")  # Linux: the path of what was really opened
        except OSError:
            opened = real
        if not any(_within(opened, f) for f in folders):
            os.close(fd)
            raise outside
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ApiError(410, f"image {image_id!r}: its file is not a regular file")
        return os.fdopen(fd, "rb")

    def _size(self, image_id: str):
        """(width, height) of an indexed image, upright (as its boxes); (None, None) when it cannot be read."""
        if image_id not in self._sizes:
            try:
                with self._open_source(image_id) as file:
                    image = _Image(file, image_id, self.max_pixels, status=410)
                    self._sizes[image_id] = (image.width, image.height)
            except (ApiError, OSError, ValueError):
                return None, None
        return self._sizes[image_id]

    def _drop_upload(self, source: str, image_id: str) -> None:
        """Delete ``source`` when it is a file the service stored in ``uploads/`` (never a user's photo), and the
        folders its id made there once empty; kept while the id is still indexed."""
        try:
            if image_id in self.engine:
                return
        except Exception:  # an engine left half-open by a failed write: keep the file, to be safe
            return
        path = Path(source)
        if not _within(os.path.realpath(path.parent), self.uploads):
            return
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("%s: could not delete the upload (%s)", path, exc.strerror)
            return
        folder = path.parent
        while _within(os.path.realpath(folder), self.uploads) and os.path.realpath(folder) != self.uploads:
            try:
                folder.rmdir()  # only when empty
            except OSError:
                break
            folder = folder.parent

    def _forget(self, image_id: str) -> None:
        with self._cache_lock:
            self._ids = None
            self._sizes.pop(image_id, None)
            for key in [k for k in self._thumbs if k[0] == image_id]:
                del self._thumbs[key]


def _check_id(image_id: str) -> str:
    if not image_id or len(image_id) > 200 or not _ID_RE.match(image_id) or ".." in image_id.split("/"):
        raise ApiError(400, f"image id {image_id!r} is not valid: use 1-200 letters, digits, '_', '-', '.', '/'")
    return image_id


def _parse_box(text: str, width: int, height: int) -> list:
    parts = str(text).replace(" ", "").strip("[]()").split(",")
    try:
        box = [float(v) for v in parts]
    except ValueError:
        box = []
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise ApiError(400, f"box must be four numbers x1,y1,x2,y2 in pixels, got {text!r}")
    x1, y1, x2, y2 = box
    if x2 - x1 < 1 or y2 - y1 < 1:
        raise ApiError(400, f"box {box} is empty (need x1 < x2 and y1 < y2)")
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise ApiError(400, f"box {box} lies outside the {width}x{height} query image")
    return box


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def _clean_paths(text: str, engine: Path) -> str:
    """``text`` with every absolute path made relative to the engine folder, or cut to its last part."""
    roots = sorted({os.path.realpath(engine), os.path.abspath(engine)}, key=len, reverse=True)

    def short(match):
        path = match.group(0)
        for root in roots:
            if _within(path, root):
                return os.path.relpath(path, root)
        return os.path.basename(path.rstrip("/")) or "/"

    return _ABSOLUTE.sub(short, text)


def _without_paths(value, engine: Path):
    """``value`` (JSON data) with :func:`_clean_paths` applied to every string in it."""
    if isinstance(value, dict):
        return {k: _without_paths(v, engine) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_paths(v, engine) for v in value]
    return _clean_paths(value, engine) if isinstance(value, str) else value


# ---- HTTP --------------------------------------------------------------------------------------------------------
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),  # no other site embeds its images
    (b"cross-origin-opener-policy", b"same-origin"),
]
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
_UNSAFE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


def _json_error(status: int, message: str, headers=None):
    body = json.dumps({"error": message}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    head += [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in (headers or {}).items()]
    return ({"type": "http.response.start", "status": status, "headers": head},
            {"type": "http.response.body", "body": body})


def _host_port(netloc: str, scheme: str):
    """(host, port) of a Host header or an origin's netloc, lowercased, the scheme's default port filled in;
    None when malformed."""
    try:
        parts = urlsplit("//" + netloc)
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.hostname.lower(), port or {"https": 443, "wss": 443}.get(scheme, 80)


class Guard:
    """Pure ASGI middleware in front of every request of the app (inside nothing but Starlette's last-resort
    error handler):
    - ``Host`` must name an allowed host (loopback names, the bound host, ``allowed_hosts``; "*": any), so a
      rebound DNS name cannot reach a local service (400);
    - a write (POST, PUT, PATCH, DELETE) whose ``Origin`` (else ``Referer``) is not the server's own origin is
      refused (403): other web pages cannot add, remove or search (no origin at all: not a browser, allowed);
    - the body is counted while it streams in: past ``max_upload_bytes`` plus the multipart slack the app is cut
      off and 413 is answered at once, with or without ``Content-Length`` (chunked bodies are never spooled
      whole); at most :data:`MAX_BODIES_IN_FLIGHT` bodies are taken at once (503 beyond);
    - every response gets the security headers (and :data:`API_CSP` unless it brings its own CSP);
    - an unexpected exception is logged and answered 500 ``{"error": ...}``; the server keeps serving.
    """
    def __init__(self, app, max_body: int, allowed_hosts=()):
        self.app = app
        self.max_body = int(max_body)
        hosts = {str(h).strip().lower().strip("[]") for h in allowed_hosts if str(h).strip()}
        self.any_host = "*" in hosts
        self.hosts = set(LOOPBACK_HOSTS) | hosts
        self.bodies = 0  # the event loop's thread only

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        started = False

        async def secured(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                head = list(message.get("headers", []))
                names = {k.lower() for k, _ in head}
                head += [h for h in _SECURITY_HEADERS if h[0] not in names]
                if b"content-security-policy" not in names:
                    head.append((b"content-security-policy", API_CSP.encode()))
                message = dict(message, headers=head)
            await send(message)

        async def answer(status, text, extra=None):
            for message in _json_error(status, text, extra):
                await secured(message)

        refusal = self._refusal(scope, headers)
        if refusal is not None:
            return await answer(*refusal)
        with_body = scope["method"] in _UNSAFE_METHODS
        if with_body and self.bodies >= MAX_BODIES_IN_FLIGHT:
            return await answer(503, f"busy: {MAX_BODIES_IN_FLIGHT} uploads in flight; retry",
                                {"Retry-After": "2"})
        received, over = 0, False

        async def counted():
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:  # stop reading: the app sees a client gone, answers nothing
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def unless_over(message):
            if not over:
                await secured(message)

        self.bodies += with_body
        try:
            await self.app(scope, counted, unless_over)
        except Exception as exc:
            if not over:
                log.exception("%s %s failed", scope["method"], scope.get("path"))
                if started:
                    raise
                await answer(500, f"internal error: {type(exc).__name__}: {_clean(exc)}")
        finally:
            self.bodies -= with_body
        if over and not started:
            await answer(413, f"request body over the {self.max_body - MULTIPART_SLACK}-byte upload limit "
                              f"(d2r serve --max-upload-mb)")

    def _refusal(self, scope, headers):
        """(status, message) of a request refused before the app sees it, else None."""
        scheme = scope.get("scheme", "http")
        host = headers.get("host")
        if host is not None and not self.any_host:
            own = _host_port(host, scheme)
            if own is None or own[0] not in self.hosts:
                return 400, (f"Host {host!r} is not served here (the server answers {sorted(self.hosts)}; "
                             "d2r serve --allow-host adds names)")
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return 400, "Content-Length is not a number"
            if int(length) > self.max_body:
                return 413, (f"request body of {length} bytes is over the {self.max_body - MULTIPART_SLACK}-byte "
                             "upload limit (d2r serve --max-upload-mb)")
        if scope["method"] in _UNSAFE_METHODS:
            origin = headers.get("origin")
            if origin is None and headers.get("referer"):
                ref = urlsplit(headers["referer"])
                origin = f"{ref.scheme}://{ref.netloc}" if ref.scheme and ref.netloc else "null"
            if origin is None:
                if headers.get("sec-fetch-site") in ("cross-site", "same-site"):
                    return 403, "cross-site request refused (Sec-Fetch-Site: " + headers["sec-fetch-site"] + ")"
                return None  # no browser: nothing to forge
            parts = urlsplit(origin)
            theirs = _host_port(parts.netloc, parts.scheme) if parts.scheme and parts.netloc else None
            ours = _host_port(host, scheme) if host else None
            if theirs is None or parts.scheme != scheme or theirs != ours:
                return 403, f"cross-site request refused: origin {origin!r} is not this server's"
        return None


def create_app(path, max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS,
               memory_bytes: int = MEMORY_BYTES, allowed_hosts=()):
    """The FastAPI app serving the engine folder ``path`` (opened once, here). ``allowed_hosts``: host names
    answered besides the loopback ones (``"*"``: any)."""
    from fastapi import FastAPI, File, Form, Query, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException


    service = Service(path, max_upload_bytes, max_pixels, memory_bytes)
    app = FastAPI(title="d2r", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.state.service = service
    app.add_middleware(Guard, max_body=service.max_upload_bytes + MULTIPART_SLACK, allowed_hosts=allowed_hosts)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)  # the router's own 404 / 405, in the same shape
    async def _http_error(request: Request, exc: HTTPException):
        message = {404: f"no such endpoint: {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path} (allowed: "
                        f"{(exc.headers or {}).get('Allow', '?')})"}.get(exc.status_code, str(exc.detail))
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path"))
            parts.append(f"{where or 'request'}: {e.get('msg', 'invalid')}")
        return JSONResponse({"error": "; ".join(parts) or "invalid request"}, status_code=400)

    @app.exception_handler(LockedError)
    async def _locked(request: Request, exc: LockedError):  # another process writes the index: retry later
        return JSONResponse({"error": " ".join(str(exc).split())}, status_code=409)

    def upload(file: UploadFile | None):
        """The uploaded file object (spooled to disk past 1 MB by the form parser), size-checked; not read."""
        if file is None:
            return None
        size = file.size if file.size is not None else _file_size(file.file)
        if size > service.max_upload_bytes:
            raise ApiError(413, f"{file.filename}: over the {service.max_upload_bytes}-byte upload limit")
        file.file.seek(0)
        return file.file

    @app.get("/", response_class=HTMLResponse)
    def page():
        return HTMLResponse(PAGE, headers={"Content-Security-Policy": PAGE_CSP})

    @app.get("/api/health")
    def health():
        return service.health()

    @app.get("/api/info")
    def info():
        return service.info()

    @app.get("/api/images")
    def images(offset: int = Query(0), limit: int = Query(100), q: str | None = Query(None)):
        return service.ids(offset, limit, q)

    @app.post("/api/search")
    def search(file: UploadFile | None = File(None), id: str | None = Form(None), box: str | None = Form(None),
               top_k: int = Form(10), rerank: bool = Form(True)):
        data = upload(file)
        return service.search(data, file.filename if file else None, id or None, box or None, top_k, rerank)

    @app.post("/api/images", status_code=201)
    def add(file: UploadFile | None = File(None), id: str | None = Form(None)):
        if file is None:
            raise ApiError(400, "field 'file' (the image to add) is missing")
        return service.add(upload(file), file.filename, id or None)

    @app.delete("/api/images/{image_id:path}")
    def remove(image_id: str):
        return service.remove(image_id)

    @app.get("/api/image")
    def image(id: str = Query(...)):
        content, media, size = service.image(id)
        if isinstance(content, bytes):
            return Response(content, media_type=media)

        def chunks():  # from the file opened and checked above (not reopened by name)
            with content:
                while block := content.read(1 << 16):
                    yield block

        return StreamingResponse(chunks(), media_type=media, headers={"Content-Length": str(size)})

    @app.get("/api/thumb")
    def thumb(id: str = Query(...), size: int = Query(256)):
        return Response(service.thumbnail(id, size), media_type="image/jpeg",
                        headers={"Cache-Control": "max-age=60"})

    return app


def served_hosts(host: str, allowed=()) -> list[str]:
    """The host names a server bound to ``host`` answers to, besides the loopback ones: ``host`` itself, this
    machine's names when bound to every address, and ``allowed``."""
    hosts = [host, *allowed]
    if host in ("0.0.0.0", "::", ""):
        hosts += [socket.gethostname(), socket.getfqdn()]
    return hosts


def run(path, host: str = "127.0.0.1", port: int = 8000, max_upload_bytes: int = MAX_UPLOAD_BYTES,
        memory_bytes: int = MEMORY_BYTES, allowed_hosts=(), quiet: bool = False) -> None:
    """Serve ``path`` until interrupted (uvicorn, one process, requests in threads)."""
    import uvicorn

    app = create_app(path, max_upload_bytes=max_upload_bytes, memory_bytes=memory_bytes,
                     allowed_hosts=served_hosts(host, allowed_hosts))
    try:
        uvicorn.run(app, host=host, port=int(port), log_level="warning" if quiet else "info")
    except SystemExit as exc:  # uvicorn's start-up failure (logged above): an error, not an exit status of ours
        if exc.code:
            raise OSError(f"{host}:{port}: the server could not start (see the log line above)") from None
