"""``metering simulate|usage``: demo traffic in, daily usage out."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime
from typing import Any

from metering.cli.common import (
    Parser,
    month,
    non_negative_int,
    positive_float,
    positive_int,
    ratio,
    table,
    user_id,
    with_db,
    with_db_and_redis,
)
from metering.errors import InputError
from metering.settings import Settings


def add_parsers(sub: argparse._SubParsersAction[Parser]) -> None:
    sim = sub.add_parser("simulate", help="publish realistic usage events")
    sim.add_argument("--users", type=positive_int, default=5, help="number of users (default 5)")
    sim.add_argument("--events", type=positive_int, default=1000, help="events to send")
    sim.add_argument(
        "--rate", type=positive_float, help="events per second (default: as fast as possible)"
    )
    sim.add_argument(
        "--duplicates",
        type=ratio,
        default=0.0,
        help="fraction of events sent twice, like producer retries (0-1)",
    )
    sim.add_argument(
        "--bad",
        type=non_negative_int,
        default=0,
        help="malformed records to send (they must reach the DLQ)",
    )
    sim.add_argument("--seed", type=int, help="random seed")
    sim.add_argument(
        "--http",
        metavar="URL",
        help="send real HTTP requests to a metered app (examples/edge_app.py) "
        "instead of publishing events directly",
    )

    usage = sub.add_parser("usage", help="daily usage from PostgreSQL, with the Redis counters")
    usage.add_argument("--user", type=user_id, help="only this user id")
    usage.add_argument("--days", type=positive_int, default=7, help="days back, UTC (default 7)")
    usub = usage.add_subparsers(dest="action", required=False, parser_class=Parser)
    rb = usub.add_parser(
        "rebuild",
        help="recompute a month's daily tables from its raw events; show the differences",
    )
    rb.add_argument("--month", type=month, required=True, help="YYYY-MM")
    rb.add_argument("--apply", action="store_true", help="write the recomputed rows")

    rp = sub.add_parser(
        "report", help="a customer's monthly statement (chart, CSV), or the top consumers"
    )
    who = rp.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="user id or email")
    who.add_argument(
        "--top", type=positive_int, metavar="N", help="the month's N largest consumers"
    )
    rp.add_argument("--month", type=month, help="YYYY-MM (default: this month)")
    rp.add_argument(
        "--png", metavar="PATH", help="chart: daily requests, errors, latency percentiles"
    )
    rp.add_argument("--csv", metavar="PATH", help="the statement's days as CSV")


def cmd_simulate(args: argparse.Namespace, settings: Settings) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from metering.db import connect
    from metering.dev import simulate
    from metering.edge.producer import UsageProducer
    from metering.kafka import ensure_topics

    console = Console()
    if args.http and not args.http.startswith(("http://", "https://")):
        raise InputError(f"--http needs an http:// URL, got {args.http!r}")

    def progress_bar() -> Progress:
        return Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=not console.is_terminal,
        )

    async def go() -> tuple[simulate.SimReport | None, simulate.HttpReport | None]:
        await ensure_topics(settings)
        conn = await connect(settings.database_url)
        try:
            users = await simulate.ensure_users(conn, args.users)
            user_keys = await simulate.issue_keys(conn, users, settings.pepper) if args.http else {}
        finally:
            await conn.close()
        producer = UsageProducer(
            bootstrap_servers=settings.kafka_bootstrap, topic=settings.events_topic
        )
        await producer.start()
        try:
            with progress_bar() as bar:
                task = bar.add_task("sending", total=args.events)
                if args.http:
                    http = await simulate.run_http(
                        args.http.rstrip("/"),
                        users,
                        user_keys,
                        requests=args.events,
                        rate=args.rate,
                        seed=args.seed,
                        progress=lambda n: bar.advance(task, n),
                    )
                    sim = await simulate.run(producer, users, events=0, bad_records=args.bad)
                    return sim, http
                sim = await simulate.run(
                    producer,
                    users,
                    events=args.events,
                    rate=args.rate,
                    duplicate_ratio=args.duplicates,
                    bad_records=args.bad,
                    seed=args.seed,
                    progress=lambda n: bar.advance(task, n),
                )
                return sim, None
        finally:
            await producer.stop()

    report, http = asyncio.run(go())
    assert report is not None
    if http is not None:
        rate = http.sent / http.seconds if http.seconds else 0.0
        codes = ", ".join(f"{code}: {n}" for code, n in sorted(http.statuses.items()))
        console.print(
            f"sent {http.sent} requests to {args.http} in {http.seconds:.1f}s "
            f"({rate:,.0f}/s); responses {codes}"
        )
        for email, n in sorted(http.per_user.items(), key=lambda kv: -kv[1]):
            console.print(f"  {email:<28} {n:>8}")
        if report.sent_bad:
            console.print(
                f"plus {report.sent_bad} malformed records published to {settings.events_topic}"
            )
        return 0
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


def cmd_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    from metering.usage.rebuild import Rebuild

    r = with_db(settings, lambda conn: Rebuild(conn).run(args.month, apply=args.apply))
    print(
        f"{r.month:%Y-%m}: {r.raw_rows:,} raw events -> {r.daily_rows:,} user-days; "
        f"{len(r.daily_diffs)} user-days differ, {r.endpoint_diffs} key/endpoint rows differ "
        f"({r.histogram_diffs} latency histograms)"
    )
    if r.daily_diffs:
        table(
            "daily_usage: stored -> rebuilt",
            ["user", "date", "requests", "refused", "units", "errors"],
            [
                (d["user_id"], d["date"],
                 _change(d["stored_requests"], d["rebuilt_requests"]),
                 _change(d["stored_refused"], d["rebuilt_refused"]),
                 _change(d["stored_units"], d["rebuilt_units"]),
                 _change(d["stored_errors"], d["rebuilt_errors"]))
                for d in r.daily_diffs[:200]
            ],
        )  # fmt: skip
    if r.billed:
        table(
            "billing: units of the month",
            ["user", "invoice", "status", "billed", "stored", "rebuilt", "effect"],
            [
                (b["user_id"], b["number"] or "-", b["status"] or "not billed",
                 _n(b["billed_units"]), f"{b['stored_units']:,}", f"{b['rebuilt_units']:,}",
                 _effect(b))
                for b in r.billed
            ],
        )  # fmt: skip
    if r.clean:
        print("nothing to change")
    elif r.applied:
        print("applied: the month's daily_usage and daily_endpoint_usage are the rebuilt rows")
        if datetime.now(UTC).date().replace(day=1) == r.month:
            print("this month's quota counters follow: run `metering counters rebuild`")
    else:
        print("nothing written; run again with --apply to write the rebuilt rows")
    return 0


def _n(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _change(old: int | None, new: int | None) -> str:
    return f"{_n(old)} -> {_n(new)}" if old != new else _n(old)


def _effect(b: Any) -> str:
    if b["status"] == "final":
        delta = b["rebuilt_units"] - b["billed_units"]
        return f"{delta:+,} units as an adjustment on the next invoice" if delta else "none"
    if b["status"] == "draft":
        return "the draft follows at the next `metering bill`"
    return "-"


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from metering.usage import statement as st

    when_ = args.month or datetime.now(UTC).date().replace(day=1)
    if args.top:
        if args.png or args.csv:
            raise InputError("--png and --csv go with --user")
        rows = with_db(settings, lambda c: st.top(c, when_, args.top))
        table(
            f"top {args.top} consumers, {when_:%Y-%m}",
            ["#", "user", "tier", "units", "served", "refused", "invoice", "total"],
            [
                (r["rank"], r["email"], r["tier"], f"{r['units']:,}", f"{r['served']:,}",
                 f"{r['refused']:,}", r["number"] or r["status"] or "not billed",
                 f"{r['total']} {r['currency']}" if r["total"] is not None else "-")
                for r in rows
            ],
        )  # fmt: skip
        return 0
    s = with_db(settings, lambda c: st.statement(c, args.user, when_))
    print(f"Statement: {s.email} ({s.tier}), {s.month:%B %Y} (UTC days)")
    print(f"  {s.served:,} requests served, {s.refused:,} refused (never billed), "
          f"{s.errors:,} errors, {s.units:,} billable units on {len(s.days)} day(s)")  # fmt: skip
    if s.invoice is not None:
        inv = s.invoice
        print(f"  invoice {inv['number'] or 'draft #' + str(inv['id'])} ({inv['status']}): "
              f"{inv['total']} {inv['currency']} for {inv['units']:,} units")  # fmt: skip
    else:
        print("  not billed yet (metering bill --month)")
    table(
        "days",
        ["date", "served", "refused", "units", "4xx", "5xx", "p50 ms", "p95 ms", "p99 ms"],
        [
            (d.date, f"{d.served:,}", f"{d.refused:,}", f"{d.units:,}", d.client_errors,
             d.server_errors, *(st.ms_text(v) or "-" for v in (d.p50_ms, d.p95_ms, d.p99_ms)))
            for d in s.days
        ],
    )  # fmt: skip
    if args.png:
        st.write_png(s, args.png)
        print(f"wrote {args.png}")
    if args.csv:
        st.write_csv(s, args.csv)
        print(f"wrote {args.csv}")
    return 0


def cmd_usage(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "rebuild":
        return cmd_rebuild(args, settings)
    from rich.console import Console
    from rich.table import Table

    from metering.usage.counters import UsageCounters
    from metering.usage.report import daily_usage

    async def go(conn: Any, client: Any) -> list[Any]:
        counters = UsageCounters(redis=client, prefix=settings.redis_key_prefix)
        return await daily_usage(conn, counters, days=args.days, user_id=args.user)

    rows = with_db_and_redis(settings, go)
    table = Table(title=f"daily usage, last {args.days} day(s), UTC")
    columns = (
        "date",
        "user",
        "tier",
        "requests",
        "refused",
        "units",
        "4xx",
        "429",
        "5xx",
        "avg ms",
        "quota",
    )
    for col in (*columns, "redis"):
        table.add_column(col, justify="left" if col in ("date", "user", "tier") else "right")
    for r in rows:
        served = r.requests - r.rejected  # what the quota counts
        quota = f"{100 * served / r.daily_quota:.1f}%" if r.daily_quota else "unlimited"
        redis_cell = "-" if r.redis_requests is None else str(r.redis_requests)
        if r.redis_requests is not None and r.redis_requests != r.requests:
            redis_cell += " (!)"
        table.add_row(
            r.day.isoformat(),
            r.email or str(r.user_id),
            r.tier or "?",
            f"{r.requests:,}",
            f"{r.rejected:,}",
            f"{r.units:,}",
            str(r.client_errors),
            str(r.throttled),
            str(r.server_errors),
            f"{r.avg_ms:.1f}" if r.avg_ms is not None else "-",
            quota,
            redis_cell,
        )
    console = Console() if sys.stdout.isatty() else Console(width=160)
    console.print(table if rows else "no usage recorded in that range")
    return 0


COMMANDS = {"simulate": cmd_simulate, "usage": cmd_usage, "report": cmd_report}
