"""Tiers, users and API keys in PostgreSQL: the lifecycle operators drive.

Keys are never stored or returned in plaintext except by :func:`create_key`
and :func:`rotate_key`, which return the new key once. Deletion is soft.
Every key change is recorded in ``api_key_events``.
"""

from __future__ import annotations

import ipaddress
import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from metering import keys
from metering.errors import InputError

_SCOPE = re.compile(r"^[a-z][a-z0-9_.:*-]{0,63}$")
_TIER_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
LIMIT_MODES = ("enforce", "shadow")


@dataclass(frozen=True, slots=True)
class Tier:
    id: int
    name: str
    daily_quota: int | None
    rate_limit_per_minute: int
    price_monthly: Decimal
    limits_mode: str
    features: dict[str, Any]


@dataclass(frozen=True, slots=True)
class User:
    id: uuid.UUID
    email: str
    name: str | None
    tier: str
    status: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class KeyInfo:
    id: uuid.UUID
    user_id: uuid.UUID
    name: str | None
    prefix: str
    environment: str
    scopes: list[str]
    ip_allowlist: list[str] | None
    status: str
    limits_mode: str | None
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    rotates_at: datetime | None
    rotated_from: uuid.UUID | None
    key_hash: str


@dataclass(frozen=True, slots=True)
class Identity:
    """What the verifier needs to decide on a request (cached in Redis as JSON)."""

    key_id: str
    user_id: str
    prefix: str
    status: str  # active | rotating
    expires_at: float | None  # unix seconds
    rotates_at: float | None
    scopes: list[str]
    ip_allowlist: list[str] | None
    tier: str
    daily_quota: int | None
    rate_limit_per_minute: int
    limits_mode: str  # effective: the key's, else the tier's

    def to_json(self) -> str:
        return json.dumps(
            {f: getattr(self, f) for f in self.__dataclass_fields__}, separators=(",", ":")
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> Identity:
        return cls(**json.loads(raw))


# -- tiers -------------------------------------------------------------------

_TIER_COLS = "id, name, daily_quota, rate_limit_per_minute, price_monthly, limits_mode, features"


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
    )


async def list_tiers(conn: asyncpg.Connection) -> list[Tier]:
    return [
        _tier(r) for r in await conn.fetch(f"SELECT {_TIER_COLS} FROM access_tiers ORDER BY id")
    ]


async def create_tier(
    conn: asyncpg.Connection,
    *,
    name: str,
    daily_quota: int | None,
    rate_limit_per_minute: int,
    price_monthly: Decimal = Decimal(0),
    limits_mode: str = "enforce",
) -> Tier:
    if not _TIER_NAME.match(name):
        raise InputError(f"tier name {name!r}: lower-case letters, digits, - and _ (max 32)")
    if daily_quota is not None and daily_quota < 1:
        raise InputError("daily quota must be >= 1 (omit it for unlimited)")
    if rate_limit_per_minute < 1:
        raise InputError("rate limit must be >= 1 per minute")
    if limits_mode not in LIMIT_MODES:
        raise InputError(f"limits mode must be one of {', '.join(LIMIT_MODES)}")
    try:
        row = await conn.fetchrow(
            f"""INSERT INTO access_tiers (name, daily_quota, rate_limit_per_minute, price_monthly,
                                          limits_mode)
                VALUES ($1, $2, $3, $4, $5) RETURNING {_TIER_COLS}""",
            name,
            daily_quota,
            rate_limit_per_minute,
            price_monthly,
            limits_mode,
        )
    except asyncpg.UniqueViolationError:
        raise InputError(f"tier {name!r} already exists") from None
    assert row is not None
    return _tier(row)


async def set_tier_limits_mode(conn: asyncpg.Connection, name: str, mode: str) -> None:
    if mode not in LIMIT_MODES:
        raise InputError(f"limits mode must be one of {', '.join(LIMIT_MODES)}")
    done = await conn.execute(
        "UPDATE access_tiers SET limits_mode = $2 WHERE name = $1", name, mode
    )
    if done.endswith(" 0"):
        raise InputError(f"unknown tier {name!r}")


