"""The FastAPI application behind ``d2r serve`` (see :mod:`d2r.serve` for the API)."""

import io
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path
from d2r import _io
from d2r._lock import LockedError
from d2r.engine import Engine
from d2r.features.image import ImageError, load_image
from d2r.serve.page import PAGE

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 50_000_000
MAX_TOP_K = 1000
THUMB_SIZES = (64, 128, 256, 512)
_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")
_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif", "WEBP": ".webp",
            "PPM": ".ppm"}


class ApiError(Exception):
    """A request the service refuses: HTTP ``status`` and a one-line ``message``."""
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


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


class Service:
    """The engine plus everything the HTTP layer needs; no FastAPI in here (testable on its own)."""
    def __init__(self, path, max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS):
        self.path = Path(path)
        self._stamp = self._disk_stamp()
        self.engine = Engine.open(path)
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_pixels = int(max_pixels)
        self.lock = ReadWriteLock()
        self._thumbs: OrderedDict = OrderedDict()
        self._sizes: dict = {}
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

    # ---- reads -------------------------------------------------------------------------------------------------
    def health(self) -> dict:
        self._refresh()
        return {"status": "ok", "images": len(self.engine)}

    def info(self) -> dict:
        self._refresh()
        with self.lock.read():
            return self.engine.info()

    def ids(self, offset: int, limit: int) -> dict:
        if offset < 0 or not 1 <= limit <= 10_000:
            raise ApiError(400, f"offset must be >= 0 and limit in [1, 10000], got offset={offset}, limit={limit}")
        self._refresh()
        with self.lock.read():
            db = self.engine.database
            ids = [] if db is None else [str(i) for i in db.ids()]
        return {"total": len(ids), "offset": offset, "ids": ids[offset:offset + limit]}

    def search(self, data: bytes | None, filename: str | None, image_id: str | None, box: str | None,
               top_k: int, rerank: bool) -> dict:
        if not 1 <= top_k <= MAX_TOP_K:
            raise ApiError(400, f"top_k must be in [1, {MAX_TOP_K}], got {top_k}")
        if (data is None) == (image_id is None):
            raise ApiError(400, "send either an image file (field 'file') or an indexed image id (field 'id')")
        self._refresh()
        if data is not None:
            pixels = self._decode(data, filename or "upload")
            query = {"file": filename}
        else:
            pixels = self._load_indexed(image_id)
            query = {"id": image_id}
        h, w = pixels.shape[:2]
        bbox = _parse_box(box, w, h) if box else None
        query.update(width=w, height=h, box=bbox)
        t0 = time.perf_counter()
        for attempt in range(2):
            if attempt:  # features of a hit removed by another process meanwhile: reopen, search again
                self._refresh(force=True)
            with self.lock.read():
                if self.engine.database is None or len(self.engine) == 0:
                    raise ApiError(409, "the index is empty: add images first")
                try:
                    hits = self.engine.search(pixels, bbox=bbox, top_k=top_k, rerank=rerank)
                    break
                except KeyError as exc:
                    if attempt:
                        raise ApiError(409, f"the index changed during the search ({exc}); retry") from None
        seconds = time.perf_counter() - t0
        out = []
        for hit in hits:
            d = hit.to_dict()
            d.pop("path", None)  # server-side paths are not the client's business
            d["box"] = None if hit.box is None else [round(float(v), 1) for v in hit.box]
            d["width"], d["height"] = self._size(hit.image_id)
            d["thumb"] = f"/api/thumb?id={_quote(hit.image_id)}&size=256"
            out.append(d)
        return {"query": query, "seconds": round(seconds, 4), "hits": out}

    def image_path(self, image_id: str) -> Path:
        """The file of an indexed image (404 unknown, 410 gone)."""
        self._refresh()
        return self._source(image_id)

    def thumbnail(self, image_id: str, size: int) -> bytes:
        from PIL import Image

        if size not in THUMB_SIZES:
            raise ApiError(400, f"size must be one of {list(THUMB_SIZES)}, got {size}")
        key = (image_id, size)
        with self._cache_lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        self._refresh()
        source = self._source(image_id)
        try:
            with Image.open(source) as im:
                im.draft("RGB", (size, size))
                im = im.convert("RGB")
                im.thumbnail((size, size))
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=85)
        except (OSError, ValueError) as exc:
            raise ApiError(410, f"image {image_id!r}: its file can no longer be read ({exc})") from None
        data = buf.getvalue()
        with self._cache_lock:
            self._thumbs[key] = data
            while len(self._thumbs) > 1024:
                self._thumbs.popitem(last=False)
        return data

    # ---- writes (single writer) --------------------------------------------------------------------------------
    def add(self, data: bytes, filename: str | None, image_id: str | None) -> dict:
        if not data:
            raise ApiError(400, "field 'file' is empty")
        image_id = image_id if image_id else Path(filename or "").stem
        image_id = _check_id(image_id)
        fmt = self._decode(data, filename or image_id, want_format=True)
        self._refresh()
        with self.lock.write():
            if image_id in self.engine:
                raise ApiError(409, f"image id {image_id!r} is already indexed (remove it first)")
            target = self.path / "uploads" / (image_id + _FORMATS.get(fmt, ".img"))
            target.parent.mkdir(parents=True, exist_ok=True)
            with _io.atomic_path(target) as tmp:
                Path(tmp).write_bytes(data)
            report = self.engine.index([(image_id, target)], progress=False)
            if image_id not in report.indexed:
                reason = report.failed.get(str(target), "not indexed")
                raise ApiError(400, f"image {image_id!r} was not indexed: {reason}")
            self._stamp = self._disk_stamp()  # its own commit: nothing to reopen
        self._forget(image_id)
        return {"added": image_id, "images": len(self.engine)}

    def remove(self, image_id: str) -> dict:
        self._refresh()
        with self.lock.write():
            if image_id not in self.engine:
                raise ApiError(404, f"unknown image id {image_id!r}")
            self.engine.remove(image_id)
            self._stamp = self._disk_stamp()
        self._forget(image_id)
        return {"removed": image_id, "images": len(self.engine)}

    # ---- helpers -----------------------------------------------------------------------------------------------
    def _source(self, image_id: str) -> Path:
        """The file of an indexed image; callers refresh the engine once per request, not per hit."""
        if image_id not in self.engine:
            raise ApiError(404, f"unknown image id {image_id!r}")
        source = self.engine._sources.get(image_id)
        if source is None or not Path(source).is_file():
            raise ApiError(410, f"image {image_id!r} is indexed but its file {source} is gone")
        return Path(source)

    def _load_indexed(self, image_id: str):
        source = self._source(image_id)
        try:
            return load_image(source, max_pixels=self.max_pixels)
        except ImageError as exc:
            raise ApiError(410, f"image {image_id!r}: its file can no longer be used ({exc})") from None

    def _size(self, image_id: str):
        from PIL import Image

        if image_id not in self._sizes:
            try:
                with Image.open(self._source(image_id)) as im:
                    self._sizes[image_id] = (im.width, im.height)
            except (ApiError, OSError, ValueError):
                return None, None
        return self._sizes[image_id]

    def _forget(self, image_id: str) -> None:
        with self._cache_lock:
            self._sizes.pop(image_id, None)
            for key in [k for k in self._thumbs if k[0] == image_id]:
                del self._thumbs[key]

    def _decode(self, data: bytes, name: str, want_format: bool = False):
        """Pixels (H, W, 3) uint8 of an uploaded file (or its PIL format name), or a 4xx ApiError."""
        import warnings

        from PIL import Image


        if len(data) > self.max_upload_bytes:
            raise ApiError(413, f"{name}: {len(data)} bytes is over the {self.max_upload_bytes}-byte upload limit")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(io.BytesIO(data))
                if im.width * im.height > self.max_pixels:
                    raise ApiError(413, f"{name}: {im.width}x{im.height} pixels is over the limit of "
                                        f"{self.max_pixels} pixels")
                if want_format:
                    im.load()
                    return im.format
                return load_image(im, max_pixels=self.max_pixels)
        except ApiError:
            raise
        except Image.DecompressionBombError:
            raise ApiError(413, f"{name}: too many pixels") from None
        except (ImageError, OSError, ValueError, SyntaxError) as exc:  # Pillow raises all of these on bad files
            raise ApiError(415, f"{name}: not a readable image ({type(exc).__name__}: {exc})") from None


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


