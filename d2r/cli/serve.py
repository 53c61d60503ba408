"""``d2r serve``: a search service and web page over an engine folder (needs the ``[serve]`` extra)."""

from __future__ import annotations
from d2r.cli import UsageError
from d2r.serve import run as serve

INSTALL = 'pip install -e ".[serve]"'  # the README's command, run in the d2r checkout (d2r is not on PyPI)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve an index over HTTP (JSON API + web page)",
                              description="Serve an engine folder: a JSON API (search by photo or id, add, "
                                          "remove, info, health) and a web page at /. Answers only requests "
                                          "naming a loopback host or --host (add names with --allow-host) "
                                          "and refuses writes from other web sites. Needs the serve extra: "
                                          f"`{INSTALL}` in the d2r checkout.")
    p.add_argument("index", help="engine folder (made by `d2r index create`)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted upload (default 20 MB)")
    p.add_argument("--memory-mb", type=float, default=1024.0,
                   help="memory that decoding and describing images may use at once, all requests together "
                        "(default 1024 MB); requests wait for it")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests for this host name (repeatable; '*': any name)")
    p.add_argument("--quiet", action="store_true", help="only warnings in the log")
    p.set_defaults(func=run)


def run(args) -> int:
    import importlib.util
    from pathlib import Path


    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    if not args.max_upload_mb > 0:
        raise UsageError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    if not args.memory_mb >= 64:
        raise UsageError(f"--memory-mb must be at least 64, got {args.memory_mb}")
    if not (Path(args.index) / "engine.json").is_file():
        raise FileNotFoundError(f"{args.index}: no d2r engine here (engine.json missing)")
    missing = [m for m in ("fastapi", "uvicorn", "multipart") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"d2r serve needs {', '.join(missing)}: run `{INSTALL}` in the d2r checkout")
    _check_address(args.host, args.port)

    serve(args.index, host=args.host, port=args.port, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
          memory_bytes=int(args.memory_mb * 1024 * 1024), allowed_hosts=args.allow_host, quiet=args.quiet)
    return 0


def _check_address(host: str, port: int) -> None:
    """Refuse, in one line, an address the server cannot listen on (a port in use, an unknown host) before
    uvicorn starts: uvicorn logs the problem and exits with 3, which d2r documents as a partial failure."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as exc:
        raise OSError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
