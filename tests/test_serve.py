"""``d2r serve`` as a real server process on loopback: API round trips, bad requests, the page in Chromium."""

import io
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")

ROOT = Path(__file__).resolve().parents[1]
MAX_UPLOAD_MB = 1


def _photos():
    """A few scikit-image sample photos (shipped with the package, nothing downloaded)."""
    import skimage.data as data

    return {"coffee": data.coffee(), "chelsea": data.chelsea(), "rocket": data.rocket(),
            "astronaut": data.astronaut(), "ihc": data.immunohistochemistry()}


def _jpeg(pixels, quality=92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from d2r.engine import Engine
    from d2r.engine.config import EngineConfig

    root = tmp_path_factory.mktemp("serve")
    photos = root / "photos"
    photos.mkdir()
    pics = _photos()
    for name in ("coffee", "chelsea", "rocket", "ihc"):
        p = pics[name]
        Image.fromarray(p).save(photos / f"{name}.jpg", quality=92)
        h, w = p.shape[:2]  # a second view: a shifted crop, so each scene has a true match
        Image.fromarray(p[h // 10:, w // 8:]).save(photos / f"{name}_crop.jpg", quality=92)
    cfg = EngineConfig.from_dict({"features": {"options": {"max_features": 500}},
                                  "codebook": {"size": 64, "iterations": 4}, "rerank": {"num_to_rerank": 8}})
    Engine.create(root / "eng", cfg).index(photos, progress=False)
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "d2r", "serve", str(root / "eng"), "--host", "127.0.0.1",
                             "--port", str(port), "--max-upload-mb", str(MAX_UPLOAD_MB), "--quiet"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not start:\n" + (root / "server.log").read_text()[-3000:])
        time.sleep(0.3)
    client = httpx.Client(base_url=url, timeout=120)
    try:
        yield {"url": url, "client": client, "root": root, "photos": pics, "proc": proc}
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _alive(server):
    assert server["proc"].poll() is None
    r = server["client"].get("/api/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_api_round_trips(server):
    c, pics = server["client"], server["photos"]
    assert c.get("/api/health").json() == {"status": "ok", "images": 8}
    assert c.get("/api/info").json()["images"] == 8
    ids = c.get("/api/images").json()
    assert ids["total"] == 8 and "chelsea" in ids["ids"]
    # search by upload: a different crop of the cat finds both cat images first
    h, w = pics["chelsea"].shape[:2]
    r = c.post("/api/search", files={"file": ("q.jpg", _jpeg(pics["chelsea"][: h * 3 // 4, : w * 3 // 4]))},
               data={"top_k": "4"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"]["width"] == w * 3 // 4 and len(body["hits"]) == 4
    assert {x["image_id"] for x in body["hits"][:2]} == {"chelsea", "chelsea_crop"}
    top = body["hits"][0]
    assert top["rank"] == 1 and top["inliers"] > 10 and top["width"] > 0 and "path" not in top
    assert c.get(top["thumb"]).headers["content-type"] == "image/jpeg"
    assert c.get("/api/image", params={"id": "chelsea"}).status_code == 200
    # search by id, with a box
    r = c.post("/api/search", data={"id": "coffee", "box": "100,50,500,350", "top_k": "3"})
    assert r.status_code == 200, r.text
    assert r.json()["query"]["box"] == [100, 50, 500, 350]
    assert {x["image_id"] for x in r.json()["hits"][:2]} == {"coffee", "coffee_crop"}
    # add, find, remove
    r = c.post("/api/images", files={"file": ("astro.jpg", _jpeg(pics["astronaut"]))}, data={"id": "new/astro"})
    assert r.status_code == 201, r.text
    assert r.json() == {"added": "new/astro", "images": 9}
    r = c.post("/api/search", files={"file": ("a.jpg", _jpeg(pics["astronaut"][50:450, 30:480]))})
    assert r.json()["hits"][0]["image_id"] == "new/astro"
    r = c.delete("/api/images/new/astro")
    assert r.status_code == 200 and r.json() == {"removed": "new/astro", "images": 8}
    assert "new/astro" not in c.get("/api/images").json()["ids"]
    r = c.post("/api/search", files={"file": ("a.jpg", _jpeg(pics["astronaut"]))}, data={"top_k": "8"})
    assert "new/astro" not in {x["image_id"] for x in r.json()["hits"]}
    page = c.get("/")
    assert page.status_code == 200 and "d2r" in page.text and "/api/search" in page.text


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server):
    c, pics = server["client"], server["photos"]
    good = _jpeg(pics["rocket"])
    cases = [
        (c.post("/api/search", data={"top_k": "3"}), 400, "file"),  # no file, no id
        (c.post("/api/search", files={"file": ("x.jpg", b"this is not an image")}), 415, "x.jpg"),
        (c.post("/api/search", files={"file": ("t.jpg", good[: len(good) // 3])}), 415, "t.jpg"),
        (c.post("/api/search", files={"file": ("big.jpg", b"\xff" * (MAX_UPLOAD_MB * 1024 * 1024 + 100_000))}),
         413, "limit"),
        (c.post("/api/search", files={"file": ("r.jpg", good)}, data={"box": "10,10,5000,300"}), 400, "outside"),
        (c.post("/api/search", files={"file": ("r.jpg", good)}, data={"box": "1,2,3"}), 400, "four numbers"),
        (c.post("/api/search", files={"file": ("r.jpg", good)}, data={"box": "50,50,20,20"}), 400, "empty"),
        (c.post("/api/search", data={"id": "no-such-image"}), 404, "no-such-image"),
        (c.post("/api/search", files={"file": ("r.jpg", good)}, data={"top_k": "0"}), 400, "top_k"),
        (c.post("/api/search", files={"file": ("r.jpg", good)}, data={"top_k": "many"}), 400, "top_k"),
        (c.post("/api/search", files={"file": ("r.jpg", good)}, data={"id": "coffee"}), 400, "either"),
        (c.delete("/api/images/no-such-image"), 404, "no-such-image"),
        (c.post("/api/images", data={"id": "x"}), 400, "file"),
        (c.post("/api/images", files={"file": ("coffee.jpg", good)}), 409, "already"),
        (c.post("/api/images", files={"file": ("x.jpg", good)}, data={"id": "../evil"}), 400, "not valid"),
        (c.post("/api/images", files={"file": ("x.txt", b"hello")}, data={"id": "x"}), 415, "not a readable"),
        (c.get("/api/thumb", params={"id": "coffee", "size": "7"}), 400, "size"),
        (c.get("/api/thumb", params={"id": "nope"}), 404, "nope"),
        (c.get("/api/images", params={"limit": "0"}), 400, "limit"),
    ]
    for i, (r, status, word) in enumerate(cases):
        assert r.status_code == status, (i, r.status_code, r.text)
        message = r.json()["error"]
        assert word in message and "Traceback" not in message, (i, message)
        _alive(server)
    assert c.get("/api/health").json()["images"] == 8  # nothing was added by the bad requests


def test_concurrent_searches_agree_with_sequential(server):
    pics = server["photos"]
    names = ["coffee", "chelsea", "rocket", "ihc"] * 3
    files = {n: _jpeg(pics[n][20:-20, 20:-20]) for n in set(names)}

    def one(name):
        with httpx.Client(base_url=server["url"], timeout=120) as cl:
            r = cl.post("/api/search", files={"file": ("q.jpg", files[name])}, data={"top_k": "3"})
            assert r.status_code == 200, r.text
            return [(h["image_id"], h["score"], h["inliers"]) for h in r.json()["hits"]]

    sequential = {n: one(n) for n in set(names)}
    with ThreadPoolExecutor(6) as pool:
        parallel = list(pool.map(one, names))
    for name, hits in zip(names, parallel):
        assert hits == sequential[name], name
        assert hits[0][0].startswith(name)


def _chrome_driver(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("headless Chromium test needs chromium and chromedriver (apt-get install chromium "
                    "chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service as ChromeService

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,1000", f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=ChromeService(driver), options=opts)


@pytest.mark.slow
def test_page_in_headless_chromium(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    query = tmp_path / "query.jpg"
    Image.fromarray(server["photos"]["coffee"][30:380, 40:560]).save(query, quality=92)
    browser = _chrome_driver(tmp_path)
    try:
        browser.set_page_load_timeout(60)
        browser.get(server["url"] + "/")
        wait = WebDriverWait(browser, 90)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#pick img")) == 8)
        browser.find_element(By.ID, "file").send_keys(str(query))
        browser.find_element(By.ID, "box").send_keys("20,20,500,340")
        browser.find_element(By.ID, "search").click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#results .hit")))
        hits = browser.find_elements(By.CSS_SELECTOR, "#results .hit")
        assert len(hits) == 8
        assert "coffee" in hits[0].text and "inliers" in hits[0].text
        assert "results in" in browser.find_element(By.ID, "status").text
        # pick an indexed photo instead, search again
        browser.find_element(By.CSS_SELECTOR, "#pick img[title='rocket']").click()
        browser.find_element(By.ID, "search").click()
        wait.until(lambda b: "rocket" in (b.find_elements(By.CSS_SELECTOR, "#results .hit") or [None])[0].text
                   if b.find_elements(By.CSS_SELECTOR, "#results .hit") else False)
        shot = tmp_path / "serve_page.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        logs = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
        assert not logs, logs
    finally:
        browser.quit()
