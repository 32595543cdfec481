"""``metering tiers|users|keys``: account lifecycle, through the accounts service."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

from metering.accounts import AccountsService
from metering.cli import billing
from metering.cli.common import Parser, decimal, duration, positive_int, table, timestamp, when
from metering.settings import Settings

T = TypeVar("T")


def add_parsers(sub: argparse._SubParsersAction[Parser]) -> None:
    tiers = sub.add_parser("tiers", help="access tiers")
    tsub = tiers.add_subparsers(dest="action", required=True, parser_class=Parser)
    tsub.add_parser("list", help="list tiers")
    tc = tsub.add_parser("create", help="create a tier")
    tc.add_argument("name")
    tc.add_argument("--rate-limit", type=positive_int, required=True, help="requests per minute")
    tc.add_argument(
        "--daily-quota", type=positive_int, help="requests per UTC day (omit: unlimited)"
    )
    tc.add_argument("--price", type=decimal, default=Decimal(0), help="monthly base price")
    tc.add_argument("--shadow", action="store_true", help="compute limits but do not enforce them")
    tc.add_argument(
        "--limit-per",
        choices=["user", "key"],
        default="user",
        help="share the per-minute limit among a user's keys (default) or give each key its own",
    )
    tm = tsub.add_parser("set-mode", help="enforce or shadow the tier's limits")
    tm.add_argument("name")
    tm.add_argument("mode", choices=["enforce", "shadow"])
    td = tsub.add_parser(
        "set-detection",
        help="anomaly thresholds for the tier's keys, e.g. fanout_floor=500 (none: the defaults)",
    )
    td.add_argument("name")
    td.add_argument("overrides", nargs="*", type=override, metavar="NAME=VALUE")
    billing.add_price_parsers(tsub)

    users = sub.add_parser("users", help="users (key owners)")
    usub = users.add_subparsers(dest="action", required=True, parser_class=Parser)
    uc = usub.add_parser("create", help="create a user")
    uc.add_argument("email")
    uc.add_argument("--tier", default="free")
    uc.add_argument("--name")
    usub.add_parser("list", help="list users")
    sl = usub.add_parser(
        "set-spend-limit",
        help="notify the user at 80 %% and 100 %% of this monthly amount (none: no spend notices)",
    )
    sl.add_argument("user", help="user id or email")
    sl.add_argument("amount", help="in the currency of their price, e.g. 500.00; or none")
    ut = usub.add_parser("set-tier", help="move a user to another tier")
    ut.add_argument("user", help="user id or email")
    ut.add_argument("tier")
    for verb, text in (
        ("suspend", "suspend a user: all their keys stop working"),
        ("activate", "re-activate a suspended user"),
    ):
        usub.add_parser(verb, help=text).add_argument("user", help="user id or email")

    keys_p = sub.add_parser("keys", help="API keys")
    ksub = keys_p.add_subparsers(dest="action", required=True, parser_class=Parser)
    kc = ksub.add_parser("create", help="create a key (printed once)")
    kc.add_argument("user", help="user id or email")
    kc.add_argument("--name")
    kc.add_argument("--scope", action="append", default=[], help="repeatable, e.g. items:read")
    expiry = kc.add_mutually_exclusive_group()
    expiry.add_argument("--expires-in", type=duration, help="TTL, e.g. 30d, 12h, 90m")
    expiry.add_argument("--expires-at", type=timestamp, help="RFC 3339 time")
    kc.add_argument(
        "--allow-ip", action="append", help="CIDR the key may be used from (repeatable)"
    )
    kc.add_argument("--env", choices=["live", "test"], default="live")
    kc.add_argument("--shadow", action="store_true", help="shadow mode for this key's limits")
    kl = ksub.add_parser("list", help="list keys (never the key itself)")
    kl.add_argument("--user", help="user id or email")
    kl.add_argument("--all", action="store_true", help="include deleted keys")
    kr = ksub.add_parser(
        "rotate", help="new key, same metadata; the old one works for a grace period"
    )
    kr.add_argument("key", help="key prefix (mk_live_xxxxxxxx) or id")
    kr.add_argument("--grace", type=duration, help="default 24h (METERING_ROTATION_GRACE_HOURS)")
    kv = ksub.add_parser("revoke", help="revoke a key now")
    kv.add_argument("key", help="key prefix or id")
    kv.add_argument("--reason", required=True)
    kd = ksub.add_parser("delete", help="soft-delete a key")
    kd.add_argument("key", help="key prefix or id")
    kh = ksub.add_parser("history", help="a key's audit trail (who did what, and why)")
    kh.add_argument("key", help="key prefix or id")
    krl = ksub.add_parser(
        "release", help="lift a key's quarantine and cancel its forced rotation (undo an alert)"
    )
    krl.add_argument("key", help="key prefix or id")
    krl.add_argument("--reason", required=True)
    kri = ksub.add_parser("reinstate", help="undo a revocation an alert made")
    kri.add_argument("key", help="key prefix or id")
    kri.add_argument("--reason", required=True)


def run(settings: Settings, work: Callable[[AccountsService], Awaitable[T]]) -> T:
    """``work(service)`` with a service on one PostgreSQL connection and the
    edges' Redis cache; everything is closed afterwards."""

    async def go() -> T:
        import redis.asyncio as aioredis

        from metering.accounts.service import for_settings
        from metering.db import connect

        conn = await connect(settings.database_url)
        client = aioredis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
        try:
            service = for_settings(settings, conn, client)
            return await work(service)
        finally:
            await client.aclose()
            await conn.close()

    return asyncio.run(go())


