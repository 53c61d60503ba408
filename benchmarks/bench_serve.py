"""Load test of ``d2r serve`` on loopback: p50/p99 latency and throughput for 1, 4 and 16 concurrent clients.

    python benchmarks/bench_serve.py [--index ENGINE_DIR] [--requests 48] [--duration 60] [--concurrency 1 4 16]

Starts ``d2r serve`` on 127.0.0.1 (a free port) in its own process, then for each concurrency level runs that many
client threads that POST the dev query photos (``$D2R_SHARED/data/instance_bench_dev``, the 111 queries, uploaded
as files) to ``/api/search`` until ``--requests`` requests are done or ``--duration`` seconds have passed. Without
``--index``, an engine with the default config is built from the 367 dev database images in ``--workdir`` (reused
when it is already there). Prints one markdown row per level; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dev_root() -> Path:
    root = Path(os.environ.get("D2R_SHARED", "../shared")) / "data" / "instance_bench_dev"
    if not (root / "queries.json").is_file():
        sys.exit(f"bench_serve: dev photos not found under {root} (set D2R_SHARED)")
    return root


def _engine(args, dev: Path) -> Path:
    from d2r.engine import Engine

    if args.index:
        return Path(args.index)
    path = Path(args.workdir) / "serve-dev-engine"
    if not (path / "engine.json").is_file():
        print(f"building {path} from {dev / 'images'} ...", file=sys.stderr)
        Engine.create(path).index(dev / "images", progress=True)
    return path


def _load(url, payloads, clients, requests, duration, top_k):
    import httpx

    lock = threading.Lock()
    state = {"next": 0, "lat": [], "errors": 0}
    t_end = time.perf_counter() + duration

    def worker():
        with httpx.Client(base_url=url, timeout=max(duration, 30)) as c:
            while time.perf_counter() < t_end:
                with lock:
                    i = state["next"]
                    if i >= requests:
                        return
                    state["next"] += 1
                name, data = payloads[i % len(payloads)]
                t = time.perf_counter()
                r = c.post("/api/search", files={"file": (name, data)}, data={"top_k": str(top_k)})
                dt = time.perf_counter() - t
                with lock:
                    if r.status_code == 200:
                        state["lat"].append(dt)
                    else:
                        state["errors"] += 1

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(state["lat"]) * 1e3
    return {"clients": clients, "done": int(lat.size), "errors": state["errors"], "wall_s": wall,
            "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
            "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
            "throughput_qps": lat.size / wall}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--index", help="engine folder to serve (default: build one from the dev photos)")
    p.add_argument("--workdir", default=".bench_serve", help="where the dev engine is built (default .bench_serve)")
    p.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    p.add_argument("--duration", type=float, default=60.0, help="seconds at most per concurrency level")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    import httpx

    dev = _dev_root()
    engine = _engine(args, dev)
    queries = list(json.loads((dev / "queries.json").read_text()))
    payloads = [(Path(q).name, (dev / q).read_bytes()) for q in queries]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "d2r", "serve", str(engine), "--port", str(port), "--quiet"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit("bench_serve: the server did not start: " + (server.stderr.read() if server.poll() else ""))
            time.sleep(0.3)
        images = httpx.get(url + "/api/health").json()["images"]
        _load(url, payloads[:2], 1, 2, args.duration, args.top_k)  # warm-up (first requests open caches)
        rows = [_load(url, payloads, c, args.requests, args.duration, args.top_k) for c in args.concurrency]
    finally:
        server.terminate()
        server.wait(timeout=30)
    if args.json:
        print(json.dumps({"images": images, "rows": rows}, indent=1))
        return 0
    print(f"{images} images indexed, {len(payloads)} query photos, {args.requests} requests per level "
          f"(at most {args.duration:.0f} s), top-{args.top_k}, re-ranking on, {os.cpu_count()} CPUs")
    print("| clients | requests done | errors | p50 ms | p99 ms | throughput q/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['done']} | {r['errors']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
              f"{r['throughput_qps']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
