"""``metering`` command line: the one place that wires settings to services.

Errors are one line on stderr: exit 2 for bad arguments, 1 for anything
else (service unreachable, failed migration ...); ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, NoReturn

from metering.errors import InputError, MeteringError
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


def _decimal(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> timedelta:
    unit = text[-1:].lower()
    try:
        amount = float(text[:-1]) if unit in _UNITS else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30d, 12h, 90m") from None
    if amount < 0:
        raise argparse.ArgumentTypeError(f"{text} must not be negative")
    return timedelta(seconds=amount * _UNITS.get(unit, 1))


def _timestamp(text: str) -> datetime:
    try:
        ts = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an RFC 3339 time") from None
    if ts.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} needs a UTC offset, e.g. 2027-01-01T00:00Z")
    return ts


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
    sim.add_argument(
        "--http",
        metavar="URL",
        help="send real HTTP requests to a metered app (examples/edge_app.py) "
        "instead of publishing events directly",
    )

    usage = sub.add_parser("usage", help="daily usage from PostgreSQL, with the Redis counters")
    usage.add_argument("--user", type=_uuid, help="only this user id")
    usage.add_argument("--days", type=_positive_int, default=7, help="days back, UTC (default 7)")

    tiers = sub.add_parser("tiers", help="access tiers")
    tsub = tiers.add_subparsers(dest="action", required=True, parser_class=_Parser)
    tsub.add_parser("list", help="list tiers")
    tc = tsub.add_parser("create", help="create a tier")
    tc.add_argument("name")
    tc.add_argument("--rate-limit", type=_positive_int, required=True, help="requests per minute")
    tc.add_argument(
        "--daily-quota", type=_positive_int, help="requests per UTC day (omit: unlimited)"
    )
    tc.add_argument("--price", type=_decimal, default=Decimal(0), help="monthly base price")
    tc.add_argument("--shadow", action="store_true", help="compute limits but do not enforce them")
    tm = tsub.add_parser("set-mode", help="enforce or shadow the tier's limits")
    tm.add_argument("name")
    tm.add_argument("mode", choices=["enforce", "shadow"])

    users = sub.add_parser("users", help="users (key owners)")
    usub = users.add_subparsers(dest="action", required=True, parser_class=_Parser)
    uc = usub.add_parser("create", help="create a user")
    uc.add_argument("email")
    uc.add_argument("--tier", default="free")
    uc.add_argument("--name")
    usub.add_parser("list", help="list users")
    ut = usub.add_parser("set-tier", help="move a user to another tier")
    ut.add_argument("user", help="user id or email")
    ut.add_argument("tier")
    for verb, text in (
        ("suspend", "suspend a user: all their keys stop working"),
        ("activate", "re-activate a suspended user"),
    ):
        usub.add_parser(verb, help=text).add_argument("user", help="user id or email")

    keys_p = sub.add_parser("keys", help="API keys")
    ksub = keys_p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    kc = ksub.add_parser("create", help="create a key (printed once)")
    kc.add_argument("user", help="user id or email")
    kc.add_argument("--name")
    kc.add_argument("--scope", action="append", default=[], help="repeatable, e.g. items:read")
    expiry = kc.add_mutually_exclusive_group()
    expiry.add_argument("--expires-in", type=_duration, help="TTL, e.g. 30d, 12h, 90m")
    expiry.add_argument("--expires-at", type=_timestamp, help="RFC 3339 time")
    kc.add_argument(
        "--allow-ip", action="append", help="CIDR the key may be used from (repeatable)"
    )
    kc.add_argument("--env", choices=["live", "test"], default="live")
    kc.add_argument("--shadow", action="store_true", help="shadow mode for this key's limits")
    kl = ksub.add_parser("list", help="list keys (never the key itself)")
    kl.add_argument("--user", help="user id or email")
    kl.add_argument("--all", action="store_true", help="include deleted keys")
    kr = ksub.add_parser(
        "rotate", help="new key, same metadata; the old one works for a grace period"
    )
    kr.add_argument("key", help="key prefix (mk_live_xxxxxxxx) or id")
    kr.add_argument("--grace", type=_duration, help="default 24h (METERING_ROTATION_GRACE_HOURS)")
    kv = ksub.add_parser("revoke", help="revoke a key now")
    kv.add_argument("key", help="key prefix or id")
    kv.add_argument("--reason", required=True)
    kd = ksub.add_parser("delete", help="soft-delete a key")
    kd.add_argument("key", help="key prefix or id")

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
        return EXIT_USAGE if isinstance(exc, InputError) else 1
    except KeyboardInterrupt:
        return 130


# -- commands ----------------------------------------------------------------


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
    from metering.db.migrate import maintain_partitions, migrate

    async def go(conn: Any) -> None:
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

    _with_db(settings, go)
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


def cmd_usage(args: argparse.Namespace, settings: Settings) -> int:
    from rich.console import Console
    from rich.table import Table

    from metering.usage.counters import UsageCounters
    from metering.usage.report import daily_usage

    async def go(conn: Any, client: Any) -> list[Any]:
        counters = UsageCounters(redis=client, prefix=settings.redis_key_prefix)
        return await daily_usage(conn, counters, days=args.days, user_id=args.user)

    rows = _with_db_and_redis(settings, go)
    table = Table(title=f"daily usage, last {args.days} day(s), UTC")
    columns = ("date", "user", "tier", "requests", "units", "4xx", "429", "5xx", "avg ms", "quota")
    for col in (*columns, "redis"):
        table.add_column(col, justify="left" if col in ("date", "user", "tier") else "right")
    for r in rows:
        served = r.requests - r.throttled
        quota = f"{100 * served / r.daily_quota:.1f}%" if r.daily_quota else "unlimited"
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
            str(r.throttled),
            str(r.server_errors),
            f"{r.avg_ms:.1f}" if r.avg_ms is not None else "-",
            quota,
            redis_cell,
        )
    console = Console() if sys.stdout.isatty() else Console(width=160)
    console.print(table if rows else "no usage recorded in that range")
    return 0


def cmd_counters(args: argparse.Namespace, settings: Settings) -> int:
    from metering.usage.counters import UsageCounters

    async def go(conn: Any, client: Any) -> int:
        return await UsageCounters(redis=client, prefix=settings.redis_key_prefix).rebuild(conn)

    print(f"rebuilt {_with_db_and_redis(settings, go)} counters from daily_usage")
    return 0


def _with_db(settings: Settings, work: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run ``work(conn)`` on one PostgreSQL connection, then close it."""
    from metering.db import connect

    async def go() -> Any:
        conn = await connect(settings.database_url)
        try:
            return await work(conn)
        finally:
            await conn.close()

    return asyncio.run(go())


