"""`dissect download NAME --to DIR`: fetch, verify and extract a Broden archive.

Exit codes: 0 done, 2 bad usage or a bad archive (InputError), 1 a network failure
(no URL delivered the archive) or any other failure, with a message and no traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from broden.download import DATASETS, MIRRORS_ENV, DownloadError, download_dataset, get_spec, prepare_directory
from broden.errors import InputError

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `download` subcommand."""
    p = subparsers.add_parser(
        "download", help="download and extract a Broden dataset",
        description="Download a Broden archive (resuming an interrupted download), verify it and "
                    "extract it safely. A zip already at DIR/<name>.zip is verified and used "
                    f"without downloading. Extra mirrors may also come from ${MIRRORS_ENV} "
                    "(space- or comma-separated base URLs). Exit 1 when no URL delivered the "
                    "archive, 2 on bad usage or a bad archive.")
    p.add_argument("name", metavar="NAME", help=f"dataset: {', '.join(sorted(DATASETS))}")
    p.add_argument("--to", required=True, type=Path, metavar="DIR",
                   help="directory that receives the archive and the extracted dataset")
    p.add_argument("--mirror", action="append", default=[], metavar="URL",
                   help="base URL tried before the reference host (repeatable, tried in order)")
    p.add_argument("--mirrors-only", action="store_true",
                   help="do not fall back to the reference host")
    p.add_argument("--sha256", metavar="HEX", help="required SHA-256 of the archive")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="network timeout per request (default 60)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Download (or reuse) the dataset and print the extracted directory; returns the exit code."""
    get_spec(args.name)  # an unknown name fails before anything touches the disk
    prepare_directory(args.to, option="--to")
    try:
        path = download_dataset(args.name, args.to, mirrors=args.mirror, sha256=args.sha256,
                                progress=not args.quiet, timeout=args.timeout,
                                include_reference=not args.mirrors_only)
    except DownloadError as e:  # the network failed, not the user's input
        print(f"dissect download: failed: {e}", file=sys.stderr)
        return 1
    except InputError:
        raise  # the CLI maps it to 2
    except Exception as e:  # e.g. disk full while extracting: exit 1, the traceback only in the debug log
        log.debug("dissect download failed", exc_info=True)
        print(f"dissect download: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0
