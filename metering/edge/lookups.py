"""Key lookups for cache misses: bounded, and shared by concurrent misses.

The edge's PostgreSQL pool is small and legitimate cache fills wait behind
whatever else looks keys up, so: at most ``concurrent`` lookups run at once,
at most ``concurrent * 16`` distinct keys wait (beyond that
:class:`LookupsBusy`: the edge answers 503 rather than queueing without
bound), and concurrent misses of one key hash share one lookup. A caller
that goes away (cancelled) does not cancel a lookup others wait on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from metering.accounts import store
from metering.accounts.cache import IdentityCache
from metering.accounts.model import Identity

T = TypeVar("T")


class LookupsBusy(Exception):
    """Too many cache-miss lookups are waiting: answer 503 instead of queueing."""


class KeyLookups:
    def __init__(self, pool: Any, cache: IdentityCache, *, concurrent: int = 4) -> None:
        self._pool = pool
        self._cache = cache
        self._slots = asyncio.Semaphore(concurrent)
        self._max_waiting = concurrent * 16
        self._running: dict[tuple[str, str], asyncio.Future[Any]] = {}
        self.count = 0  # lookups made (concurrent misses of one key count once)

    async def fill(self, key_hash: str) -> None:
        """Look the key up and write the shared cache's entry (a versioned fill:
        refused when an entry exists or a lifecycle change recorded a newer
        version meanwhile; the re-check then sees "miss" and answers 503)."""
        await self._shared(("fill", key_hash), lambda: self._fill(key_hash))

    async def look_up(self, key_hash: str) -> Identity | None:
        """Just the identity (Redis is away)."""
        return await self._shared(("plain", key_hash), lambda: self._look_up(key_hash))

    def looking_up(self, key_hash: str) -> bool:
        """Is a plain lookup of this key under way (a call now would join it)?"""
        return ("plain", key_hash) in self._running

    async def _shared(self, key: tuple[str, str], start: Callable[[], Awaitable[T]]) -> T:
        running = self._running.get(key)
        if running is None:
            if len(self._running) >= self._max_waiting:
                raise LookupsBusy
            running = asyncio.ensure_future(start())
            self._running[key] = running
            running.add_done_callback(lambda _: self._running.pop(key, None))
        result: T = await asyncio.shield(running)
        return result

    async def _look_up_versioned(self, key_hash: str) -> tuple[Identity | None, int]:
        async with self._slots, self._pool.acquire() as conn:
            self.count += 1
            return await store.lookup_identity(conn, key_hash)

    async def _fill(self, key_hash: str) -> None:
        identity, version = await self._look_up_versioned(key_hash)
        await self._cache.fill(key_hash, identity, version)

    async def _look_up(self, key_hash: str) -> Identity | None:
        identity, _ = await self._look_up_versioned(key_hash)
        return identity
