"""``d2r serve`` resource limits: request bodies cut off at the upload limit while they stream, the memory budget
shared by decoding and describing, and the server's resident memory under 16 concurrent 49-Mpx uploads (a real
uvicorn process on loopback, its VmRSS read from /proc)."""

import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx", reason="the service tests need httpx (pip install -e \".[test]\")")
pytest.importorskip("fastapi", reason="d2r serve needs the serve extra (pip install -e \".[serve]\")")
pytest.importorskip("uvicorn", reason="d2r serve needs the serve extra (pip install -e \".[serve]\")")
pytest.importorskip("multipart", reason="d2r serve needs the serve extra (pip install -e \".[serve]\")")

from tests.test_serve import _error, _jpeg, _photos, build_engine, start_server, stop_server  # noqa: E402

UPLOAD_MB = 20  # the default --max-upload-mb
BIG = (8570, 5720)  # 49.0 Mpx, under the service's 50-Mpx limit


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


@pytest.fixture(scope="module")
def limits(tmp_path_factory):
    """A server with the default limits (20 MB uploads, 1024 MB decode budget), one extra allowed host."""
    root = tmp_path_factory.mktemp("serve-limits")
    pics = _photos()
    engine = build_engine(root, pics)
    s = start_server(engine, root / "server.log", "--allow-host", "photos.example")
    s.update(root=root, engine=engine, photos=pics)
    try:
        yield s
    finally:
        stop_server(s)


def _chunked_post(port: int, path: str, total: int, chunk: int = 1 << 16):
    """POST a multipart body of ``total`` file bytes with Transfer-Encoding: chunked (no Content-Length), as
    fast as the server takes it; returns (bytes sent when the answer came, the answer's first bytes)."""
    head = (b'--XX\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nTransfer-Encoding: chunked\r\n"
                  "Content-Type: multipart/form-data; boundary=XX\r\n\r\n".encode())
        s.sendall(b"%x\r\n%s\r\n" % (len(head), head))
        block = b"%x\r\n%s\r\n" % (chunk, b"\xff" * chunk)
        s.setblocking(False)
        sent, answer, pending = 0, b"", memoryview(block)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                answer += s.recv(65536)
                if answer:
                    break
            except BlockingIOError:
                pass
            if sent < total:
                try:
                    pending = pending[s.send(pending):]  # a partial send: the rest of this chunk next
                except BlockingIOError:
                    time.sleep(0.001)
                except (BrokenPipeError, ConnectionResetError):
                    break
                if not len(pending):
                    sent, pending = sent + chunk, memoryview(block)
            else:
                time.sleep(0.01)
        s.setblocking(True)
        s.settimeout(5)
        try:
            while b"\r\n\r\n" in answer and len(answer) < 400:
                more = s.recv(65536)
                if not more:
                    break
                answer += more
        except OSError:
            pass
    return sent, answer


def test_chunked_uploads_are_cut_off_at_the_limit(limits):
    """D8: the size guard read Content-Length only, so a chunked body (none) was spooled whole to the temp
    folder before the 413 (200 MB against a 5 MB limit: +200 MB on disk, 413 only after all of it)."""
    port, c = limits["port"], limits["client"]
    limit = UPLOAD_MB << 20
    for path in ("/api/search", "/api/images"):
        sent, answer = _chunked_post(port, path, 200 << 20)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b'{"error":' in answer and b"upload limit" in answer
        # answered once the limit was read: what was sent beyond it sat in socket buffers, never stored
        assert limit < sent < limit + (24 << 20), sent
    assert not (limits["engine"] / "uploads").exists() or not any((limits["engine"] / "uploads").iterdir())
    # a declared Content-Length over the limit is answered before any body byte is read
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {200 << 20}\r\n"
                  "Content-Type: multipart/form-data; boundary=XX\r\n\r\n".encode())
        assert s.recv(65536).startswith(b"HTTP/1.1 413")
    # just under the limit still goes through (to the image check: these bytes are no image)
    r = c.post("/api/search", files={"file": ("x.jpg", b"\xff" * (limit - 1000))})
    assert "not a readable image" in _error(r, 415)
    assert c.get("/api/health").json()["images"] == 8


def test_allowed_hosts_are_served(limits):
    """D11: --allow-host adds a host name to the loopback ones; others stay refused."""
    c = limits["client"]
    assert c.get("/api/health", headers={"Host": "photos.example"}).status_code == 200
    assert c.get("/api/health", headers={"Host": "Photos.Example:80"}).status_code == 200
    _error(c.get("/api/health", headers={"Host": "other.example"}), 400)


