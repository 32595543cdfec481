"""Read-side queries for operators: daily usage with the Redis view beside it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from uuid import UUID

import asyncpg

from metering.usage.counters import UsageCounters

DAILY_USAGE = """
SELECT d.date, d.user_id, u.email, t.name AS tier, d.request_count, d.units,
       d.client_error_count, d.server_error_count, d.throttled_count,
       d.total_response_time_ms / NULLIF(d.request_count, 0) AS avg_ms,
       t.daily_quota
FROM daily_usage d
LEFT JOIN users u ON u.id = d.user_id
LEFT JOIN access_tiers t ON t.id = u.tier_id
WHERE d.date >= $1 AND ($2::uuid IS NULL OR d.user_id = $2)
ORDER BY d.date DESC, d.request_count DESC
"""


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
                r["avg_ms"],
                r["daily_quota"],
                cached.requests if cached else None,
            )
        )
    return out