def cmd_tiers(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "list":
        tiers = run(settings, lambda s: s.list_tiers())
        table(
            "tiers",
            ["name", "per minute", "per", "daily quota", "price/month", "limits"],
            [
                (
                    t.name,
                    t.rate_limit_per_minute,
                    t.rate_limit_scope,
                    t.daily_quota or "unlimited",
                    t.price_monthly,
                    t.limits_mode,
                )
                for t in tiers
            ],
        )
    elif args.action == "create":
        tier = run(
            settings,
            lambda s: s.create_tier(
                name=args.name,
                daily_quota=args.daily_quota,
                rate_limit_per_minute=args.rate_limit,
                price_monthly=args.price,
                limits_mode="shadow" if args.shadow else "enforce",
                rate_limit_scope=args.limit_per,
            ),
        )
        print(f"created tier {tier.name}")
    elif args.action in ("prices", "set-price"):
        return billing.cmd_prices(args, settings)
    elif args.action == "set-detection":
        overrides = dict(args.overrides) or None
        run(settings, lambda s: s.set_tier_detection(args.name, overrides))
        shown = json.dumps(overrides) if overrides else "the deployment's defaults"
        print(f"tier {args.name}: detection thresholds {shown}")
    else:
        run(settings, lambda s: s.set_tier_limits_mode(args.name, args.mode))
        print(f"tier {args.name}: limits {args.mode}")
    return 0


def cmd_users(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "list":
        users = run(settings, lambda s: s.list_users())
        table(
            "users",
            ["id", "email", "name", "tier", "status", "created"],
            [(u.id, u.email, u.name, u.tier, u.status, when(u.created_at)) for u in users],
        )
        return 0
    if args.action == "create":
        user = run(
            settings, lambda s: s.create_user(email=args.email, tier=args.tier, name=args.name)
        )
        print(f"created user {user.id} {user.email} ({user.tier})")
        return 0
    if args.action == "set-spend-limit":
        return billing.cmd_spend_limit(args, settings)
    if args.action == "set-tier":
        user = run(settings, lambda s: s.set_tier(args.user, args.tier))
        print(f"user {user.email} is now on tier {user.tier}")
        return 0
    if args.action == "suspend":
        user = run(settings, lambda s: s.suspend(args.user))
    else:
        user = run(settings, lambda s: s.activate(args.user))
    print(f"user {user.email} is {user.status}")
    return 0


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "create":
        expires = args.expires_at or (
            datetime.now(UTC) + args.expires_in if args.expires_in else None
        )
        new, info = run(
            settings,
            lambda s: s.create_key(
                user=args.user,
                name=args.name,
                scopes=args.scope,
                expires_at=expires,
                ip_allowlist=args.allow_ip,
                environment=args.env,
                limits_mode="shadow" if args.shadow else None,
            ),
        )
        print(f"created key {info.prefix} (id {info.id}) for user {info.user_id}")
        print(
            f"scopes: {', '.join(info.scopes) or '(none)'}; expires: {when(info.expires_at) or 'never'}"
            f"; allowed from: {', '.join(info.ip_allowlist) if info.ip_allowlist else 'anywhere'}"
        )
        print("This is the only time the key is shown. Store it now:")
        print(new.plaintext)
        return 0
    if args.action == "list":
        rows = run(settings, lambda s: s.list_keys(args.user, include_deleted=args.all))
        table(
            "API keys",
            [
                "prefix",
                "name",
                "status",
                "scopes",
                "created",
                "last used",
                "expires",
                "rotates at",
                "allowed from",
                "limits",
                "security",
            ],
            [
                (
                    k.prefix,
                    k.name,
                    k.status,
                    ",".join(k.scopes) or None,
                    when(k.created_at),
                    when(k.last_used_at),
                    when(k.expires_at),
                    when(k.rotates_at),
                    ",".join(k.ip_allowlist) if k.ip_allowlist else None,
                    k.limits_mode or "tier",
                    security(k.quarantine_limit, k.rotate_by),
                )
                for k in rows
            ],
        )
        return 0
    if args.action == "rotate":
        new, info, old = run(settings, lambda s: s.rotate_key(args.key, grace=args.grace))
        print(
            f"rotated {old.prefix} -> {info.prefix}; the old key works until {when(old.rotates_at)}"
        )
        print("This is the only time the new key is shown. Store it now:")
        print(new.plaintext)
        return 0
    if args.action == "history":
        events = run(settings, lambda s: s.key_history(args.key))
        table(
            f"Key {args.key}: history",
            ["when", "action", "by", "detail"],
            [(when(e["created_at"]), e["action"], e["actor"], e["detail"]) for e in events],
        )
        return 0
    if args.action in ("release", "reinstate"):
        from metering.accounts.security import KeySecurity

        async def undo(s: AccountsService) -> Any:
            sec = KeySecurity(s)
            if args.action == "reinstate":
                return (await sec.reinstate(args.key, reason=args.reason))[0]
            await sec.lift_quarantine(args.key, reason=args.reason)
            return (await sec.cancel_forced_rotation(args.key, reason=args.reason))[0]

        key = run(settings, undo)
        state = (
            security(key.quarantine_limit, key.rotate_by) or "not quarantined, no forced rotation"
        )
        print(f"key {key.prefix} is {key.status}; {state}")
        return 0
    if args.action == "revoke":
        key = run(settings, lambda s: s.revoke_key(args.key, reason=args.reason))
    else:
        key = run(settings, lambda s: s.delete_key(args.key))
    print(f"key {key.prefix} is {key.status}")
    return 0


def override(text: str) -> tuple[str, object]:
    """NAME=VALUE, the value a number or a word (severity_*: low ... critical)."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


def security(quarantine_limit: int | None, rotate_by: datetime | None) -> str | None:
    """What the anomaly rules did to a key, in a few words."""
    parts = []
    if quarantine_limit is not None:
        parts.append(f"quarantined ({quarantine_limit}/min)")
    if rotate_by is not None:
        parts.append(f"rotate by {when(rotate_by)}")
    return ", ".join(parts) or None


COMMANDS = {"tiers": cmd_tiers, "users": cmd_users, "keys": cmd_keys}