# -- users -------------------------------------------------------------------

_USER_SELECT = """
SELECT u.id, u.email, u.name, t.name AS tier, u.status, u.created_at
FROM users u JOIN access_tiers t ON t.id = u.tier_id
"""


def _user(r: asyncpg.Record) -> User:
    return User(r["id"], r["email"], r["name"], r["tier"], r["status"], r["created_at"])


async def _tier_id(conn: asyncpg.Connection, tier: str) -> int:
    tier_id = await conn.fetchval("SELECT id FROM access_tiers WHERE name = $1", tier)
    if tier_id is None:
        raise InputError(f"unknown tier {tier!r}")
    return int(tier_id)


async def create_user(
    conn: asyncpg.Connection, *, email: str, tier: str, name: str | None = None
) -> User:
    if "@" not in email or len(email) > 320:
        raise InputError(f"{email!r} is not an email address")
    tier_id = await _tier_id(conn, tier)
    try:
        uid = await conn.fetchval(
            "INSERT INTO users (email, name, tier_id) VALUES ($1, $2, $3) RETURNING id",
            email,
            name,
            tier_id,
        )
    except asyncpg.UniqueViolationError:
        raise InputError(f"a user with email {email!r} already exists") from None
    return await get_user(conn, uid)


async def get_user(conn: asyncpg.Connection, ref: uuid.UUID | str) -> User:
    """By id, or by email."""
    if isinstance(ref, uuid.UUID):
        row = await conn.fetchrow(_USER_SELECT + " WHERE u.id = $1", ref)
    else:
        try:
            row = await conn.fetchrow(_USER_SELECT + " WHERE u.id = $1", uuid.UUID(ref))
        except ValueError:
            row = await conn.fetchrow(_USER_SELECT + " WHERE lower(u.email) = lower($1)", ref)
    if row is None:
        raise InputError(f"unknown user {ref}")
    return _user(row)


async def list_users(conn: asyncpg.Connection) -> list[User]:
    return [_user(r) for r in await conn.fetch(_USER_SELECT + " ORDER BY u.created_at")]


async def set_user_tier(conn: asyncpg.Connection, ref: uuid.UUID | str, tier: str) -> User:
    user = await get_user(conn, ref)
    tier_id = await _tier_id(conn, tier)
    await conn.execute(
        "UPDATE users SET tier_id = $2, updated_at = now() WHERE id = $1", user.id, tier_id
    )
    return await get_user(conn, user.id)


async def set_user_status(conn: asyncpg.Connection, ref: uuid.UUID | str, status: str) -> User:
    user = await get_user(conn, ref)
    await conn.execute(
        "UPDATE users SET status = $2, updated_at = now() WHERE id = $1", user.id, status
    )
    return await get_user(conn, user.id)


async def user_key_hashes(conn: asyncpg.Connection, user_id: uuid.UUID) -> list[str]:
    """Hashes of a user's usable keys (to drop them from the verifier cache)."""
    rows = await conn.fetch(
        "SELECT key_hash FROM api_keys WHERE user_id = $1 AND status IN ('active', 'rotating')",
        user_id,
    )
    return [r["key_hash"] for r in rows]


# -- keys --------------------------------------------------------------------

_KEY_COLS = """id, user_id, name, prefix, environment, scopes, ip_allowlist::text[] AS ip_allowlist,
    status, limits_mode, created_at, last_used_at, expires_at, rotates_at, rotated_from, key_hash"""


def _key(r: asyncpg.Record) -> KeyInfo:
    fields: dict[str, Any] = dict(r)
    fields["scopes"] = list(fields["scopes"])
    if fields["ip_allowlist"] is not None:
        fields["ip_allowlist"] = list(fields["ip_allowlist"])
    return KeyInfo(**fields)


def validate_scopes(scopes: list[str]) -> list[str]:
    for s in scopes:
        if not _SCOPE.match(s):
            raise InputError(f"scope {s!r}: lower-case, starting with a letter, e.g. usage:read")
    return sorted(set(scopes))