def create_app(path, max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS):
    """The FastAPI app serving the engine folder ``path`` (opened once, here)."""
    from fastapi import FastAPI, File, Form, Query, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response


    service = Service(path, max_upload_bytes, max_pixels)
    app = FastAPI(title="d2r", docs_url="/api/docs", openapi_url="/api/openapi.json")
    app.state.service = service

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

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

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # logged; the server keeps serving
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > service.max_upload_bytes + 64 * 1024  # multipart overhead
            except ValueError:
                return JSONResponse({"error": "Content-Length is not a number"}, status_code=400)
            if too_big:
                return JSONResponse({"error": f"request body of {length} bytes is over the "
                                              f"{service.max_upload_bytes}-byte upload limit"}, status_code=413)
        return await call_next(request)

    def read_upload(file: UploadFile | None) -> bytes | None:
        if file is None:
            return None
        data = file.file.read(service.max_upload_bytes + 1)
        if len(data) > service.max_upload_bytes:
            raise ApiError(413, f"{file.filename}: over the {service.max_upload_bytes}-byte upload limit")
        return data

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE

    @app.get("/api/health")
    def health():
        return service.health()

    @app.get("/api/info")
    def info():
        return service.info()

    @app.get("/api/images")
    def images(offset: int = Query(0), limit: int = Query(100)):
        return service.ids(offset, limit)

    @app.post("/api/search")
    def search(file: UploadFile | None = File(None), id: str | None = Form(None), box: str | None = Form(None),
               top_k: int = Form(10), rerank: bool = Form(True)):
        data = read_upload(file)
        return service.search(data, file.filename if file else None, id or None, box or None, top_k, rerank)

    @app.post("/api/images", status_code=201)
    def add(file: UploadFile | None = File(None), id: str | None = Form(None)):
        if file is None:
            raise ApiError(400, "field 'file' (the image to add) is missing")
        return service.add(read_upload(file), file.filename, id or None)

    @app.delete("/api/images/{image_id:path}")
    def remove(image_id: str):
        return service.remove(image_id)

    @app.get("/api/image")
    def image(id: str = Query(...)):
        from fastapi.responses import FileResponse

        return FileResponse(service.image_path(id))

    @app.get("/api/thumb")
    def thumb(id: str = Query(...), size: int = Query(256)):
        return Response(service.thumbnail(id, size), media_type="image/jpeg",
                        headers={"Cache-Control": "max-age=60"})

    return app


def run(path, host: str = "127.0.0.1", port: int = 8000, max_upload_bytes: int = MAX_UPLOAD_BYTES,
        quiet: bool = False) -> None:
    """Serve ``path`` until interrupted (uvicorn, one process, requests in threads)."""
    import uvicorn

    app = create_app(path, max_upload_bytes=max_upload_bytes)
    try:
        uvicorn.run(app, host=host, port=int(port), log_level="warning" if quiet else "info")
    except SystemExit as exc:  # uvicorn's start-up failure (logged above): an error, not an exit status of ours
        if exc.code:
            raise OSError(f"{host}:{port}: the server could not start (see the log line above)") from None
