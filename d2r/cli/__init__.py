"""The ``d2r`` command line. Each sub-command lives in its own module of this package and defines
``add_parser(subparsers)`` (which registers the parser and sets ``func``); exit codes: 0 ok, 1 failure, 2 usage."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

import d2r

# Sub-command modules, in the order --help lists them.
COMMANDS: list[str] = ["demo", "index", "search", "extract", "train_codebook", "import_codebook", "bench", "serve"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2r", description="Detect-to-Retrieve instance image retrieval.")
    parser.add_argument("--version", action="version", version=f"d2r {d2r.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"d2r.cli.{name}").add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    level = logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as exc:
        print(f"d2r {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyError as exc:  # an unknown image id
        print(f"d2r {args.command}: error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