def validate_cidrs(cidrs: list[str] | None) -> list[str] | None:
    if cidrs is None:
        return None
    out = []
    for c in cidrs:
        try:
            out.append(str(ipaddress.ip_network(c.strip(), strict=False)))
        except ValueError:
            raise InputError(f"{c!r} is not an IP address or CIDR block") from None
    if not out:
        raise InputError("the IP allowlist is empty: omit it to allow any address")
    return out


async def create_key(
    conn: asyncpg.Connection,
    *,
    user: uuid.UUID | str,
    pepper: bytes | None,
    name: str | None = None,
    scopes: list[str] | None = None,
    expires_at: datetime | None = None,
    ip_allowlist: list[str] | None = None,
    environment: str = "live",
    limits_mode: str | None = None,
    rotated_from: uuid.UUID | None = None,
) -> tuple[keys.NewKey, KeyInfo]:
    owner = await get_user(conn, user)
    if owner.status != "active":
        raise InputError(f"user {owner.email} is {owner.status}")
    if environment not in keys.ENVIRONMENTS:
        raise InputError(f"environment must be one of {', '.join(keys.ENVIRONMENTS)}")
    if expires_at is not None and expires_at <= datetime.now(UTC):
        raise InputError("expiry must be in the future")
    if limits_mode is not None and limits_mode not in LIMIT_MODES:
        raise InputError(f"limits mode must be one of {', '.join(LIMIT_MODES)}")
    scopes = validate_scopes(scopes or [])
    allow = validate_cidrs(ip_allowlist)
    new = keys.generate(environment)
    async with conn.transaction():
        row = await conn.fetchrow(
            f"""INSERT INTO api_keys (user_id, name, prefix, key_hash, environment, scopes,
                                      ip_allowlist, expires_at, limits_mode, rotated_from)
                VALUES ($1, $2, $3, $4, $5, $6, $7::cidr[], $8, $9, $10)
                RETURNING {_KEY_COLS}""",
            owner.id,
            name,
            new.prefix,
            keys.hash_key(new.plaintext, pepper),
            environment,
            scopes,
            allow,
            expires_at,
            limits_mode,
            rotated_from,
        )
        assert row is not None
        await _audit(
            conn, row["id"], "created", {"rotated_from": str(rotated_from)} if rotated_from else {}
        )
    return new, _key(row)


async def get_key(conn: asyncpg.Connection, ref: str) -> KeyInfo:
    """By prefix (mk_live_xxxxxxxx) or id."""
    try:
        row = await conn.fetchrow(f"SELECT {_KEY_COLS} FROM api_keys WHERE id = $1", uuid.UUID(ref))
    except ValueError:
        row = await conn.fetchrow(f"SELECT {_KEY_COLS} FROM api_keys WHERE prefix = $1", ref)
    if row is None:
        raise InputError(f"unknown key {ref!r} (give its prefix or id)")
    return _key(row)


async def list_keys(
    conn: asyncpg.Connection, user: uuid.UUID | str | None = None, *, include_deleted: bool = False
) -> list[KeyInfo]:
    user_id = (await get_user(conn, user)).id if user is not None else None
    rows = await conn.fetch(
        f"""SELECT {_KEY_COLS} FROM api_keys
            WHERE ($1::uuid IS NULL OR user_id = $1) AND ($2 OR status <> 'deleted')
            ORDER BY created_at""",
        user_id,
        include_deleted,
    )
    return [_key(r) for r in rows]


