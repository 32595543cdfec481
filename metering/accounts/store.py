"""Tiers, users and API keys in PostgreSQL: one function per statement or step,
each on a connection the caller owns (and whose transaction it chose).

The SQL is in ``metering/db/queries/accounts.sql``. Lifecycle changes go
through :class:`metering.accounts.service.AccountsService`, which wraps these
in one transaction with their audit rows and keeps the edge cache in step;
the functions that change a key's verdict return its :class:`Stamp`.
Keys are never stored in plaintext; deletion is soft.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from metering.accounts.model import (
    LIMIT_MODES,
    LIMIT_SCOPES,
    TIER_NAME,
    Identity,
    KeyInfo,
    Tier,
    User,
)
from metering.db.queries import get
from metering.errors import InputError

Q_LIST_TIERS = get("list_tiers")
Q_CREATE_TIER = get("create_tier")
Q_SET_TIER_LIMITS_MODE = get("set_tier_limits_mode")
Q_TIER_ID = get("tier_id")
Q_SET_TIER_DETECTION = get("set_tier_detection")
Q_CREATE_USER = get("create_user")
Q_USER_BY_ID = get("user_by_id")
Q_USER_BY_EMAIL = get("user_by_email")
Q_LIST_USERS = get("list_users")
Q_LOCK_USER = get("lock_user")
Q_SET_USER_TIER = get("set_user_tier")
Q_SET_USER_STATUS = get("set_user_status")
Q_BUMP_USER_KEYS = get("bump_user_keys")
Q_INSERT_KEY = get("insert_key")
Q_KEY_BY_ID = get("key_by_id")
Q_KEY_BY_PREFIX = get("key_by_prefix")
Q_LIST_KEYS = get("list_keys")
Q_LOCK_KEY = get("lock_key")
Q_MARK_ROTATING = get("mark_rotating")
Q_REVOKE_KEY = get("revoke_key")
Q_DELETE_KEY = get("delete_key")
Q_AUDIT_KEY_EVENT = get("audit_key_event")
Q_LOOKUP_IDENTITY = get("lookup_identity")
Q_TOUCH_LAST_USED = get("touch_last_used")
Q_QUARANTINE_KEY = get("quarantine_key")
Q_LIFT_QUARANTINE = get("lift_quarantine")
Q_FORCE_ROTATION = get("force_rotation")
Q_CANCEL_FORCED_ROTATION = get("cancel_forced_rotation")
Q_REINSTATE_KEY = get("reinstate_key")
Q_KEY_HISTORY = get("key_history")


@dataclass(frozen=True, slots=True)
class Stamp:
    """A key whose verdict a transaction changed, and the version it now has."""

    key_hash: str
    version: int


def _stamps(rows: list[asyncpg.Record]) -> list[Stamp]:
    return [Stamp(r["key_hash"], r["version"]) for r in rows]


# -- tiers -------------------------------------------------------------------


def _tier(r: asyncpg.Record) -> Tier:
    features = r["features"]
    return Tier(
        r["id"],
        r["name"],
        r["daily_quota"],
        r["rate_limit_per_minute"],
        r["price_monthly"],
        r["limits_mode"],
        json.loads(features) if isinstance(features, str) else dict(features),
        r["rate_limit_scope"],
    )


async def list_tiers(conn: asyncpg.Connection) -> list[Tier]:
    return [_tier(r) for r in await conn.fetch(Q_LIST_TIERS)]


async def create_tier(
    conn: asyncpg.Connection,
    *,
    name: str,
    daily_quota: int | None,
    rate_limit_per_minute: int,
    price_monthly: Decimal = Decimal(0),
    limits_mode: str = "enforce",
    rate_limit_scope: str = "user",
) -> Tier:
    if rate_limit_scope not in LIMIT_SCOPES:
        raise InputError(f"rate limit scope must be one of {', '.join(LIMIT_SCOPES)}")
    if not TIER_NAME.match(name):
        raise InputError(f"tier name {name!r}: lower-case letters, digits, - and _ (max 32)")
    if daily_quota is not None and daily_quota < 1:
        raise InputError("daily quota must be >= 1 (omit it for unlimited)")
    if rate_limit_per_minute < 1:
        raise InputError("rate limit must be >= 1 per minute")
    if limits_mode not in LIMIT_MODES:
        raise InputError(f"limits mode must be one of {', '.join(LIMIT_MODES)}")
    try:
        row = await conn.fetchrow(
            Q_CREATE_TIER,
            name,
            daily_quota,
            rate_limit_per_minute,
            price_monthly,
            limits_mode,
            rate_limit_scope,
        )
    except asyncpg.UniqueViolationError:
        raise InputError(f"tier {name!r} already exists") from None
    assert row is not None
    return _tier(row)


async def set_tier_limits_mode(conn: asyncpg.Connection, name: str, mode: str) -> None:
    if mode not in LIMIT_MODES:
        raise InputError(f"limits mode must be one of {', '.join(LIMIT_MODES)}")
    done = await conn.execute(Q_SET_TIER_LIMITS_MODE, name, mode)
    if done.endswith(" 0"):
        raise InputError(f"unknown tier {name!r}")


async def set_tier_detection(
    conn: asyncpg.Connection, name: str, overrides: dict[str, Any] | None
) -> None:
    """The tier's keys use these detection thresholds (None: the deployment's)."""
    from metering.detect.rules import Rules

    if overrides is not None:
        Rules().with_overrides(overrides)  # InputError naming the bad one
    done = await conn.execute(
        Q_SET_TIER_DETECTION, name, None if overrides is None else json.dumps(overrides)
    )
    if done.endswith(" 0"):
        raise InputError(f"unknown tier {name!r}")


async def tier_id(conn: asyncpg.Connection, tier: str) -> int:
    found = await conn.fetchval(Q_TIER_ID, tier)
    if found is None:
        raise InputError(f"unknown tier {tier!r}")
    return int(found)


# -- users -------------------------------------------------------------------


def _user(r: asyncpg.Record) -> User:
    return User(r["id"], r["email"], r["name"], r["tier"], r["status"], r["created_at"])


async def create_user(
    conn: asyncpg.Connection, *, email: str, tier: str, name: str | None = None
) -> User:
    if "@" not in email or len(email) > 320:
        raise InputError(f"{email!r} is not an email address")
    tid = await tier_id(conn, tier)
    try:
        uid = await conn.fetchval(Q_CREATE_USER, email, name, tid)
    except asyncpg.UniqueViolationError:
        raise InputError(f"a user with email {email!r} already exists") from None
    return await get_user(conn, uid)


async def get_user(conn: asyncpg.Connection, ref: uuid.UUID | str) -> User:
    """By id, or by email."""
    if isinstance(ref, uuid.UUID):
        row = await conn.fetchrow(Q_USER_BY_ID, ref)
    else:
        try:
            row = await conn.fetchrow(Q_USER_BY_ID, uuid.UUID(ref))
        except ValueError:
            row = await conn.fetchrow(Q_USER_BY_EMAIL, ref)
    if row is None:
        raise InputError(f"unknown user {ref}")
    return _user(row)


async def list_users(conn: asyncpg.Connection) -> list[User]:
    return [_user(r) for r in await conn.fetch(Q_LIST_USERS)]


async def lock_user(conn: asyncpg.Connection, ref: uuid.UUID | str) -> User:
    """The user, locked until the transaction ends (serialises tier and status changes)."""
    user = await get_user(conn, ref)
    await conn.execute(Q_LOCK_USER, user.id)
    return user


async def set_user_tier(conn: asyncpg.Connection, user_id: uuid.UUID, tier: str) -> list[Stamp]:
    await conn.execute(Q_SET_USER_TIER, user_id, await tier_id(conn, tier))
    return _stamps(await conn.fetch(Q_BUMP_USER_KEYS, user_id))


async def set_user_status(conn: asyncpg.Connection, user_id: uuid.UUID, status: str) -> list[Stamp]:
    await conn.execute(Q_SET_USER_STATUS, user_id, status)
    return _stamps(await conn.fetch(Q_BUMP_USER_KEYS, user_id))


# -- keys --------------------------------------------------------------------


def _key(r: asyncpg.Record) -> KeyInfo:
    fields: dict[str, Any] = dict(r)
    fields["scopes"] = list(fields["scopes"])
    if fields["ip_allowlist"] is not None:
        fields["ip_allowlist"] = list(fields["ip_allowlist"])
    return KeyInfo(**fields)


async def insert_key(
    conn: asyncpg.Connection,
    *,
    user_id: uuid.UUID,
    key_hash: str,
    prefix: str,
    name: str | None,
    environment: str,
    scopes: list[str],
    ip_allowlist: list[str] | None,
    expires_at: datetime | None,
    limits_mode: str | None,
    rotated_from: uuid.UUID | None,
) -> KeyInfo:
    row = await conn.fetchrow(
        Q_INSERT_KEY,
        user_id,
        name,
        prefix,
        key_hash,
        environment,
        scopes,
        ip_allowlist,
        expires_at,
        limits_mode,
        rotated_from,
    )
    assert row is not None
    return _key(row)


async def get_key(conn: asyncpg.Connection, ref: str) -> KeyInfo:
    """By prefix (mk_live_xxxxxxxx) or id."""
    try:
        row = await conn.fetchrow(Q_KEY_BY_ID, uuid.UUID(ref))
    except ValueError:
        row = await conn.fetchrow(Q_KEY_BY_PREFIX, ref)
    if row is None:
        raise InputError(f"unknown key {ref!r} (give its prefix or id)")
    return _key(row)


async def lock_key(conn: asyncpg.Connection, ref: str) -> KeyInfo:
    """The key as it is once locked until the transaction ends."""
    key = await get_key(conn, ref)
    await conn.execute(Q_LOCK_KEY, key.id)
    return await get_key(conn, str(key.id))


async def list_keys(
    conn: asyncpg.Connection, user: uuid.UUID | str | None = None, *, include_deleted: bool = False
) -> list[KeyInfo]:
    user_id = (await get_user(conn, user)).id if user is not None else None
    return [_key(r) for r in await conn.fetch(Q_LIST_KEYS, user_id, include_deleted)]


async def mark_rotating(conn: asyncpg.Connection, key_id: uuid.UUID, grace: timedelta) -> Stamp:
    row = await conn.fetchrow(Q_MARK_ROTATING, key_id, grace)
    assert row is not None
    return Stamp(row["key_hash"], row["version"])


async def revoke(conn: asyncpg.Connection, key_id: uuid.UUID, reason: str) -> Stamp:
    row = await conn.fetchrow(Q_REVOKE_KEY, key_id, reason)
    assert row is not None
    return Stamp(row["key_hash"], row["version"])


async def delete(conn: asyncpg.Connection, key_id: uuid.UUID) -> Stamp:
    row = await conn.fetchrow(Q_DELETE_KEY, key_id)
    assert row is not None
    return Stamp(row["key_hash"], row["version"])


async def audit(
    conn: asyncpg.Connection, key_id: uuid.UUID, action: str, detail: dict[str, Any]
) -> None:
    await conn.execute(Q_AUDIT_KEY_EVENT, key_id, action, json.dumps(detail))


# -- the edge's queries --------------------------------------------------------


async def lookup_identity(conn: asyncpg.Connection, key_hash: str) -> tuple[Identity | None, int]:
    """The identity behind a key hash (None if no usable key has it) and the
    key's version (0 when no key has that hash)."""
    r = await conn.fetchrow(Q_LOOKUP_IDENTITY, key_hash)
    if r is None:
        return None, 0
    if r["status"] not in ("active", "rotating") or r["user_status"] != "active":
        return None, r["version"]
    identity = Identity(
        key_id=str(r["id"]),
        user_id=str(r["user_id"]),
        prefix=r["prefix"],
        status=r["status"],
        expires_at=r["expires_at"].timestamp() if r["expires_at"] else None,
        rotates_at=r["rotates_at"].timestamp() if r["rotates_at"] else None,
        scopes=list(r["scopes"]),
        ip_allowlist=list(r["ip_allowlist"]) if r["ip_allowlist"] is not None else None,
        tier=r["tier"],
        daily_quota=r["daily_quota"],
        rate_limit_per_minute=r["rate_limit_per_minute"],
        limits_mode=r["limits_mode"],
        limit_key=r["limit_key"],
        rotate_by=r["rotate_by"].timestamp() if r["rotate_by"] else None,
        quarantined=r["quarantined"],
    )
    return identity, r["version"]


async def touch_last_used(conn: asyncpg.Connection, seen: dict[str, float]) -> None:
    """One UPDATE for many keys: last_used_at only moves forward."""
    if not seen:
        return
    ids = [uuid.UUID(k) for k in seen]
    times = [datetime.fromtimestamp(t, UTC) for t in seen.values()]
    await conn.execute(Q_TOUCH_LAST_USED, ids, times)


async def stamp(conn: asyncpg.Connection, query: str, *args: Any) -> Stamp | None:
    """Run one of the key-security updates; its stamp, or None if it changed nothing."""
    row = await conn.fetchrow(query, *args)
    return None if row is None else Stamp(row["key_hash"], row["version"])


async def key_history(conn: asyncpg.Connection, ref: str) -> list[dict[str, Any]]:
    key = await get_key(conn, ref)
    return [dict(r) for r in await conn.fetch(Q_KEY_HISTORY, key.id)]
