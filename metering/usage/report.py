"""Read-side queries for operators: daily usage with the Redis view beside it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from uuid import UUID

import asyncpg

from metering.db.queries import get
from metering.usage.counters import UsageCounters

DAILY_USAGE = get("daily_usage_report")


@dataclass(frozen=True, slots=True)
class UsageRow:
    day: date
    user_id: UUID
    email: str | None
    tier: str | None
    requests: int
    units: int
    client_errors: int
    server_errors: int
    throttled: int
    rejected: int
    avg_ms: float | None
    daily_quota: int | None
    redis_requests: int | None  # None: no counter in Redis (expired or not rebuilt yet)


async def daily_usage(
    conn: asyncpg.Connection,
    counters: UsageCounters | None,
    *,
    days: int,
    user_id: UUID | None = None,
) -> list[UsageRow]:
    since = datetime.now(UTC).date() - timedelta(days=days - 1)
    rows = await conn.fetch(DAILY_USAGE, since, user_id)
    cached_all = (
        await counters.get_many([(r["user_id"], r["date"]) for r in rows])
        if counters
        else [None] * len(rows)
    )
    out = []
    for r, cached in zip(rows, cached_all, strict=True):
        out.append(
            UsageRow(
                r["date"],
                r["user_id"],
                r["email"],
                r["tier"],
                r["request_count"],
                r["units"],
                r["client_error_count"],
                r["server_error_count"],
                r["throttled_count"],
                r["rejected_count"],
                r["avg_ms"],
                r["daily_quota"],
                cached.requests if cached else None,
            )
        )
    return out