def _with_db_and_redis(settings: Settings, work: Callable[[Any, Any], Awaitable[Any]]) -> Any:
    """Run ``work(conn, redis)`` with a PostgreSQL connection and a Redis client."""
    import redis.asyncio as aioredis

    async def go(conn: Any) -> Any:
        client = aioredis.from_url(settings.redis_url, socket_timeout=5)
        try:
            return await work(conn, client)
        finally:
            await client.aclose()

    return _with_db(settings, go)


def _refresh(settings: Settings, hashes: list[str]) -> None:
    """Push a key change to every edge now (they would otherwise wait for the cache TTL)."""
    from redis.exceptions import RedisError

    from metering.edge.guard import refresh

    async def go(conn: Any, client: Any) -> None:
        await refresh(
            client,
            conn,
            hashes,
            prefix=settings.redis_key_prefix,
            ttl_s=settings.key_cache_ttl_s,
            negative_ttl_s=max(300, settings.key_cache_ttl_s * 2),
        )

    try:
        _with_db_and_redis(settings, go)
    except (RedisError, OSError) as exc:
        print(
            f"metering: warning: Redis unreachable ({exc}); edges will notice within "
            f"{settings.key_cache_ttl_s}s (the key cache TTL)",
            file=sys.stderr,
        )


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*("-" if v is None else str(v) for v in row))
    console = Console() if sys.stdout.isatty() else Console(width=200)
    console.print(table)


def _when(ts: datetime | None) -> str | None:
    return ts.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if ts else None


def cmd_tiers(args: argparse.Namespace, settings: Settings) -> int:
    from metering.accounts import store as accounts

    if args.action == "list":
        tiers = _with_db(settings, accounts.list_tiers)
        _table(
            "tiers",
            ["name", "per minute", "daily quota", "price/month", "limits"],
            [
                (
                    t.name,
                    t.rate_limit_per_minute,
                    t.daily_quota or "unlimited",
                    t.price_monthly,
                    t.limits_mode,
                )
                for t in tiers
            ],
        )
    elif args.action == "create":
        tier = _with_db(
            settings,
            lambda c: accounts.create_tier(
                c,
                name=args.name,
                daily_quota=args.daily_quota,
                rate_limit_per_minute=args.rate_limit,
                price_monthly=args.price,
                limits_mode="shadow" if args.shadow else "enforce",
            ),
        )
        print(f"created tier {tier.name}")
    else:
        _with_db(settings, lambda c: accounts.set_tier_limits_mode(c, args.name, args.mode))
        print(f"tier {args.name}: limits {args.mode}")
    return 0


