"""The accounts vocabulary: tiers, users, keys and the identity the edge caches,
with the validation every lifecycle change applies to its input."""

from __future__ import annotations

import ipaddress
import json
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from metering.errors import InputError

SCOPE = re.compile(r"^[a-z][a-z0-9_.:*-]{0,63}$")
TIER_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
LIMIT_MODES = ("enforce", "shadow")
LIMIT_SCOPES = ("user", "key")


@dataclass(frozen=True, slots=True)
class Tier:
    id: int
    name: str
    daily_quota: int | None
    rate_limit_per_minute: int
    price_monthly: Decimal
    limits_mode: str
    features: dict[str, Any]
    rate_limit_scope: str = "user"  # user: one bucket per user; key: per key lineage


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
    quarantine_limit: int | None = None  # a quarantine's per-minute limit
    rotate_by: datetime | None = None  # a forced rotation's deadline


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
    limit_key: str  # whose per-minute bucket: "user:<id>", or "key:<lineage>" per the tier
    # a forced rotation's deadline (unix seconds): the edge sends it as Sunset
    rotate_by: float | None = None
    quarantined: bool = False  # its per-minute limit is enforced even in shadow mode

    def to_json(self) -> str:
        return json.dumps(
            {f: getattr(self, f) for f in self.__dataclass_fields__}, separators=(",", ":")
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> Identity:
        return cls(**json.loads(raw))


def validate_scopes(scopes: list[str]) -> list[str]:
    for s in scopes:
        if not SCOPE.match(s):
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
