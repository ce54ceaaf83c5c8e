"""The `piescope` command line: parse, call a service in backend/, print.

One module per command family (`models`, `pie`, `graphs`, `edges`, `train`, `toys`, `interp`,
`hagd`, `servers`); each adds its
sub-commands with `add_parsers` and binds each to its function with `set_defaults(run=...)`.
Any UserError becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from backend.cli import edges, graphs, hagd, interp, models, pie, servers, toys, train
from backend.errors import UserError
from backend.settings import Settings

FAMILIES = (models, pie, graphs, edges, train, toys, interp, hagd, servers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="piescope", description="Find, explain and check circuits in language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for family in FAMILIES:
        family.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings()
        return args.run(args, settings) or 0
    except UserError as err:
        print(f"piescope: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("piescope: interrupted", file=sys.stderr)
        return 130
