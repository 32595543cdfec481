"""Redis daily usage counters: a rebuildable view of ``daily_usage``.

Key layout (``prefix`` defaults to ``metering``)::

    {prefix}:usage:{user_id}:{YYYY-MM-DD}   hash  requests, units, errors, throttled,
                                            rejected (UTC day; expires 3 days after
                                            it; quota use = requests - rejected)
    {prefix}:usage:synced                   string, set after a rebuild from
                                            PostgreSQL; its absence means Redis
                                            lost its data and must be rebuilt

Values are the committed totals read back from PostgreSQL, written with a
"keep the larger" script, never INCR: replaying a batch, rebuilding while
the stream writes, or two workers overlapping in a rebalance cannot double
count or move a counter backwards.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from importlib import resources
from uuid import UUID

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from metering.db import queries
from metering.errors import ServiceUnavailable

COUNTER_TTL_DAYS = 3
REBUILD_DAYS = 2  # today and yesterday (UTC) are all a quota check reads


@dataclass(frozen=True, slots=True)
class DailyTotal:
    user_id: UUID
    day: date
    requests: int
    units: int
    errors: int
    throttled: int = 0  # answered 429 (by the edge or the app)
    rejected: int = 0  # refused by the edge: never billable, not counted against the quota


class UsageCounters:
    def __init__(self, *, redis: aioredis.Redis, prefix: str = "metering") -> None:
        self._redis = redis
        self._prefix = prefix
        source = resources.files("metering.redis").joinpath("lua/set_daily_totals.lua").read_text()
        self._set_totals = redis.register_script(source)

    def key(self, user_id: UUID | str, day: date) -> str:
        return f"{self._prefix}:usage:{user_id}:{day.isoformat()}"

    @property
    def synced_key(self) -> str:
        return f"{self._prefix}:usage:synced"

    async def publish(self, totals: Sequence[DailyTotal]) -> None:
        """Write committed totals in one round trip (a pipeline of script calls)."""
        if not totals:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for t in totals:
                    expire_at = _day_start(t.day) + timedelta(days=COUNTER_TTL_DAYS)
                    await self._set_totals(
                        keys=[self.key(t.user_id, t.day)],
                        args=[
                            t.requests,
                            t.units,
                            t.errors,
                            t.throttled,
                            t.rejected,
                            int(expire_at.timestamp()),
                        ],
                        client=pipe,
                    )
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise ServiceUnavailable(f"Redis write failed: {exc}") from exc

    async def get(self, user_id: UUID | str, day: date) -> DailyTotal | None:
        return (await self.get_many([(user_id, day)]))[0]

    async def get_many(self, wanted: Sequence[tuple[UUID | str, date]]) -> list[DailyTotal | None]:
        """Several counters in one round trip (None where Redis has none)."""
        if not wanted:
            return []
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for user_id, day in wanted:
                    pipe.hgetall(self.key(user_id, day))
                raws = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise ServiceUnavailable(f"Redis read failed: {exc}") from exc
        return [
            DailyTotal(
                UUID(str(user_id)),
                day,
                int(raw[b"requests"]),
                int(raw[b"units"]),
                int(raw[b"errors"]),
                int(raw.get(b"throttled", 0)),
                int(raw.get(b"rejected", 0)),
            )
            if raw
            else None
            for (user_id, day), raw in zip(wanted, raws, strict=True)
        ]

    async def is_synced(self) -> bool:
        try:
            return bool(await self._redis.exists(self.synced_key))
        except (RedisError, OSError) as exc:
            raise ServiceUnavailable(f"Redis read failed: {exc}") from exc

    async def rebuild(
        self, conn: asyncpg.Connection, *, days: int = REBUILD_DAYS, today: date | None = None
    ) -> int:
        """Re-derive recent counters from PostgreSQL (``days`` UTC days up to
        ``today``, and any later ones); return how many were written."""
        since = (today or datetime.now(UTC).date()) - timedelta(days=days - 1)
        rows = await conn.fetch(queries.get("daily_totals_since"), since)
        totals = [DailyTotal(*r) for r in rows]
        for chunk in _chunks(totals, 1000):
            await self.publish(chunk)
        try:
            await self._redis.set(self.synced_key, datetime.now(UTC).isoformat())
        except (RedisError, OSError) as exc:
            raise ServiceUnavailable(f"Redis write failed: {exc}") from exc
        return len(totals)


def _day_start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _chunks(items: Sequence[DailyTotal], size: int) -> Iterable[Sequence[DailyTotal]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
