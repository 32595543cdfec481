"""The accounts service: every lifecycle change of tiers, users and keys.

The CLI calls it, and so will the stream agents (forced rotation, revocation
by the anomaly rules). Each change is one PostgreSQL transaction with its
audit row; the keys whose verdict at the edge it changes are invalidated in
the shared cache before the commit and refreshed after it, in version order
(:mod:`metering.accounts.cache`). Nothing else writes the cache's entries
but the edges' own fills.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

import asyncpg
from redis.exceptions import RedisError

from metering import keys
from metering.accounts import store
from metering.accounts.cache import IdentityCache
from metering.accounts.model import (
    LIMIT_MODES,
    KeyInfo,
    Tier,
    User,
    validate_cidrs,
    validate_scopes,
)
from metering.db.connect import connection
from metering.errors import InputError
from metering.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
Change = Callable[[asyncpg.Connection], Awaitable[tuple[T, list[store.Stamp]]]]


class AccountsService:
    """Lifecycle changes over one connection (or a pool) and the edge cache.

    ``cache`` may be None where no edge shares this database (tests of the
    SQL alone); a Redis outage during a change is logged and the change
    still commits (see :mod:`metering.accounts.cache`).
    """

    def __init__(
        self,
        db: asyncpg.Connection | asyncpg.Pool,
        *,
        cache: IdentityCache | None,
        pepper: bytes | None,
        rotation_grace: timedelta = timedelta(hours=24),
    ) -> None:
        self._db = db
        self._cache = cache
        self._pepper = pepper
        self._grace = rotation_grace
        self.cache_failures = 0

    def _conn(self) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection]:
        return connection(self._db)

    async def _read(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        async with self._conn() as conn:
            return await work(conn)

    async def change(self, work: Change[T]) -> T:
        """``work`` in one transaction; its stamps invalidated before the commit
        and refreshed after it."""
        async with self._conn() as conn:
            invalidated: list[tuple[store.Stamp, int]] = []
            cache_ok = True
            try:
                async with conn.transaction():
                    result, stamps = await work(conn)
                    cache_ok = await self._invalidate(stamps, invalidated)
            except asyncpg.PostgresError:
                # The server refused the change (at COMMIT, after the
                # invalidation): it did not happen, so give the versions back.
                # A lost connection is different: the commit may have landed,
                # and the versions stay (fills are refused until they expire).
                await self._release(invalidated)
                raise
            if cache_ok:
                await self._refresh(conn, stamps)
        return result

    async def _invalidate(
        self, stamps: list[store.Stamp], done: list[tuple[store.Stamp, int]]
    ) -> bool:
        if self._cache is None or not stamps:
            return True
        try:
            await self._cache.invalidate(stamps, done)
            return True
        except (RedisError, OSError) as exc:
            self._cache_trouble("before the commit", exc)
            return False

    async def _release(self, done: list[tuple[store.Stamp, int]]) -> None:
        if self._cache is not None and done:
            try:
                await self._cache.release(done)
            except (RedisError, OSError) as exc:
                self._cache_trouble("giving versions back after a rollback", exc)

    async def _refresh(self, conn: asyncpg.Connection, stamps: list[store.Stamp]) -> None:
        """After the commit, nothing may fail the change: it happened (a rotation's
        new key must still be shown). The entries are already gone, so a refresh
        that fails leaves the edges to look the keys up again."""
        if self._cache is None or not stamps:
            return
        try:
            await self._cache.refresh(conn, [s.key_hash for s in stamps])
        except Exception as exc:
            self._cache_trouble("after the commit", exc)

    def _cache_trouble(self, when: str, exc: BaseException) -> None:
        self.cache_failures += 1
        assert self._cache is not None
        log.warning(
            "edge cache not updated %s (%s); edges verify keys in PostgreSQL while Redis "
            "is away, and entries cached before expire within %ss",
            when,
            exc,
            self._cache.ttl_s,
        )

    # -- tiers -----------------------------------------------------------------

    async def list_tiers(self) -> list[Tier]:
        return await self._read(store.list_tiers)

    async def create_tier(
        self,
        *,
        name: str,
        daily_quota: int | None,
        rate_limit_per_minute: int,
        price_monthly: Decimal = Decimal(0),
        limits_mode: str = "enforce",
        rate_limit_scope: str = "user",
    ) -> Tier:
        return await self._read(
            lambda c: store.create_tier(
                c,
                name=name,
                daily_quota=daily_quota,
                rate_limit_per_minute=rate_limit_per_minute,
                price_monthly=price_monthly,
                limits_mode=limits_mode,
                rate_limit_scope=rate_limit_scope,
            )
        )

    async def set_tier_limits_mode(self, name: str, mode: str) -> None:
        """Edges see it as their cached identities expire (``key_cache_ttl_s``)."""
        await self._read(lambda c: store.set_tier_limits_mode(c, name, mode))

    async def set_tier_detection(self, name: str, overrides: dict[str, Any] | None) -> None:
        """Detection thresholds for the tier's keys; workers pick them up within seconds."""
        await self._read(lambda c: store.set_tier_detection(c, name, overrides))

    # -- users -----------------------------------------------------------------

    async def create_user(self, *, email: str, tier: str, name: str | None = None) -> User:
        return await self._read(lambda c: store.create_user(c, email=email, tier=tier, name=name))

    async def get_user(self, ref: uuid.UUID | str) -> User:
        return await self._read(lambda c: store.get_user(c, ref))

    async def list_users(self) -> list[User]:
        return await self._read(store.list_users)

    async def set_tier(self, user: uuid.UUID | str, tier: str) -> User:
        """Move a user to another tier; their keys' cached limits follow at once."""

        async def work(conn: asyncpg.Connection) -> tuple[User, list[store.Stamp]]:
            found = await store.lock_user(conn, user)
            stamps = await store.set_user_tier(conn, found.id, tier)
            return await store.get_user(conn, found.id), stamps

        return await self.change(work)

    async def suspend(self, user: uuid.UUID | str) -> User:
        """Every key of the user stops working on every edge's next request."""
        return await self._set_status(user, "suspended")

    async def activate(self, user: uuid.UUID | str) -> User:
        return await self._set_status(user, "active")

    async def _set_status(self, user: uuid.UUID | str, status: str) -> User:
        async def work(conn: asyncpg.Connection) -> tuple[User, list[store.Stamp]]:
            found = await store.lock_user(conn, user)
            stamps = await store.set_user_status(conn, found.id, status)
            return await store.get_user(conn, found.id), stamps

        return await self.change(work)

    # -- keys ------------------------------------------------------------------

    async def get_key(self, ref: str) -> KeyInfo:
        return await self._read(lambda c: store.get_key(c, ref))

    async def key_history(self, ref: str) -> list[dict[str, Any]]:
        """The key's audit trail, oldest first."""
        return await self._read(lambda c: store.key_history(c, ref))

    async def list_keys(
        self, user: uuid.UUID | str | None = None, *, include_deleted: bool = False
    ) -> list[KeyInfo]:
        return await self._read(lambda c: store.list_keys(c, user, include_deleted=include_deleted))

    async def create_key(
        self,
        *,
        user: uuid.UUID | str,
        name: str | None = None,
        scopes: list[str] | None = None,
        expires_at: datetime | None = None,
        ip_allowlist: list[str] | None = None,
        environment: str = "live",
        limits_mode: str | None = None,
    ) -> tuple[keys.NewKey, KeyInfo]:
        """A new key; its plaintext is returned here once and never stored."""

        async def work(conn: asyncpg.Connection) -> tuple[tuple[keys.NewKey, KeyInfo], list]:
            owner = await store.get_user(conn, user)
            return await self._insert_key(
                conn,
                owner,
                name=name,
                scopes=scopes or [],
                expires_at=expires_at,
                ip_allowlist=ip_allowlist,
                environment=environment,
                limits_mode=limits_mode,
                rotated_from=None,
            ), []

        return await self.change(work)

    async def _insert_key(
        self,
        conn: asyncpg.Connection,
        owner: User,
        *,
        name: str | None,
        scopes: list[str],
        expires_at: datetime | None,
        ip_allowlist: list[str] | None,
        environment: str,
        limits_mode: str | None,
        rotated_from: uuid.UUID | None,
    ) -> tuple[keys.NewKey, KeyInfo]:
        if owner.status != "active":
            raise InputError(f"user {owner.email} is {owner.status}")
        if environment not in keys.ENVIRONMENTS:
            raise InputError(f"environment must be one of {', '.join(keys.ENVIRONMENTS)}")
        if expires_at is not None and expires_at <= datetime.now(UTC):
            raise InputError("expiry must be in the future")
        if limits_mode is not None and limits_mode not in LIMIT_MODES:
            raise InputError(f"limits mode must be one of {', '.join(LIMIT_MODES)}")
        new = keys.generate(environment)
        info = await store.insert_key(
            conn,
            user_id=owner.id,
            key_hash=keys.hash_key(new.plaintext, self._pepper),
            prefix=new.prefix,
            name=name,
            environment=environment,
            scopes=validate_scopes(scopes),
            ip_allowlist=validate_cidrs(ip_allowlist),
            expires_at=expires_at,
            limits_mode=limits_mode,
            rotated_from=rotated_from,
        )
        await store.audit(
            conn, info.id, "created", {"rotated_from": str(rotated_from)} if rotated_from else {}
        )
        return new, info

    async def rotate_key(
        self, ref: str, *, grace: timedelta | None = None
    ) -> tuple[keys.NewKey, KeyInfo, KeyInfo]:
        """A successor with the same metadata; the old key works until now + grace.
        Returns the new key (plaintext, once), its info, and the old key's info."""
        grace = self._grace if grace is None else grace
        if grace < timedelta(0):
            raise InputError("grace period cannot be negative")

        async def work(
            conn: asyncpg.Connection,
        ) -> tuple[tuple[keys.NewKey, KeyInfo, KeyInfo], list[store.Stamp]]:
            # the owner first, as set-tier and suspend do: the new key's foreign
            # key check needs the user row, and the two orders would deadlock
            await store.lock_user(conn, (await store.get_key(conn, ref)).user_id)
            old = await store.lock_key(conn, ref)
            if old.status != "active":
                raise InputError(
                    f"key {old.prefix} is {old.status}; only active keys can be rotated"
                )
            new, info = await self._insert_key(
                conn,
                await store.get_user(conn, old.user_id),  # locked above
                name=old.name,
                scopes=old.scopes,
                expires_at=old.expires_at,
                ip_allowlist=old.ip_allowlist,
                environment=old.environment,
                limits_mode=old.limits_mode,
                rotated_from=old.id,
            )
            stamp = await store.mark_rotating(conn, old.id, grace)
            await store.audit(
                conn,
                old.id,
                "rotated",
                {"replaced_by": str(info.id), "grace_s": grace.total_seconds()},
            )
            return (new, info, await store.get_key(conn, str(old.id))), [stamp]

        return await self.change(work)

    async def revoke_key(self, ref: str, *, reason: str) -> KeyInfo:
        """Stops the key on every edge's next request."""
        if not reason.strip():
            raise InputError("a revocation needs a reason")

        async def work(conn: asyncpg.Connection) -> tuple[KeyInfo, list[store.Stamp]]:
            key = await store.lock_key(conn, ref)
            if key.status in ("revoked", "deleted"):
                raise InputError(f"key {key.prefix} is already {key.status}")
            stamp = await store.revoke(conn, key.id, reason)
            await store.audit(conn, key.id, "revoked", {"reason": reason})
            return await store.get_key(conn, str(key.id)), [stamp]

        return await self.change(work)

    async def delete_key(self, ref: str) -> KeyInfo:
        """Soft delete: the row stays for the audit trail and usage history."""

        async def work(conn: asyncpg.Connection) -> tuple[KeyInfo, list[store.Stamp]]:
            key = await store.lock_key(conn, ref)
            if key.status == "deleted":
                raise InputError(f"key {key.prefix} is already deleted")
            stamp = await store.delete(conn, key.id)
            await store.audit(conn, key.id, "deleted", {})
            return await store.get_key(conn, str(key.id)), [stamp]

        return await self.change(work)


def for_settings(
    settings: Settings, db: asyncpg.Connection | asyncpg.Pool, redis: Any
) -> AccountsService:
    """The service as the CLI and the worker build it: the edges' cache in
    ``redis`` (an asyncio client), the settings' pepper and grace period."""
    return AccountsService(
        db,
        cache=IdentityCache(
            redis,
            prefix=settings.redis_key_prefix,
            ttl_s=settings.key_cache_ttl_s,
            # a key that stopped working stays refused in the cache longer
            negative_ttl_s=max(300, settings.key_cache_ttl_s * 2),
        ),
        pepper=settings.pepper,
        rotation_grace=timedelta(hours=settings.rotation_grace_hours),
    )
