"""What every command module shares: argument types, one-shot connections, tables."""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, NoReturn

from metering.settings import Settings

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def number(
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


positive_int = number(int, 1)
non_negative_int = number(int, 0)
positive_float = number(float, 0, above=True)
ratio = number(float, 0, 1)


def decimal(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value.is_finite():
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> timedelta:
    unit = text[-1:].lower()
    try:
        amount = float(text[:-1]) if unit in _UNITS else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30d, 12h, 90m") from None
    if amount < 0:
        raise argparse.ArgumentTypeError(f"{text} must not be negative")
    return timedelta(seconds=amount * _UNITS.get(unit, 1))


def timestamp(text: str) -> datetime:
    try:
        ts = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an RFC 3339 time") from None
    if ts.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} needs a UTC offset, e.g. 2027-01-01T00:00Z")
    return ts


def user_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a user id (UUID)") from None


def month(text: str) -> date:
    from metering.billing.drafts import month_of
    from metering.errors import InputError

    try:
        return month_of(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a day like 2027-01-01") from None


def with_db(settings: Settings, work: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run ``work(conn)`` on one PostgreSQL connection, then close it."""
    from metering.db import connect

    async def go() -> Any:
        conn = await connect(settings.database_url)
        try:
            return await work(conn)
        finally:
            await conn.close()

    return asyncio.run(go())


def with_db_and_redis(settings: Settings, work: Callable[[Any, Any], Awaitable[Any]]) -> Any:
    """Run ``work(conn, redis)`` with a PostgreSQL connection and a Redis client."""
    import redis.asyncio as aioredis

    async def go(conn: Any) -> Any:
        client = aioredis.from_url(settings.redis_url, socket_timeout=5)
        try:
            return await work(conn, client)
        finally:
            await client.aclose()

    return with_db(settings, go)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*("-" if v is None else str(v) for v in row))
    console = Console() if sys.stdout.isatty() else Console(width=200)
    console.print(table)


def when(ts: datetime | None) -> str | None:
    return ts.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if ts else None
