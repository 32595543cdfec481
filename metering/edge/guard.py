"""The request-path decision: who is calling, and may they, in one Redis round trip.

:class:`EdgeGuard.check` runs ``lua/edge_check.lua`` (failed-auth throttle,
cached identity, expiry and rotation, IP allowlist, per-key GCRA rate limit,
daily quota) and turns its answer into a :class:`Decision`. Checks from
concurrent requests are coalesced: every call made in the same event-loop
tick goes to Redis in one pipeline.

Steady state (identity cached) costs one round trip. A cache miss costs one
indexed PostgreSQL lookup, a versioned fill of the shared identity cache (the
identity, or a negative entry for unknown keys; see
:mod:`metering.accounts.cache`) and the script again. Lifecycle changes
(:class:`metering.accounts.AccountsService`) rewrite the entry, so every edge
sees them on its next request (no per-process cache).

When Redis is unreachable the configured policy applies: ``open`` verifies
the key against PostgreSQL, skips limits and quotas, logs and counts;
``closed`` answers 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from metering import keys
from metering.accounts import store
from metering.accounts.cache import IdentityCache, entry_key
from metering.accounts.model import Identity
from metering.addresses import bucket_hex, ip_hex
from metering.edge.fallback import LocalGuard
from metering.edge.lookups import KeyLookups, LookupsBusy
from metering.redis.scripts import CoalescingScript, load_source

log = logging.getLogger(__name__)

DOWN_LOG_EVERY_S = 10


class UnreadableEntry(Exception):
    """A cached identity this release cannot read (written by another one)."""


@dataclass(frozen=True, slots=True)
class Decision:
    """What the edge should do with a request."""

    status: int | None  # None: let it through; else the HTTP status to answer with
    reason: str  # ok | anonymous | unauthorized | forbidden_ip | rate_limited | ...
    identity: Identity | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    shadowed: bool = False  # a limit would have rejected it, shadow mode let it through
    degraded: bool = False  # Redis was down and the fail-open policy applied


@dataclass(slots=True)
class EdgeStats:
    checks: int = 0
    cache_misses: int = 0
    db_failures: int = 0  # lookups PostgreSQL could not answer (503)
    redis_failures: int = 0
    rejected: Counter[str] = field(default_factory=Counter)  # by reason
    shadowed: Counter[str] = field(default_factory=Counter)  # let through by shadow mode, by reason
    # seconds the middleware added to a request (MeteringEdge observes them in a histogram)
    observe_overhead: Callable[[float], None] = field(default=lambda seconds: None)


class EdgeGuard:
    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        pool: asyncpg.Pool,
        pepper: bytes | None = None,
        prefix: str = "metering",
        key_cache_ttl_s: int = 60,
        negative_cache_ttl_s: int = 30,
        anonymous_per_day: int = 50,
        auth_failures_per_minute: int = 5,
        redis_failure_mode: str = "open",
        last_used_flush_s: float = 30.0,
        ipv6_bucket_prefix: int = 64,
        max_concurrent_lookups: int = 4,
        edge_instances: int = 1,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._redis = redis
        # what "today" is for the daily quota (UTC); tests fix it at a month's end
        self._clock = clock or (lambda: datetime.now(UTC))
        self._pool = pool
        self._pepper = pepper
        self._prefix = prefix
        self._cache = IdentityCache(
            redis, prefix=prefix, ttl_s=key_cache_ttl_s, negative_ttl_s=negative_cache_ttl_s
        )
        self._anon = anonymous_per_day
        self._fails = auth_failures_per_minute
        self._mode = redis_failure_mode
        self._flush_every = last_used_flush_s
        self._v6_prefix = ipv6_bucket_prefix
        self._lookups = KeyLookups(pool, self._cache, concurrent=max_concurrent_lookups)
        self._background: set[asyncio.Future[Any]] = set()
        self._local = LocalGuard(  # what still holds while Redis is away (fail-open)
            look_up=self._lookups.look_up,
            in_flight=self._lookups.looking_up,
            instances=edge_instances,
            anonymous_per_day=anonymous_per_day,
            auth_failures_per_minute=auth_failures_per_minute,
        )
        self._script = CoalescingScript(redis, load_source("edge_check"))
        self._parsed: dict[bytes, Identity] = {}
        self._last_used: dict[str, float] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._down_logged_at = -float(DOWN_LOG_EVERY_S)
        self._db_down_logged_at = -float(DOWN_LOG_EVERY_S)
        self.stats = EdgeStats()

    @property
    def lookups(self) -> int:
        """PostgreSQL lookups made for cache misses (concurrent misses share one)."""
        return self._lookups.count

    @property
    def round_trips(self) -> int:
        """Redis round trips made by checks so far (one per coalesced batch)."""
        return self._script.round_trips

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._script.load()
        except (RedisError, OSError) as exc:
            log.warning("Redis unavailable at start (%s); policy %s applies", exc, self._mode)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_last_used_forever())

    async def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            try:
                await self._flusher
            except asyncio.CancelledError:
                pass
            self._flusher = None
        await self.flush_last_used()
        await self._script.aclose()

    # -- the check -----------------------------------------------------------

    async def check(self, api_key: str | None, client_ip: str) -> Decision:
        self.stats.checks += 1
        if api_key is None:
            key_hash = ""
        else:
            try:
                keys.parse(api_key)
                key_hash = keys.hash_key(api_key, self._pepper)
            except keys.MalformedKey:
                key_hash = "!"  # counted as a failed attempt; no lookup
        try:
            addr = ip_hex(client_ip)
        except ValueError:
            addr = "00000000"
        bucket = bucket_hex(addr, self._v6_prefix)
        today = self._clock().astimezone(UTC)  # read once: the day and Retry-After agree
        day = today.date().isoformat()
        args = [self._prefix, key_hash, addr, bucket, day, str(self._anon), str(self._fails), "0"]
        try:
            result = await self._eval(args)
            if result[0] == b"miss":
                self.stats.cache_misses += 1
                reserved, rechecked = result[1] == b"r", False
                try:
                    try:
                        await self._lookups.fill(key_hash)
                    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as db_exc:
                        # Redis works but the key cannot be looked up: say "try again".
                        self._db_down("PostgreSQL unavailable for a key lookup", db_exc)
                        return Decision(503, "unavailable", headers=[("Retry-After", "5")])
                    except LookupsBusy:
                        return Decision(503, "unavailable", headers=[("Retry-After", "1")])
                    args[-1] = "r" if reserved else "f"  # the re-check after the fill
                    result = await self._eval(args)
                    rechecked = True
                finally:
                    if reserved and not rechecked:  # no verdict on the key: no failure
                        self._give_back([*args[:-1], "x"])
        except (RedisError, OSError) as exc:
            return await self._redis_down(exc, key_hash, client_ip, bucket)
        try:
            decision = self._decide(result, today)
        except UnreadableEntry as exc:
            # never a 500: drop the entry (the next request refills it) and retry
            log.warning("unreadable cached identity dropped (%s)", exc)
            with contextlib.suppress(RedisError, OSError):
                await self._redis.delete(entry_key(self._prefix, key_hash))
            return Decision(503, "unavailable", headers=[("Retry-After", "1")])
        if decision.status is not None:
            self.stats.rejected[decision.reason] += 1
        if decision.shadowed:
            self.stats.shadowed[decision.reason] += 1
        if decision.identity is not None and (
            decision.status is None or decision.reason in ("rate_limited", "quota_exceeded")
        ):
            self._last_used[decision.identity.key_id] = time.time()
        return decision

    def _decide(self, r: Sequence[Any], today: datetime) -> Decision:
        code = r[0].decode() if isinstance(r[0], bytes) else str(r[0])
        identity = self._identity(r[1]) if r[1] else None
        limit, remaining, reset_ms, retry_ms = int(r[2]), int(r[3]), int(r[4]), int(r[5])
        used, quota = int(r[6]), int(r[7])
        now = time.time()
        headers: list[tuple[str, str]] = []
        if limit:
            headers += [
                ("X-RateLimit-Limit", str(limit)),
                ("X-RateLimit-Remaining", str(max(remaining, 0))),
                ("X-RateLimit-Reset", str(int(now + reset_ms / 1000 + 0.999))),
            ]
        if quota >= 0:
            headers += [
                ("X-Quota-Limit", str(quota)),
                ("X-Quota-Remaining", str(max(quota - used, 0))),
            ]
            if used >= 0.8 * quota:
                headers.append(
                    ("X-Quota-Warning", f"{min(100, 100 * used // quota)}% of daily quota used")
                )
        shadow = identity is not None and identity.limits_mode == "shadow"
        # a quarantine's per-minute limit holds whatever the mode; the quota keeps the mode
        shadow_rate = shadow and identity is not None and not identity.quarantined

        if code in ("ok", "anon_ok"):
            return Decision(None, "ok" if code == "ok" else "anonymous", identity, headers)
        if code == "unauthorized":
            return Decision(401, "unauthorized")
        if code == "miss":  # the entry vanished between fill and check (eviction)
            return Decision(503, "unavailable", headers=[("Retry-After", "1")])
        if code == "forbidden_ip":
            return Decision(403, "forbidden_ip", identity)
        if code == "forbidden_throttled":  # never shadowed: the address is not allowed at all
            retry_s = max(1, int(retry_ms / 1000 + 0.999))
            return Decision(429, code, identity, [("Retry-After", str(retry_s))])
        if code in ("rate_limited", "quota_exceeded"):
            if code == "quota_exceeded":
                midnight = today.replace(hour=0, minute=0, second=0, microsecond=0)
                retry_s = int((midnight + timedelta(days=1) - today).total_seconds()) + 1
            else:
                retry_s = max(1, int(retry_ms / 1000 + 0.999))
            if shadow_rate if code == "rate_limited" else shadow:
                return Decision(
                    None, code, identity, [*headers, ("X-RateLimit-Shadow", code)], shadowed=True
                )
            return Decision(429, code, identity, [*headers, ("Retry-After", str(retry_s))])
        if code in ("anon_limited", "auth_throttled"):
            retry_s = max(1, int(retry_ms / 1000 + 0.999))
            return Decision(429, code, None, [*headers, ("Retry-After", str(retry_s))])
        raise RuntimeError(f"unexpected edge script answer {code!r}")

    def _identity(self, raw: bytes) -> Identity:
        """Parse a cached identity; parsed forms are memoised by their exact bytes.
        :class:`UnreadableEntry` if it does not have this release's fields."""
        found = self._parsed.get(raw)
        if found is None:
            try:
                data = json.loads(raw)
                data.pop("allow_hex", None)
                found = Identity(**data)
            except (ValueError, TypeError) as exc:
                raise UnreadableEntry(str(exc)) from exc
            if len(self._parsed) >= 10_000:
                self._parsed.clear()
            self._parsed[raw] = found
        return found

    async def _redis_down(
        self, exc: BaseException, key_hash: str, client_ip: str, bucket: str
    ) -> Decision:
        self.stats.redis_failures += 1
        now = time.monotonic()
        if now - self._down_logged_at >= DOWN_LOG_EVERY_S:  # a line per interval, not per request
            self._down_logged_at = now
            log.warning(
                "Redis unavailable (%s): %s (%d checks so far; next report in %ds at the earliest)",
                exc,
                "failing closed with 503"
                if self._mode == "closed"
                else "failing open (keys verified in PostgreSQL, limits kept in this process)",
                self.stats.redis_failures,
                DOWN_LOG_EVERY_S,
            )
        if self._mode == "closed":
            return Decision(503, "redis_unavailable", headers=[("Retry-After", "5")])
        try:
            status, reason, identity, retry = await self._local.check(key_hash, client_ip, bucket)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as db_exc:
            self._db_down("PostgreSQL unavailable too (Redis is down)", db_exc)
            return Decision(503, "unavailable", headers=[("Retry-After", "5")])
        except LookupsBusy:
            return Decision(503, "unavailable", headers=[("Retry-After", "1")])
        headers = [("Retry-After", str(max(1, int(retry + 0.999))))] if retry else []
        if status is None and retry:  # shadow mode: over the limit, let through
            return Decision(
                None,
                reason,
                identity,
                [("X-RateLimit-Shadow", reason)],
                shadowed=True,
                degraded=True,
            )
        return Decision(status, reason, identity, headers, degraded=True)

    def _give_back(self, args: list[str]) -> None:
        """Return a reserved failure slot, in the background (the caller may be
        cancelled); a Redis error here only leaves the slot to refill by itself."""
        task = asyncio.ensure_future(self._eval(args))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _db_down(self, what: str, exc: BaseException) -> None:
        """A line per interval with a count, not one per request."""
        self.stats.db_failures += 1
        now = time.monotonic()
        if now - self._db_down_logged_at >= DOWN_LOG_EVERY_S:
            self._db_down_logged_at = now
            log.error(
                "%s (%s): uncached keys get 503 (%d so far; next report in %ds at the earliest)",
                what,
                exc,
                self.stats.db_failures,
                DOWN_LOG_EVERY_S,
            )

    async def _eval(self, args: Sequence[str]) -> list[Any]:
        result: list[Any] = await self._script(args)
        return result

    # -- last_used_at: one UPDATE every few seconds, not a write per request --

    async def flush_last_used(self) -> None:
        seen, self._last_used = self._last_used, {}
        if not seen:
            return
        try:
            async with self._pool.acquire() as conn:
                await store.touch_last_used(conn, seen)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("last_used_at not updated (%s); will retry", exc)
            for k, v in seen.items():
                self._last_used[k] = max(v, self._last_used.get(k, 0.0))

    async def _flush_last_used_forever(self) -> None:
        while True:
            await asyncio.sleep(self._flush_every)
            await self.flush_last_used()
