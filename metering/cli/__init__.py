"""``metering`` command line: the one place that wires settings to services.

One module per group of commands, each with its parser beside its handlers
(:mod:`.ops`, :mod:`.usage`, :mod:`.accounts`, :mod:`.alerts`, :mod:`.billing`); :mod:`.common` holds what
they share. Errors are one line on stderr: exit 2 for bad arguments, 1 for
anything else (service unreachable, failed migration ...); ``--debug`` shows
the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from metering.cli import accounts, alerts, billing, ops, usage
from metering.cli.common import EXIT_USAGE, Parser
from metering.errors import InputError, MeteringError
from metering.settings import Settings

_COMMANDS = {
    **ops.COMMANDS,
    **usage.COMMANDS,
    **accounts.COMMANDS,
    **alerts.COMMANDS,
    **billing.COMMANDS,
}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="metering", description="API usage metering pipeline")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    ops.add_parsers(sub)
    usage.add_parsers(sub)
    accounts.add_parsers(sub)
    alerts.add_parsers(sub)
    billing.add_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env()
        handler = _COMMANDS[args.command]
        return handler(args, settings) or 0
    except MeteringError as exc:
        if args.debug:
            raise
        print(f"metering: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, InputError) else 1
    except KeyboardInterrupt:
        return 130