def test_memory_budget_holds_and_serves_first_come_first():
    """D3: the memory budget never lets the requests it admits exceed it, refuses what can never fit (413),
    answers 503 to a request that waited too long, and a large request is not starved by a stream of small
    ones (first come, first served)."""
    from d2r.serve.app import ApiError, MemoryBudget

    budget = MemoryBudget(100, wait=30)
    rng = np.random.default_rng(0)
    over = []

    def one(cost):
        with budget.hold(cost, "x"):
            if budget.used > budget.total:
                over.append(budget.used)
            time.sleep(float(rng.random()) * 0.004)

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(one, rng.integers(1, 101, 400).tolist()))
    assert not over and budget.used == 0 and 50 < budget.peak <= 100
    with pytest.raises(ApiError) as e:
        budget.hold(101, "big.jpg").__enter__()
    assert e.value.status == 413 and "budget" in e.value.message and "big.jpg" in e.value.message
    # a stream of small holders, then one that needs all of it: it gets its turn
    stop = threading.Event()

    def small():
        while not stop.is_set():
            with budget.hold(30, "small"):
                time.sleep(0.005)

    workers = [threading.Thread(target=small) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        time.sleep(0.05)
        t0 = time.monotonic()
        with budget.hold(100, "whole"):
            assert budget.used == 100
        waited = time.monotonic() - t0
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert waited < 5, waited
    short = MemoryBudget(10, wait=0.05)
    with short.hold(10, "a"):
        with pytest.raises(ApiError) as e:
            short.hold(1, "b").__enter__()
    assert e.value.status == 503 and e.value.headers == {"Retry-After": "5"}


def _big_uploads(pics):
    """A 49-Mpx JPEG of the cat (found at reduced size) and a 49-Mpx PNG (no JPEG draft: decoded whole)."""
    cat = Image.fromarray(pics["chelsea"]).resize(BIG, Image.BICUBIC)
    jpeg = io.BytesIO()
    cat.save(jpeg, format="JPEG", quality=90)
    png = io.BytesIO()
    Image.new("RGB", (7000, 7000), (90, 120, 150)).save(png, format="PNG")
    return jpeg.getvalue(), png.getvalue()


def test_a_large_upload_is_decoded_small_and_still_found(limits, tmp_path):
    """D3: uploads were decoded whole (a 49-Mpx JPEG: ~0.67 GB of working memory) although the extractor works
    at 1024 pixels. Decoded at reduced size, the photo is still found, and its box is in its own pixels; a
    budget too small for it refuses it in one line."""
    from d2r.serve.app import ApiError, Service

    jpeg, _ = _big_uploads(limits["photos"])
    c = limits["client"]
    r = c.post("/api/search", files={"file": ("big.jpg", jpeg)}, data={"top_k": "3"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["query"]["width"], body["query"]["height"]) == BIG
    assert {h["image_id"] for h in body["hits"][:2]} == {"chelsea", "chelsea_crop"}
    assert body["hits"][0]["inliers"] >= 20
    box = [int(BIG[0] * 0.25), int(BIG[1] * 0.1), int(BIG[0] * 0.75), int(BIG[1] * 0.7)]  # the head
    r = c.post("/api/search", files={"file": ("big.jpg", jpeg)}, data={"top_k": "3", "box": ",".join(map(str, box))})
    assert r.status_code == 200, r.text
    assert r.json()["query"]["box"] == box and r.json()["hits"][0]["image_id"].startswith("chelsea")
    service = Service(limits["engine"], memory_bytes=64 << 20)
    with pytest.raises(ApiError) as e:
        service.search(jpeg, "big.jpg", None, None, 3, True)
    assert e.value.status == 413 and "64 MB budget" in e.value.message and service.budget.used == 0


@pytest.mark.slow
def test_memory_stays_bounded_under_concurrent_large_uploads(limits):
    """D3: 8 concurrent 49-Mpx uploads took the server from 305 MB to 4.36 GB of RSS (0.5 GB per request in
    flight, no cap). Now 16 concurrent clients, each uploading a 49-Mpx image (8 JPEG, 8 PNG), stay within the
    1024 MB budget plus 256 MB of everything else, measured on the real process."""
    jpeg, png = _big_uploads(limits["photos"])
    pid, url = limits["proc"].pid, limits["url"]
    c = limits["client"]
    assert c.post("/api/search", data={"id": "coffee", "top_k": "3"}).status_code == 200  # kernels loaded
    base = _rss_mb(pid)
    peak, done = [base], threading.Event()

    def watch():
        while not done.is_set():
            peak.append(_rss_mb(pid))
            time.sleep(0.02)

    def client(i):
        name, data = ("big.jpg", jpeg) if i % 2 == 0 else ("big.png", png)
        with httpx.Client(base_url=url, timeout=600) as cl:
            return name, cl.post("/api/search", files={"file": (name, data)}, data={"top_k": "3"})

    watcher = threading.Thread(target=watch)
    watcher.start()
    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(client, range(16)))
    finally:
        done.set()
        watcher.join()
    seconds = time.monotonic() - t0
    for name, r in answers:
        assert r.status_code == 200, (name, r.text)
        body = r.json()
        if name == "big.jpg":
            assert body["query"]["width"] == BIG[0] and body["hits"][0]["image_id"].startswith("chelsea")
        else:
            assert body["query"]["width"] == 7000 and body["hits"] == []  # a flat image: no features
    grew = max(peak) - base
    print(f"\nRSS base {base:.0f} MB, peak {max(peak):.0f} MB (+{grew:.0f} MB), VmHWM {_rss_mb(pid, 'VmHWM'):.0f} MB,"
          f" after {_rss_mb(pid):.0f} MB; 16 uploads in {seconds:.1f} s")
    assert grew < 1024 + 256, (base, max(peak))
