"""The identity cache the edges share in Redis, written in version order.

Each key hash has an entry (the identity as JSON with its allowlist in hex,
or ``-`` for a hash that does not work) and beside it the version of the
``api_keys`` row it was computed from. ``lua/identity_cache.lua`` refuses a
write that carries an older version than one already written, so:

* a lifecycle change invalidates the entry *before* it commits (the entry is
  deleted and the new version recorded: an edge's fill from a read older
  than the commit is refused, the edge answers 503 and the client retries);
* after the commit the change re-reads the key and sets its entry; a
  concurrent change's refresh computed from an older read cannot win;
* if the process dies between the commit and the refresh, the entry is
  already gone: the next request fills it from the committed state.

A change whose invalidation Redis refused (Redis away) still commits: edges
verify keys against PostgreSQL while Redis is away, and an entry written
before the outage expires within ``ttl_s``. The caller is told (logged).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from metering.accounts import store
from metering.accounts.model import Identity
from metering.addresses import network_hex
from metering.redis.scripts import load_source

log = logging.getLogger(__name__)

NEGATIVE = "-"
_SET = load_source("identity_cache", with_gcra=False)
_RELEASE = load_source("identity_release", with_gcra=False)


# The cached identity's format. It is part of the entry's name (edge_check.lua
# reads "<prefix>:id3:<hash>"): a release that changes the fields changes the
# name, so an edge never parses an entry written in another format.
ENTRY_FORMAT = "id3"  # id2: limit_key; id3: rotate_by and quarantined (#11)


def entry_key(prefix: str, key_hash: str) -> str:
    return f"{prefix}:{ENTRY_FORMAT}:{key_hash}"


def version_key(prefix: str, key_hash: str) -> str:
    return f"{prefix}:keyver:{key_hash}"


def cache_entry(identity: Identity) -> str:
    """The cached form of an identity: its JSON plus the allowlist as hex networks."""
    payload = json.loads(identity.to_json())
    payload["allow_hex"] = (
        [network_hex(c) for c in identity.ip_allowlist] if identity.ip_allowlist else None
    )
    return json.dumps(payload, separators=(",", ":"))


class IdentityCache:
    """Versioned writes of identity entries (edges read them in ``edge_check.lua``)."""

    def __init__(
        self, redis: aioredis.Redis, *, prefix: str, ttl_s: int = 60, negative_ttl_s: int = 300
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self.ttl_s = ttl_s
        self.negative_ttl_s = negative_ttl_s
        # the version must outlive every entry written with it
        self.version_ttl_s = max(ttl_s, negative_ttl_s) + 300
        self._set = redis.register_script(_SET)
        self._release = redis.register_script(_RELEASE)

    async def _write(self, mode: str, key_hash: str, version: int, value: str) -> int:
        """-1 when refused, else the version known before (see identity_cache.lua)."""
        ttl = self.negative_ttl_s if value == NEGATIVE else self.ttl_s
        return int(
            await self._set(
                keys=[entry_key(self._prefix, key_hash), version_key(self._prefix, key_hash)],
                args=[mode, version, value, ttl, self.version_ttl_s],
            )
        )

    async def fill(self, key_hash: str, identity: Identity | None, version: int) -> bool:
        """An edge's cache miss: write the entry unless one exists or a newer
        version was recorded. Returns whether it was written."""
        value = cache_entry(identity) if identity else NEGATIVE
        return await self._write("fill", key_hash, version, value) >= 0

    async def set(self, key_hash: str, identity: Identity | None, version: int) -> bool:
        """Write the entry unless a newer version was recorded. Returns whether it was written."""
        value = cache_entry(identity) if identity else NEGATIVE
        return await self._write("set", key_hash, version, value) >= 0

    async def invalidate(
        self, stamps: Sequence[store.Stamp], done: list[tuple[store.Stamp, int]]
    ) -> None:
        """Before a change commits: delete its keys' entries and record their new
        versions. Each one written is appended to ``done`` with the version it
        replaced, as it happens (a Redis error halfway keeps what was done), so
        :meth:`release` can give them back if the change rolls back."""
        for stamp in stamps:
            previous = await self._write("invalidate", stamp.key_hash, stamp.version, "")
            if previous >= 0:
                done.append((stamp, previous))

    async def release(self, done: Sequence[tuple[store.Stamp, int]]) -> None:
        """A change rolled back after :meth:`invalidate`: put back the versions it
        replaced (unless a later change raised them meanwhile)."""
        for stamp, previous in done:
            await self._release(
                keys=[version_key(self._prefix, stamp.key_hash)],
                args=[stamp.version, previous, self.version_ttl_s],
            )

    async def refresh(self, conn: asyncpg.Connection, key_hashes: Sequence[str]) -> None:
        """After a change committed: re-read each key and write its entry (an
        identity, or ``-`` when it no longer works); older versions lose."""
        for key_hash in key_hashes:
            identity, version = await store.lookup_identity(conn, key_hash)
            await self.set(key_hash, identity, version)


__all__ = ["NEGATIVE", "IdentityCache", "RedisError", "cache_entry", "entry_key", "version_key"]