def cmd_users(args: argparse.Namespace, settings: Settings) -> int:
    from metering.accounts import store as accounts

    if args.action == "list":
        users = _with_db(settings, accounts.list_users)
        _table(
            "users",
            ["id", "email", "name", "tier", "status", "created"],
            [(u.id, u.email, u.name, u.tier, u.status, _when(u.created_at)) for u in users],
        )
        return 0
    if args.action == "create":
        user = _with_db(
            settings,
            lambda c: accounts.create_user(c, email=args.email, tier=args.tier, name=args.name),
        )
        print(f"created user {user.id} {user.email} ({user.tier})")
        return 0
    if args.action == "set-tier":
        user = _with_db(settings, lambda c: accounts.set_user_tier(c, args.user, args.tier))
        hashes = _with_db(settings, lambda c: accounts.user_key_hashes(c, user.id))
        _refresh(settings, hashes)  # cached identities carry the old limits
        print(f"user {user.email} is now on tier {user.tier}")
        return 0
    status = "suspended" if args.action == "suspend" else "active"
    user = _with_db(settings, lambda c: accounts.set_user_status(c, args.user, status))
    hashes = _with_db(settings, lambda c: accounts.user_key_hashes(c, user.id))
    _refresh(settings, hashes)
    print(f"user {user.email} is {user.status}")
    return 0


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    from metering.accounts import store as accounts

    pepper = settings.pepper
    if args.action == "create":
        expires = args.expires_at or (
            datetime.now(UTC) + args.expires_in if args.expires_in else None
        )
        new, info = _with_db(
            settings,
            lambda c: accounts.create_key(
                c,
                user=args.user,
                pepper=pepper,
                name=args.name,
                scopes=args.scope,
                expires_at=expires,
                ip_allowlist=args.allow_ip,
                environment=args.env,
                limits_mode="shadow" if args.shadow else None,
            ),
        )
        print(f"created key {info.prefix} (id {info.id}) for user {info.user_id}")
        print(
            f"scopes: {', '.join(info.scopes) or '(none)'}; expires: {_when(info.expires_at) or 'never'}"
            f"; allowed from: {', '.join(info.ip_allowlist) if info.ip_allowlist else 'anywhere'}"
        )
        print("This is the only time the key is shown. Store it now:")
        print(new.plaintext)
        return 0
    if args.action == "list":
        rows = _with_db(
            settings, lambda c: accounts.list_keys(c, args.user, include_deleted=args.all)
        )
        _table(
            "API keys",
            [
                "prefix",
                "name",
                "status",
                "scopes",
                "created",
                "last used",
                "expires",
                "rotates at",
                "allowed from",
                "limits",
            ],
            [
                (
                    k.prefix,
                    k.name,
                    k.status,
                    ",".join(k.scopes) or None,
                    _when(k.created_at),
                    _when(k.last_used_at),
                    _when(k.expires_at),
                    _when(k.rotates_at),
                    ",".join(k.ip_allowlist) if k.ip_allowlist else None,
                    k.limits_mode or "tier",
                )
                for k in rows
            ],
        )
        return 0
    if args.action == "rotate":
        grace = (
            args.grace if args.grace is not None else timedelta(hours=settings.rotation_grace_hours)
        )
        new, info, old = _with_db(
            settings, lambda c: accounts.rotate_key(c, args.key, grace=grace, pepper=pepper)
        )
        _refresh(settings, [old.key_hash])  # cached identity still says "active"
        print(
            f"rotated {old.prefix} -> {info.prefix}; the old key works until {_when(old.rotates_at)}"
        )
        print("This is the only time the new key is shown. Store it now:")
        print(new.plaintext)
        return 0
    if args.action == "revoke":
        key = _with_db(settings, lambda c: accounts.revoke_key(c, args.key, reason=args.reason))
    else:
        key = _with_db(settings, lambda c: accounts.delete_key(c, args.key))
    _refresh(settings, [key.key_hash])
    print(f"key {key.prefix} is {key.status}")
    return 0


_COMMANDS = {
    "tiers": cmd_tiers,
    "users": cmd_users,
    "keys": cmd_keys,
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
