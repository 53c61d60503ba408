"""Saving an engine's sources table batch by batch: the journal (sources.log + sources.json snapshot) vs
rewriting the whole sources.json after every batch (d2r before the journal).

    python benchmarks/bench_sources.py [--images 100000] [--batch 64] [--old] [--json]

Prints seconds and bytes written (the kernel's count, /proc/self/io wchar; Linux) for ``--images`` GLDv2-like
ids saved ``--batch`` at a time, the final size on disk, and the seconds of a cold read of the table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from d2r import _io
from d2r.engine.sources import SourcesTable


def written() -> int:
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["wchar"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--old", action="store_true", help="rewrite the whole sources.json each batch instead")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        table = {} if args.old else SourcesTable(folder)
        w0, t0 = written(), time.perf_counter()
        for start in range(0, args.images, args.batch):
            for i in range(start, min(args.images, start + args.batch)):
                h = f"{i * 2654435761 % 2**64:016x}"  # GLDv2-like: 16 hex digits, three folder levels
                table[h] = f"/data/gldv2/train/{h[0]}/{h[1]}/{h[2]}/{h}.jpg"
            if args.old:
                _io.write_json(folder / "sources.json", table)
            else:
                table.save()
        out = {"mode": "old" if args.old else "journal", "images": args.images, "batch": args.batch,
               "seconds": round(time.perf_counter() - t0, 2), "mb_written": round((written() - w0) / 1e6, 1),
               "mb_on_disk": round(sum(p.stat().st_size for p in folder.iterdir()) / 1e6, 1)}
        t0 = time.perf_counter()
        SourcesTable(folder).load()  # also reads an old engine's sources.json
        out["cold_read_seconds"] = round(time.perf_counter() - t0, 3)
    print(json.dumps(out) if args.json else "  ".join(f"{k}={v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
