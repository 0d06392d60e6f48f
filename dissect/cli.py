"""The `dissect` command: one parser, one subcommand module per verb in dissect/commands/.

Exit codes: 0 success, 2 bad usage or input, 130 interrupted (SIGINT), 1 any other failure (a network
failure of a download included: broden.download.DownloadError is an InputError for library callers,
but not the user's mistake).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Sequence

from broden.errors import InputError

EPILOG = ("exit codes: 0 success; 2 bad usage or input (the message names the file, field or option); "
          "130 interrupted (Ctrl-C, SIGINT: `dissect run` resumes from its saved state when rerun); "
          "1 anything else, a network failure of a download included")

# name -> module under dissect.commands; each module has register(subparsers) and run(args) -> int.
COMMANDS = ("run", "layers", "download", "synth", "report", "compare", "demo")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="dissect",
        description="Network Dissection for CNNs: label what each unit detects, on Broden-format data.",
        epilog=EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"dissect.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad usage, 0 on --help
        return int(e.code or 0)
    quiet = getattr(args, "quiet", False)
    level = logging.DEBUG if args.verbose else (logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(level=level,
                        format="%(levelname)s %(name)s: %(message)s")
    from broden._progress import quieted
    from broden.download import DownloadError  # late: keeps the import of this module light

    try:
        with quieted(quiet):  # --quiet holds for this call only: a caller's process keeps its own switch
            return int(args.func(args) or 0)
    except DownloadError as e:  # the network failed, not the user's input (checked before InputError)
        print(f"dissect {args.command}: failed: {e}", file=sys.stderr)
        return 1
    except InputError as e:
        print(f"dissect {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dissect {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`dissect layers ... | head`): not an error. Point stdout at devnull so
        # the interpreter's final flush does not raise again on the closed pipe.
        _silence_stdout()
        return 0


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a real descriptor (captured in tests)
        pass


if __name__ == "__main__":
    sys.exit(main())
