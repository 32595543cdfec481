"""``metering`` command line: the one place that wires settings to services.

Errors are one line on stderr: exit 2 for bad arguments, 1 for anything
else (service unreachable, failed migration ...); ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import uuid
from collections.abc import Sequence
from typing import Any, NoReturn

from metering.errors import MeteringError
from metering.settings import Settings

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _number(
    kind: type[float] | type[int], low: float, high: float | None = None, *, above: bool = False
) -> Any:
    """An argparse type: a number of ``kind`` >= low (> low when ``above``), <= high."""

    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < low or (above and value == low) or (high is not None and value > high):
            if high is not None:
                bounds = f"between {low:g} and {high:g}"
            else:
                bounds = f"{'>' if above else '>='} {low:g}"
            raise argparse.ArgumentTypeError(f"{text} must be {bounds}")
        return value

    return parse


_positive_int = _number(int, 1)
_non_negative_int = _number(int, 0)
_positive_float = _number(float, 0, above=True)
_ratio = _number(float, 0, 1)


def _uuid(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a user id (UUID)") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="metering", description="API usage metering pipeline")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    stack = sub.add_parser("stack", help="local Kafka/PostgreSQL/Redis on 127.0.0.1")
    stack.add_argument("action", choices=["up", "down", "status"])

    db = sub.add_parser("db", help="database schema")
    db.add_argument(
        "action",
        choices=["migrate", "maintain"],
        help="migrate: apply sql/ migrations; maintain: partitions ahead, drop expired",
    )

    topics = sub.add_parser("topics", help="Kafka topics")
    topics.add_argument("action", choices=["ensure"])

    worker = sub.add_parser("worker", help="run the stream processors (faust worker)")
    worker.add_argument("--web-port", type=_positive_int, help="health/metrics port (default 6066)")
    worker.add_argument("--no-web", action="store_true", help="disable the web server")
    worker.add_argument(
        "-l", "--loglevel", default="info", choices=["crit", "error", "warn", "info", "debug"]
    )

    sim = sub.add_parser("simulate", help="publish realistic usage events")
    sim.add_argument("--users", type=_positive_int, default=5, help="number of users (default 5)")
    sim.add_argument("--events", type=_positive_int, default=1000, help="events to send")
    sim.add_argument(
        "--rate", type=_positive_float, help="events per second (default: as fast as possible)"
    )
    sim.add_argument(
        "--duplicates",
        type=_ratio,
        default=0.0,
        help="fraction of events sent twice, like producer retries (0-1)",
    )
    sim.add_argument(
        "--bad",
        type=_non_negative_int,
        default=0,
        help="malformed records to send (they must reach the DLQ)",
    )
    sim.add_argument("--seed", type=int, help="random seed")

    usage = sub.add_parser("usage", help="daily usage from PostgreSQL, with the Redis counters")
    usage.add_argument("--user", type=_uuid, help="only this user id")
    usage.add_argument("--days", type=_positive_int, default=7, help="days back, UTC (default 7)")

    counters = sub.add_parser("counters", help="Redis usage counters")
    counters.add_argument(
        "action",
        choices=["rebuild"],
        help="rebuild: re-derive today's and yesterday's counters from PostgreSQL",
    )
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
        return 1
    except KeyboardInterrupt:
        return 130


# -- commands ----------------------------------------------------------------


def cmd_stack(args: argparse.Namespace, settings: Settings) -> int:
    from metering import stack

    if args.action == "up":
        stack.up(settings)
    elif args.action == "down":
        stack.down(settings)
    else:
        state = stack.status(settings)
        for name, up in state.items():
            print(f"{name:<28} {'up' if up else 'down'}")
        return 0 if all(state.values()) else 1
    return 0


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    from metering.db import connect
    from metering.db.migrate import maintain_partitions, migrate

    async def go() -> None:
        conn = await connect(settings.database_url)
        try:
            if args.action == "migrate":
                applied = await migrate(conn)
                if applied:
                    for m in applied:
                        print(f"applied {m.version:04d}_{m.name}")
                else:
                    print("database is up to date")
            else:
                ensured, dropped = await maintain_partitions(
                    conn,
                    months_ahead=settings.partitions_ahead_months,
                    retention_days=settings.retention_days,
                )
                print(f"partitions present: {', '.join(ensured)}")
                print(f"partitions dropped: {', '.join(dropped) or 'none'}")
        finally:
            await conn.close()

    asyncio.run(go())
    return 0


def cmd_topics(args: argparse.Namespace, settings: Settings) -> int:
    from metering.topics import ensure_topics

    created = asyncio.run(ensure_topics(settings))
    print(f"created: {', '.join(created)}" if created else "topics exist")
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from metering.topics import ensure_topics

    asyncio.run(ensure_topics(settings))
    # streams.app reads its settings at import: hand the flags over through them.
    if args.no_web:
        os.environ["METERING_WEB_ENABLED"] = "false"
    if args.web_port:
        os.environ["METERING_WEB_PORT"] = str(args.web_port)
    from faust.worker import Worker

    from streams.app import app

    worker = Worker(app, loglevel=args.loglevel, quiet=True)
    worker.execute_from_commandline()  # runs until SIGINT/SIGTERM, then exits
    return 0


def cmd_simulate(args: argparse.Namespace, settings: Settings) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from metering import simulate
    from metering.db import connect
    from metering.producer import UsageProducer
    from metering.topics import ensure_topics

    console = Console()

    async def go() -> simulate.SimReport:
        await ensure_topics(settings)
        conn = await connect(settings.database_url)
        try:
            users = await simulate.ensure_users(conn, args.users)
        finally:
            await conn.close()
        producer = UsageProducer(
            bootstrap_servers=settings.kafka_bootstrap, topic=settings.events_topic
        )
        await producer.start()
        try:
            with Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                disable=not console.is_terminal,
            ) as bar:
                task = bar.add_task("sending", total=args.events)
                return await simulate.run(
                    producer,
                    users,
                    events=args.events,
                    rate=args.rate,
                    duplicate_ratio=args.duplicates,
                    bad_records=args.bad,
                    seed=args.seed,
                    progress=lambda n: bar.advance(task, n),
                )
        finally:
            await producer.stop()

    report = asyncio.run(go())
    rate = report.sent_valid / report.seconds if report.seconds else 0.0
    console.print(
        f"sent {report.sent_valid} events ({report.sent_duplicates} duplicate re-sends, "
        f"{report.sent_bad} malformed) to {settings.events_topic} in {report.seconds:.1f}s "
        f"({rate:,.0f}/s); dropped {report.dropped}"
    )
    for email, n in sorted(report.per_user.items(), key=lambda kv: -kv[1]):
        console.print(f"  {email:<28} {n:>8}")
    anonymous = report.sent_valid - sum(report.per_user.values())
    console.print(f"  {'(anonymous)':<28} {anonymous:>8}")
    return 0


def cmd_usage(args: argparse.Namespace, settings: Settings) -> int:
    import redis.asyncio as aioredis
    from rich.console import Console
    from rich.table import Table

    from metering.counters import UsageCounters
    from metering.db import connect
    from metering.report import daily_usage

    async def go() -> list[Any]:
        conn = await connect(settings.database_url)
        client = aioredis.from_url(settings.redis_url, socket_timeout=5)
        try:
            counters = UsageCounters(redis=client, prefix=settings.redis_key_prefix)
            return await daily_usage(conn, counters, days=args.days, user_id=args.user)
        finally:
            await conn.close()
            await client.aclose()

    rows = asyncio.run(go())
    table = Table(title=f"daily usage, last {args.days} day(s), UTC")
    for col in (
        "date",
        "user",
        "tier",
        "requests",
        "units",
        "4xx",
        "5xx",
        "avg ms",
        "quota",
        "redis",
    ):
        table.add_column(col, justify="left" if col in ("date", "user", "tier") else "right")
    for r in rows:
        quota = f"{100 * r.requests / r.daily_quota:.1f}%" if r.daily_quota else "unlimited"
        redis_cell = "-" if r.redis_requests is None else str(r.redis_requests)
        if r.redis_requests is not None and r.redis_requests != r.requests:
            redis_cell += " (!)"
        table.add_row(
            r.day.isoformat(),
            r.email or str(r.user_id),
            r.tier or "?",
            f"{r.requests:,}",
            f"{r.units:,}",
            str(r.client_errors),
            str(r.server_errors),
            f"{r.avg_ms:.1f}" if r.avg_ms is not None else "-",
            quota,
            redis_cell,
        )
    console = Console() if sys.stdout.isatty() else Console(width=160)
    console.print(table if rows else "no usage recorded in that range")
    return 0


def cmd_counters(args: argparse.Namespace, settings: Settings) -> int:
    import redis.asyncio as aioredis

    from metering.counters import UsageCounters
    from metering.db import connect

    async def go() -> int:
        conn = await connect(settings.database_url)
        client = aioredis.from_url(settings.redis_url, socket_timeout=5)
        try:
            counters = UsageCounters(redis=client, prefix=settings.redis_key_prefix)
            return await counters.rebuild(conn)
        finally:
            await conn.close()
            await client.aclose()

    print(f"rebuilt {asyncio.run(go())} counters from daily_usage")
    return 0


_COMMANDS = {
    "stack": cmd_stack,
    "db": cmd_db,
    "topics": cmd_topics,
    "worker": cmd_worker,
    "simulate": cmd_simulate,
    "usage": cmd_usage,
    "counters": cmd_counters,
}

if __name__ == "__main__":
    sys.exit(main())
