"""What the edge still enforces while Redis is away (``redis_failure_mode=open``).

Failing open used to mean no protection at all: every limit and the
failed-authentication throttle skipped, every keyed request a PostgreSQL
lookup. :class:`LocalGuard` keeps serving but in-process, per edge process:

* identities are cached here for ``identity_ttl_s`` (positive and negative),
  so a key costs one lookup per interval, not one per request; concurrent
  misses of one key share one lookup (the guard's bounded lookups);
* the failed-authentication throttle, the anonymous allowance, the 403
  path's limit and the per-minute limits run as GCRA buckets in memory, each
  limit divided by ``instances`` (the number of edge processes, which share
  nothing while Redis is away): approximate, never open;
* not enforced: the daily quota (its counters live in Redis; usage is still
  recorded and counted by the worker), and anything across processes.

Buckets and identities are bounded (least recently used go first).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from metering.accounts.model import Identity
from metering.addresses import allowed

V = TypeVar("V")

LookUp = Callable[[str], Awaitable[Identity | None]]


class Bounded(Generic[V]):
    """A dict that forgets its least recently used entries beyond ``size``."""

    def __init__(self, size: int) -> None:
        self._data: OrderedDict[str, V] = OrderedDict()
        self._size = size

    def get(self, key: str) -> V | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: str, value: V) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self._size:
            self._data.popitem(last=False)

    def pop(self, key: str) -> None:
        self._data.pop(key, None)


class LocalBuckets:
    """GCRA in memory: ``limit`` per ``period_s``, bursts up to ``limit``."""

    def __init__(self, size: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._tat: Bounded[float] = Bounded(size)
        self._clock = clock

    def hit(self, key: str, limit: int, period_s: float, *, consume: bool = True) -> float:
        """0 when allowed (and used up if ``consume``), else seconds until it would be."""
        now = self._clock()
        interval = period_s / limit
        tat = max(self._tat.get(key) or now, now)
        allow_at = tat + interval - period_s
        if allow_at > now:
            return allow_at - now
        if consume:
            self._tat.put(key, tat + interval)
        return 0.0

    def give_back(self, key: str, limit: int, period_s: float) -> None:
        tat = self._tat.get(key)
        if tat is not None:
            self._tat.put(key, tat - period_s / limit)


Verdict = tuple[int | None, str, Identity | None, float]  # status, reason, identity, retry_s


class LocalGuard:
    def __init__(
        self,
        *,
        look_up: LookUp,
        in_flight: Callable[[str], bool],
        instances: int = 1,
        anonymous_per_day: int = 50,
        auth_failures_per_minute: int = 5,
        identity_ttl_s: float = 10.0,
        size: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._look_up = look_up  # concurrent calls for one key share one lookup
        self._in_flight = in_flight  # is a lookup of this key under way?
        self._share = max(1, instances)
        self._anon = anonymous_per_day
        self._fails = auth_failures_per_minute
        self._ttl = identity_ttl_s
        self._clock = clock
        self._buckets = LocalBuckets(size, clock)
        self._identities: Bounded[tuple[Identity | None, float]] = Bounded(size)
        self._good: Bounded[float] = Bounded(size)  # key hashes that worked lately

    def _limit(self, per_all_instances: int) -> int:
        return max(1, per_all_instances // self._share)

    async def check(self, key_hash: str, client_ip: str, bucket: str) -> Verdict:
        """The verdict for one request; PostgreSQL errors from ``look_up`` propagate."""
        fails, fails_key = self._limit(self._fails), f"fail:{bucket}"
        if key_hash == "":
            retry = self._buckets.hit(f"anon:{bucket}", self._limit(self._anon), 86_400)
            return (
                (None, "anonymous", None, 0.0) if not retry else (429, "anon_limited", None, retry)
            )
        throttled = self._buckets.hit(fails_key, fails, 60, consume=False)
        if key_hash == "!":
            if throttled:
                return 429, "auth_throttled", None, throttled
            self._buckets.hit(fails_key, fails, 60)
            return 401, "unauthorized", None, 0.0
        cached = self._identities.get(key_hash)
        reserved = False
        if cached is not None and cached[1] > self._clock():
            identity = cached[0]
        elif self._in_flight(key_hash):
            identity = await self._look_up(key_hash)  # its lookup is under way: share it
        else:
            if not self._good.get(key_hash):  # a key that worked lately is no guess
                if throttled:  # an unknown key costs a lookup: only within the budget
                    return 429, "auth_throttled", None, throttled
                self._buckets.hit(fails_key, fails, 60)  # reserved before the lookup
                reserved = True
            try:
                identity = await self._look_up(key_hash)
            except BaseException:
                if reserved:  # no verdict on the key: no failure
                    self._buckets.give_back(fails_key, fails, 60)
                raise
            self._identities.put(key_hash, (identity, self._clock() + self._ttl))
        now = time.time()
        if (
            identity is None
            or (identity.expires_at is not None and identity.expires_at <= now)
            or (identity.status == "rotating" and (identity.rotates_at or now + 1) <= now)
        ):
            if not reserved:
                if throttled:
                    return 429, "auth_throttled", None, throttled
                self._buckets.hit(fails_key, fails, 60)
            return 401, "unauthorized", None, 0.0
        if reserved:  # the key works: its lookup was no failure
            self._buckets.give_back(fails_key, fails, 60)
        self._good.put(key_hash, 1.0)
        limit = self._limit(identity.rate_limit_per_minute)
        if identity.ip_allowlist and not allowed(client_ip, identity.ip_allowlist):
            retry = self._buckets.hit(f"forbidden:{identity.key_id}:{bucket}", limit, 60)
            if retry:
                return 429, "forbidden_throttled", identity, retry
            return 403, "forbidden_ip", identity, 0.0
        shadow = identity.limits_mode == "shadow" and not identity.quarantined
        retry = self._buckets.hit(f"rl:{identity.limit_key}", limit, 60)
        if retry:
            return (None if shadow else 429), "rate_limited", identity, retry
        return None, "ok", identity, 0.0
