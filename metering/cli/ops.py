"""``metering stack|db|topics|worker|counters``: running and maintaining the pipeline."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from typing import Any

from metering.cli.common import Parser, positive_int, with_db, with_db_and_redis
from metering.settings import Settings


def add_parsers(sub: argparse._SubParsersAction[Parser]) -> None:
    stack = sub.add_parser("stack", help="local Kafka/PostgreSQL/Redis on 127.0.0.1")
    stack.add_argument("action", choices=["up", "down", "status"])

    db = sub.add_parser("db", help="database schema")
    db.add_argument(
        "action",
        choices=["migrate", "maintain"],
        help="migrate: apply sql/ migrations; maintain: partitions ahead, archive "
        "(METERING_ARCHIVE_DIR) and drop expired",
    )

    topics = sub.add_parser("topics", help="Kafka topics")
    topics.add_argument("action", choices=["ensure"])

    worker = sub.add_parser("worker", help="run the stream processors (faust worker)")
    worker.add_argument("--web-port", type=positive_int, help="health/metrics port (default 6066)")
    worker.add_argument("--no-web", action="store_true", help="disable the web server")
    worker.add_argument(
        "-l", "--loglevel", default="info", choices=["crit", "error", "warn", "info", "debug"]
    )

    counters = sub.add_parser("counters", help="Redis usage counters")
    counters.add_argument(
        "action",
        choices=["rebuild"],
        help="rebuild: re-derive today's and yesterday's counters from PostgreSQL",
    )


def cmd_stack(args: argparse.Namespace, settings: Settings) -> int:
    from metering.dev import stack

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
    from metering.db.lifecycle import maintain
    from metering.db.migrate import migrate

    async def go(conn: Any) -> None:
        if args.action == "migrate":
            applied = await migrate(conn)
            if applied:
                for m in applied:
                    print(f"applied {m.version:04d}_{m.name}")
            else:
                print("database is up to date")
        else:
            done = await maintain(
                conn,
                months_ahead=settings.partitions_ahead_months,
                retention_days=settings.retention_days,
                archive_dir=settings.archive_dir or None,
            )
            print(f"partitions present: {', '.join(done.created)}")
            for a in done.archived:
                print(
                    f"archived {a.partition}: {a.rows:,} rows -> {a.path} (sha256 {a.sha256[:16]}...)"
                )
            print(f"partitions dropped: {', '.join(done.dropped) or 'none'}")
            if done.default_partition:
                print(f"warning: usage_logs has a DEFAULT partition {done.default_partition}")

    with_db(settings, go)
    return 0


def cmd_topics(args: argparse.Namespace, settings: Settings) -> int:
    from metering.kafka import ensure_topics

    created = asyncio.run(ensure_topics(settings))
    print(f"created: {', '.join(created)}" if created else "topics exist")
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from metering.kafka import ensure_topics

    asyncio.run(ensure_topics(settings))
    if args.no_web:
        settings = dataclasses.replace(settings, web_enabled=False)
    if args.web_port:
        settings = dataclasses.replace(settings, web_port=args.web_port)
    from faust.worker import Worker

    from streams.app import create_app

    worker = Worker(create_app(settings), loglevel=args.loglevel, quiet=True)
    worker.execute_from_commandline()  # runs until SIGINT/SIGTERM, then exits
    return 0


def cmd_counters(args: argparse.Namespace, settings: Settings) -> int:
    from metering.usage.counters import UsageCounters

    async def go(conn: Any, client: Any) -> int:
        return await UsageCounters(redis=client, prefix=settings.redis_key_prefix).rebuild(conn)

    print(f"rebuilt {with_db_and_redis(settings, go)} counters from daily_usage")
    return 0


COMMANDS = {
    "stack": cmd_stack,
    "db": cmd_db,
    "topics": cmd_topics,
    "worker": cmd_worker,
    "counters": cmd_counters,
}
