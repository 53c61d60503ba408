"""What every benchmark result records beside its numbers: the commit, the command, the machine and the date.

    from benchmarks._record import header, write_json
    out = {"header": header(), "rows": rows}
    write_json(args.json, out)          # a path, or "-" for stdout

Run benchmark scripts as modules from the repository root (``python -m benchmarks.speed.bench_core``), so the
checkout's ``d2r`` is the one imported without any ``sys.path`` edit.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit() -> dict:
    """``{"commit": short hash or None, "dirty": bool}``: dirty when tracked files differ from the commit."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": _git("rev-parse", "--short", "HEAD"), "dirty": bool(status)}


def machine() -> dict:
    """CPU model, core count, memory, load average, GPU (from ``nvidia-smi`` when present) and thread settings."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        memory = round(pages * size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    gpu = None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        gpu = out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory, "gpu": gpu, "load_average": load,
            "python": platform.python_version(), "platform": platform.platform(),
            "threads": {k: os.environ[k] for k in THREAD_VARIABLES if k in os.environ}}


def header(command: list[str] | None = None) -> dict:
    """The record every result file starts with: commit, command, machine, UTC date."""
    argv = command if command is not None else [Path(sys.executable).name, *sys.orig_argv[1:]] \
        if hasattr(sys, "orig_argv") else sys.argv
    return {**commit(), "command": shlex.join(str(a) for a in argv), "machine": machine(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def write_json(target, obj) -> None:
    """Write ``obj`` as indented JSON to the path ``target``, or to stdout for ``-``."""
    text = json.dumps(obj, indent=1, sort_keys=False) + "\n"
    if str(target) == "-":
        sys.stdout.write(text)
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