async def rotate_key(
    conn: asyncpg.Connection, ref: str, *, grace: timedelta, pepper: bytes | None
) -> tuple[keys.NewKey, KeyInfo, KeyInfo]:
    """New key with the same metadata; the old one works until now + grace."""
    if grace < timedelta(0):
        raise InputError("grace period cannot be negative")
    async with conn.transaction():
        old = await get_key(conn, ref)
        locked = await conn.fetchval("SELECT status FROM api_keys WHERE id = $1 FOR UPDATE", old.id)
        if locked != "active":
            raise InputError(f"key {old.prefix} is {locked}; only active keys can be rotated")
        new, info = await create_key(
            conn,
            user=old.user_id,
            pepper=pepper,
            name=old.name,
            scopes=old.scopes,
            expires_at=old.expires_at,
            ip_allowlist=old.ip_allowlist,
            environment=old.environment,
            limits_mode=old.limits_mode,
            rotated_from=old.id,
        )
        await conn.execute(
            "UPDATE api_keys SET status = 'rotating', rotates_at = now() + $2 WHERE id = $1",
            old.id,
            grace,
        )
        await _audit(
            conn, old.id, "rotated", {"replaced_by": str(info.id), "grace_s": grace.total_seconds()}
        )
        old = await get_key(conn, str(old.id))
    return new, info, old


async def revoke_key(conn: asyncpg.Connection, ref: str, *, reason: str) -> KeyInfo:
    if not reason.strip():
        raise InputError("a revocation needs a reason")
    async with conn.transaction():
        key = await get_key(conn, ref)
        if key.status in ("revoked", "deleted"):
            raise InputError(f"key {key.prefix} is already {key.status}")
        await conn.execute(
            """UPDATE api_keys SET status = 'revoked', revoked_at = now(), revocation_reason = $2
               WHERE id = $1""",
            key.id,
            reason,
        )
        await _audit(conn, key.id, "revoked", {"reason": reason})
    return await get_key(conn, str(key.id))


async def delete_key(conn: asyncpg.Connection, ref: str) -> KeyInfo:
    """Soft delete: the row stays for the audit trail and usage history."""
    async with conn.transaction():
        key = await get_key(conn, ref)
        if key.status == "deleted":
            raise InputError(f"key {key.prefix} is already deleted")
        await conn.execute(
            "UPDATE api_keys SET status = 'deleted', deleted_at = now() WHERE id = $1", key.id
        )
        await _audit(conn, key.id, "deleted", {})
    return await get_key(conn, str(key.id))


async def _audit(
    conn: asyncpg.Connection, key_id: uuid.UUID, action: str, detail: dict[str, Any]
) -> None:
    await conn.execute(
        "INSERT INTO api_key_events (api_key_id, action, detail) VALUES ($1, $2, $3::jsonb)",
        key_id,
        action,
        json.dumps(detail),
    )


# -- the verifier's queries ----------------------------------------------------

LOOKUP = """
SELECT k.id, k.user_id, k.prefix, k.status, k.expires_at, k.rotates_at, k.scopes,
       k.ip_allowlist::text[] AS ip_allowlist, coalesce(k.limits_mode, t.limits_mode) AS limits_mode,
       u.status AS user_status, t.name AS tier, t.daily_quota, t.rate_limit_per_minute
FROM api_keys k
JOIN users u ON u.id = k.user_id
JOIN access_tiers t ON t.id = u.tier_id
WHERE k.key_hash = $1 AND k.status IN ('active', 'rotating')
"""


async def lookup_identity(conn: asyncpg.Connection, key_hash: str) -> Identity | None:
    """The identity behind a key hash, or None if no usable key has it."""
    r = await conn.fetchrow(LOOKUP, key_hash)
    if r is None or r["user_status"] != "active":
        return None
    return Identity(
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
    )


async def touch_last_used(conn: asyncpg.Connection, seen: dict[str, float]) -> None:
    """One UPDATE for many keys: last_used_at only moves forward."""
    if not seen:
        return
    ids = [uuid.UUID(k) for k in seen]
    times = [datetime.fromtimestamp(t, UTC) for t in seen.values()]
    await conn.execute(
        """UPDATE api_keys k SET last_used_at = greatest(coalesce(k.last_used_at, v.ts), v.ts)
           FROM unnest($1::uuid[], $2::timestamptz[]) AS v(id, ts) WHERE k.id = v.id""",
        ids,
        times,
    )
