"""A general-purpose GCRA rate limiter on Redis (the edge uses the same
algorithm inside its one-round-trip script).

    limiter = RateLimiter(redis)
    r = await limiter.hit("key:42", limit=100, period_s=60)
    if not r.allowed: ... r.retry_after_s

``limit`` requests per ``period_s``, bursts up to ``limit``; concurrent checks
share one script call (one round trip per event-loop tick). State is one small key per bucket.
"""

from __future__ import annotations

from typing import NamedTuple

import redis.asyncio as aioredis

from metering.redis.scripts import CoalescingScript, load_source


class LimitResult(NamedTuple):
    allowed: bool
    limit: int
    remaining: int
    reset_after_s: float  # until the bucket is full again
    retry_after_s: float  # 0 when allowed


class RateLimiter:
    def __init__(self, redis: aioredis.Redis, *, prefix: str = "metering:rl") -> None:
        self._prefix = prefix
        self._script = CoalescingScript(redis, load_source("rate_limit"))

    @property
    def round_trips(self) -> int:
        return self._script.round_trips

    async def aclose(self) -> None:
        """Close the limiter's Redis connection (the client passed in stays open)."""
        await self._script.aclose()

    async def hit(self, key: str, *, limit: int, period_s: float, cost: int = 1) -> LimitResult:
        """Consume ``cost`` requests' worth from ``key``'s bucket if they fit now
        (all or nothing)."""
        if type(cost) is not int or not 1 <= cost <= limit:
            raise ValueError(f"cost must be an integer between 1 and the limit ({limit})")
        return await self._check(key, limit, period_s, cost)

    async def peek(self, key: str, *, limit: int, period_s: float) -> LimitResult:
        """Would a request be allowed now? (uses nothing up)"""
        return await self._check(key, limit, period_s, 0)

    async def _check(self, key: str, limit: int, period_s: float, cost: int) -> LimitResult:
        if type(limit) is not int or limit < 1:
            raise ValueError("limit must be an integer >= 1")
        if not isinstance(period_s, int | float) or isinstance(period_s, bool) or period_s < 0.001:
            raise ValueError("period must be at least 1 ms")  # Redis time has ms resolution
        allowed, remaining, reset_ms, retry_ms = await self._script(
            [f"{self._prefix}:{key}", limit, round(period_s * 1000), cost]
        )
        return LimitResult(
            bool(allowed), limit, int(remaining), int(reset_ms) / 1000, int(retry_ms) / 1000
        )
