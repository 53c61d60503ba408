"""The ``d2r`` command line. Each sub-command lives in its own module of this package and defines
``add_parser(subparsers)`` (which registers the parser and sets ``func``).

Exit codes: 0 ok, 1 failure (one line on stderr naming the file or option and the problem), 2 usage,
3 partial failure (some inputs failed; a summary is printed), 130 interrupted. ``--debug`` (anywhere on the
command line) shows the traceback instead of the one-line message.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

import d2r
from d2r._lock import LockedError
from d2r.config import parse_overrides

# Sub-command modules, in the order --help lists them.
COMMANDS: list[str] = ["demo", "index", "search", "duplicates", "extract", "train_codebook", "import_codebook", "bench",
                       "serve"]

OK, FAILURE, USAGE, PARTIAL = 0, 1, 2, 3


class UsageError(ValueError):
    """A bad combination of command-line arguments (exit 2)."""


def key_value(text: str) -> str:
    """argparse ``type`` of ``--set``: ``KEY=VALUE`` with a dotted KEY, else a usage error (exit 2); the value
    is parsed and checked later, with the config (a bad value is exit 1, naming the option)."""
    try:
        parse_overrides([text])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("--set ", "", 1)) from None
    return text


def positive_int(text: str) -> int:
    """argparse ``type`` of a count flag (``--codebook-size K``): a whole number >= 1, else a usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2r", description="Detect-to-Retrieve instance image retrieval.",
                                     epilog="exit codes: 0 ok, 1 failure, 2 usage, 3 partial failure, "
                                            "130 interrupted (what was saved is kept)")
    parser.add_argument("--version", action="version", version=f"d2r {d2r.__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (allowed anywhere on the line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"d2r.cli.{name}").add_parser(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    text = " ".join(text.split()) or type(exc).__name__
    return text


EXPECTED = (ValueError, OSError, KeyError, LookupError, ImportError, LockedError)


def error_line(name: str, exc: BaseException) -> str:
    """The one line a failed command prints: ``NAME: error: message`` for an expected error (bad input,
    a file problem), else the exception type and a hint to rerun with --debug."""
    expected = isinstance(exc, EXPECTED)
    prefix = "error" if expected else f"unexpected error ({type(exc).__name__})"
    hint = "" if expected else " (rerun with --debug for the traceback)"
    return f"{name}: {prefix}: {_one_line(exc)}{hint}"


def _exit_now(code: int) -> None:
    """Flush and end the process without the interpreter's finalization (LLVM, OpenBLAS and OpenCV tear-down:
    0.15-0.4 s measured after a ``d2r search``)."""
    import os

    try:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
    finally:
        os._exit(code)


def main(argv=None) -> int:
    program = argv is None  # run as the ``d2r`` program (not called with arguments from Python)
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: argparse prints usage + one error line, SystemExit(2)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return USAGE
    # --quiet: warnings only, or nothing but errors where the command lists its failures itself (quiet_level)
    level = getattr(args, "quiet_level", logging.WARNING) if getattr(args, "quiet", False) else logging.INFO
    if getattr(args, "quiet", False):  # TensorFlow's C++ info and warning lines too (a setting given wins)
        import os

        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.DEBUG if debug else level, format="%(levelname)s %(name)s: %(message)s")
    name = " ".join(filter(None, ["d2r", args.command, getattr(args, "action", None),
                                  getattr(args, "protocol", None)]))
    try:
        code = int(args.func(args) or 0)
        if program and getattr(args, "exit_now", False):  # a command that leaves nothing behind (d2r search)
            _exit_now(code)
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of the output went away (`d2r ... | head -1`): nothing to report
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return FAILURE
    except SystemExit:
        raise
    except Exception as exc:
        if debug:
            raise
        print(error_line(name, exc), file=sys.stderr)
        return USAGE if isinstance(exc, UsageError) else FAILURE


if __name__ == "__main__":
    sys.exit(main())
