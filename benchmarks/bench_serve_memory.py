"""Resident memory of ``d2r serve`` under concurrent 49-Mpx uploads (issue 23, D3), on loopback.

    python benchmarks/bench_serve_memory.py [--clients 16] [--budgets 512 1024] [--kinds jpeg png mix]
                                            [--no-trim-too] [--out benchmarks/results/serve_memory.md]

Builds a small engine from scikit-image's sample photos in ``--workdir`` (nothing downloaded), then for each
memory budget (``d2r serve --memory-mb``) and upload kind starts a fresh ``d2r serve`` process, runs one small
search (kernels loaded: the base RSS), then ``--clients`` concurrent clients each POST one 49-Mpx image to
``/api/search``: ``jpeg`` an 8570x5720 photo (decoded at 1/8 scale by JPEG draft), ``png`` a 7000x7000 PNG
(decoded whole, then reduced), ``mix`` half of each. VmRSS of the server is read from /proc every 20 ms.
``--no-trim-too`` adds a row per kind with ``malloc_trim`` switched off (the service's glibc trim after each
decode, see ``d2r.serve.app._trim``), to show what the allocator alone keeps resident. Appends a markdown table
with the command, commit, machine and date to ``--out``.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIG = (8570, 5720)


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _engine(workdir: Path) -> Path:
    import skimage.data as data
    from PIL import Image

    from d2r.engine import Engine
    from d2r.engine.config import EngineConfig

    eng = workdir / "eng"
    if (eng / "engine.json").is_file():
        return eng
    photos = workdir / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    for name in ("coffee", "chelsea", "rocket", "immunohistochemistry"):
        p = getattr(data, name)()
        Image.fromarray(p).save(photos / f"{name}.jpg", quality=92)
        h, w = p.shape[:2]
        Image.fromarray(p[h // 10:, w // 8:]).save(photos / f"{name}_crop.jpg", quality=92)
    cfg = EngineConfig.from_dict({"features": {"options": {"max_features": 500}},
                                  "codebook": {"size": 64, "iterations": 4}, "rerank": {"num_to_rerank": 8}})
    Engine.create(eng, cfg).index(photos, progress=False)
    return eng


def _uploads():
    import skimage.data as data
    from PIL import Image

    jpeg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(data.chelsea()).resize(BIG, Image.BICUBIC).save(jpeg, format="JPEG", quality=90)
    Image.new("RGB", (7000, 7000), (90, 120, 150)).save(png, format="PNG")
    return jpeg.getvalue(), png.getvalue()


def _serve(eng: Path, budget: int, trim: bool, log):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["serve", str(eng), "--port", str(port), "--quiet", "--memory-mb", str(budget)]
    code = ("import sys, d2r.cli, d2r.serve.app as app\n"
            + ("" if trim else "app._MALLOC_TRIM = None\n")
            + f"sys.exit(d2r.cli.main({argv!r}))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def _run(eng, budget, kind, trim, clients, jpeg, png, log) -> dict:
    import httpx

    proc, url = _serve(eng, budget, trim, log)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.3)
        httpx.post(url + "/api/search", data={"id": "coffee", "top_k": "3"}, timeout=120)
        base = _rss_mb(proc.pid)
        peak, done = [base], threading.Event()

        def watch():
            while not done.is_set():
                peak.append(_rss_mb(proc.pid))
                time.sleep(0.02)

        def client(i):
            data = {"jpeg": jpeg, "png": png, "mix": jpeg if i % 2 == 0 else png}[kind]
            with httpx.Client(base_url=url, timeout=600) as c:
                return c.post("/api/search", files={"file": ("x", data)}, data={"top_k": "3"}).status_code

        watcher = threading.Thread(target=watch)
        watcher.start()
        t0 = time.monotonic()
        try:
            with ThreadPoolExecutor(clients) as pool:
                codes = list(pool.map(client, range(clients)))
        finally:
            done.set()
            watcher.join()
        seconds = time.monotonic() - t0
        time.sleep(0.5)
        return {"budget": budget, "kind": kind, "trim": trim, "ok": codes.count(200), "base": base,
                "peak": max(peak), "hwm": _rss_mb(proc.pid, "VmHWM"), "after": _rss_mb(proc.pid),
                "seconds": seconds}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--budgets", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--kinds", nargs="+", default=["jpeg", "png", "mix"], choices=["jpeg", "png", "mix"])
    p.add_argument("--no-trim-too", action="store_true")
    p.add_argument("--workdir", default="/tmp/d2r-bench-serve-memory")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_memory.md"))
    args = p.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    eng = _engine(workdir)
    jpeg, png = _uploads()
    runs = [(b, k, True) for b in args.budgets for k in args.kinds]
    if args.no_trim_too:
        runs += [(max(args.budgets), k, False) for k in args.kinds]
    load_before = os.getloadavg()
    rows = []
    with open(workdir / "server.log", "a") as log:
        for budget, kind, trim in runs:
            r = _run(eng, budget, kind, trim, args.clients, jpeg, png, log)
            rows.append(r)
            print(r, file=sys.stderr)
    load_after = os.getloadavg()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    lines = [f"\n## {time.strftime('%Y-%m-%d %H:%M')} · commit {commit}",
             "",
             f"`python benchmarks/bench_serve_memory.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
             f" · {platform.node()} ({os.cpu_count()} CPUs, {mem} MB RAM, Python {platform.python_version()})"
             f" · load {load_before[0]:.1f} before, {load_after[0]:.1f} after · {args.clients} concurrent clients,"
             f" one 49-Mpx upload each (jpeg {len(jpeg) / 2**20:.1f} MB, png {len(png) / 2**20:.2f} MB)",
             "",
             "| --memory-mb | uploads | malloc_trim | answered 200 | base RSS MB | peak RSS MB | peak − base MB "
             "| VmHWM MB | RSS after MB | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['budget']} | {r['kind']} | {'on' if r['trim'] else 'off'} | {r['ok']}/{args.clients} "
                     f"| {r['base']:.0f} | {r['peak']:.0f} | {r['peak'] - r['base']:.0f} | {r['hwm']:.0f} "
                     f"| {r['after']:.0f} | {r['seconds']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    if not out.exists():
        text = ("# `d2r serve` memory under concurrent large uploads\n\nWritten by "
                "`benchmarks/bench_serve_memory.py` (see its docstring).\n" + text)
    with open(out, "a") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
