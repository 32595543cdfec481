"""``metering alerts`` (the on-call's view of the findings) and ``metering webhooks``."""

from __future__ import annotations

import argparse
import getpass
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from metering.cli.common import Parser, positive_int, table, when, with_db, with_db_and_redis
from metering.settings import Settings

T = TypeVar("T")
STATUSES = ("open", "acknowledged", "resolved", "all")


def operator() -> str:
    """Who acted, for the alert's record: the login name."""
    try:
        return getpass.getuser()
    except Exception:  # no login name (a container without a passwd entry)
        return "operator"


def add_parsers(sub: argparse._SubParsersAction[Parser]) -> None:
    al = sub.add_parser("alerts", help="findings of the anomaly rules: list, show, ack, resolve")
    asub = al.add_subparsers(dest="action", required=True, parser_class=Parser)
    ls = asub.add_parser("list", help="newest first")
    ls.add_argument("--status", choices=STATUSES, default="open")
    ls.add_argument("--key", help="only this key (prefix or id)")
    ls.add_argument("--limit", type=positive_int, default=50)
    sh = asub.add_parser("show", help="one alert with its evidence")
    sh.add_argument("id", type=positive_int)
    ack = asub.add_parser("ack", help="acknowledge: seen; the key's quarantine is lifted")
    ack.add_argument("id", type=positive_int)
    ack.add_argument("--note")
    rs = asub.add_parser("resolve", help="close the alert")
    rs.add_argument("id", type=positive_int)
    rs.add_argument("--note")
    rs.add_argument(
        "--undo",
        action="store_true",
        help="a false alarm: lift the quarantine, cancel the forced rotation, reinstate a revoked key",
    )

    wh = sub.add_parser("webhooks", help="signed webhooks (Standard Webhooks) for alerts")
    wsub = wh.add_subparsers(dest="action", required=True, parser_class=Parser)
    add = wsub.add_parser("add", help="a new endpoint; its signing secret is shown once")
    add.add_argument("url")
    add.add_argument(
        "--event",
        action="append",
        default=[],
        help="an event type to send (repeatable; default all)",
    )
    add.add_argument("--description")
    add.add_argument(
        "--user", help="a customer's own endpoint (id or email): only their usage.threshold events"
    )
    wsub.add_parser("list", help="endpoints and their deliveries")
    test = wsub.add_parser("test", help="send a signed webhook.test now and show the answer")
    test.add_argument("id", type=positive_int)
    att = wsub.add_parser("attempts", help="the latest delivery attempts of an endpoint")
    att.add_argument("id", type=positive_int)
    att.add_argument("--limit", type=positive_int, default=20)


def run_alerts(settings: Settings, work: Callable[[Any], Awaitable[T]]) -> T:
    """``work(alerts)`` with an alerts service whose actions reach the edges' cache."""
    from metering.accounts.security import KeySecurity
    from metering.accounts.service import for_settings
    from metering.alerts.service import AlertsService

    async def go(conn: Any, redis: Any) -> T:
        service = AlertsService(
            conn,
            KeySecurity(for_settings(settings, conn, redis)),
            revoke_enabled=settings.detection_revoke,
            forced_rotation=timedelta(hours=settings.forced_rotation_hours),
            rotation_url=settings.rotation_url,
        )
        return await work(service)

    return with_db_and_redis(settings, go)


def _key_filter(settings: Settings, ref: str | None) -> uuid.UUID | None:
    if ref is None:
        return None
    from metering.accounts import store

    key = with_db(settings, lambda c: store.get_key(c, ref))
    return uuid.UUID(str(key.id))


def cmd_alerts(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "list":
        key = _key_filter(settings, args.key)
        status = None if args.status == "all" else args.status
        rows = run_alerts(settings, lambda a: a.list(status=status, key=key, limit=args.limit))
        table(
            f"Alerts ({args.status})",
            [
                "id",
                "rule",
                "severity",
                "subject",
                "user",
                "action",
                "status",
                "seen",
                "first",
                "last",
            ],
            [
                (
                    r.id,
                    r.rule,
                    r.severity,
                    r.key_prefix or r.subject,
                    r.user_email,
                    r.action,
                    r.status,
                    r.occurrences,
                    when(r.first_seen),
                    when(r.last_seen),
                )
                for r in rows
            ],
        )
        return 0
    if args.action == "show":
        alert = run_alerts(settings, lambda a: a.get(args.id))
        print(json.dumps(alert.to_dict(), indent=2))
        return 0
    by = operator()
    if args.action == "ack":
        alert = run_alerts(settings, lambda a: a.acknowledge(args.id, by=by, note=args.note))
        print(f"alert {alert.id} acknowledged by {by}; the key's quarantine is lifted")
        return 0
    alert = run_alerts(
        settings, lambda a: a.resolve(args.id, by=by, note=args.note, undo=args.undo)
    )
    undone = "; its actions are undone" if args.undo else ""
    print(f"alert {alert.id} resolved by {by}{undone}")
    return 0


def cmd_webhooks(args: argparse.Namespace, settings: Settings) -> int:
    from metering.alerts import webhooks

    if args.action == "add":

        async def add(c: Any) -> tuple[dict[str, Any], str]:
            from metering.accounts import store

            owner = None if args.user is None else (await store.get_user(c, args.user)).id
            return await webhooks.add_endpoint(
                c, args.url, event_types=args.event, description=args.description, user_id=owner
            )

        endpoint, secret = with_db(settings, add)
        whose = f" (customer {endpoint['user_id']})" if endpoint["user_id"] else ""
        print(f"webhook {endpoint['id']} -> {endpoint['url']}{whose}")
        print("Its signing secret (verify with any Standard Webhooks library); shown once:")
        print(secret)
        return 0
    if args.action == "list":
        rows = with_db(settings, webhooks.list_endpoints)
        table(
            "Webhooks",
            [
                "id",
                "url",
                "customer",
                "events",
                "active",
                "delivered",
                "pending",
                "failed",
                "created",
            ],
            [
                (
                    r["id"],
                    r["url"],
                    r["user_id"] or "operators",
                    ",".join(r["event_types"]) or "all",
                    r["active"],
                    r["delivered"],
                    r["pending"],
                    r["failed"],
                    when(r["created_at"]),
                )
                for r in rows
            ],
        )
        return 0
    if args.action == "attempts":
        rows = with_db(settings, lambda c: webhooks.attempts(c, args.id, args.limit))
        table(
            f"Webhook {args.id}: latest attempts",
            ["message", "type", "attempt", "at", "answer", "error", "ms", "status"],
            [
                (
                    r["id"],
                    r["event_type"],
                    r["attempt"],
                    when(r["attempted_at"]),
                    r["status_code"],
                    r["error"],
                    r["duration_ms"],
                    r["status"],
                )
                for r in rows
            ],
        )
        return 0
    ok, status, error = with_db(
        settings, lambda c: webhooks.send_test(c, args.id, timeout_s=settings.webhook_timeout_s)
    )
    print(f"webhook {args.id}: {'delivered' if ok else 'failed'} ({status or error})")
    return 0 if ok else 1


COMMANDS = {"alerts": cmd_alerts, "webhooks": cmd_webhooks}
