"""The demo's leaked key: caught, quarantined, forced into rotation, announced.

    python -m metering.dev.leak_demo --app http://127.0.0.1:8000

Needs the running worker and example app of ``scripts/demo``. It registers a
webhook pointing at a receiver of its own (which verifies every signature with
the ``standardwebhooks`` library), issues a key allowed only from 10.0.0.0/8,
uses it from there, then lets an "attacker" use it from outside its allowlist
through the app. It prints the alert, the verified webhook, and what a client
of the key now sees (Sunset, the quarantine's limit), rotates the key and
shows that the successor is clean. Exit 1 if anything does not happen.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from typing import Any

import asyncpg
import httpx
import redis.asyncio as aioredis

from metering.accounts.service import for_settings
from metering.alerts import webhooks
from metering.dev.receiver import Receiver
from metering.settings import Settings

ALLOWED, OUTSIDE = "10.1.2.3", "198.51.100.7"


async def until(check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := await check():
            return found
        await asyncio.sleep(0.25)
    return None


async def run(app: str, timeout: float) -> int:
    s = Settings.from_env()
    receiver = Receiver()
    url = await receiver.start()
    conn = await asyncpg.connect(s.database_url)
    redis = aioredis.from_url(s.redis_url)
    try:
        accounts = for_settings(s, conn, redis)
        endpoint, receiver.secret = await webhooks.add_endpoint(
            conn, url, event_types=["alert.opened"], description="demo on-call"
        )
        print(f"[leak] webhook {endpoint['id']} -> {url} (signed; the receiver verifies each one)")
        user = await accounts.create_user(
            email=f"leaky-{uuid.uuid4().hex[:6]}@example.com", tier="pro"
        )
        new, key = await accounts.create_key(
            user=user.id, name="ci-deploy", scopes=["items:read"], ip_allowlist=["10.0.0.0/8"]
        )
        print(f"[leak] {user.email} has key {key.prefix}, allowed only from 10.0.0.0/8")
        async with httpx.AsyncClient(base_url=app, timeout=10) as http:

            async def call(ip: str, secret: str = new.plaintext) -> httpx.Response:
                headers = {"X-API-Key": secret, "X-Forwarded-For": ip}
                return await http.get("/v1/items/1", headers=headers)

            owner = [(await call(ALLOWED)).status_code for _ in range(3)]
            print(f"[leak] the owner calls from {ALLOWED}: {owner}")
            stolen = [(await call(OUTSIDE)).status_code for _ in range(15)]
            print(f"[leak] the key leaks; someone calls from {OUTSIDE}: {stolen}")
            started = time.monotonic()

            async def alerted() -> asyncpg.Record | None:
                return await conn.fetchrow(
                    "SELECT id, rule, severity, action, evidence::text AS evidence, created_at "
                    "FROM key_alerts WHERE api_key_id = $1",
                    key.id,
                )

            alert = await until(alerted, timeout)
            if alert is None:
                print("[leak] no alert was raised", file=sys.stderr)
                return 1
            evidence = json.loads(alert["evidence"])
            print(
                f"[leak] caught in {time.monotonic() - started:.1f}s: alert {alert['id']} "
                f"{alert['rule']} ({alert['severity']}), action {alert['action']}; evidence "
                f"{evidence['requests_outside_allowlist']} requests from {evidence['addresses']}"
            )

            async def notified() -> bool:
                return bool(receiver.received)

            if not await until(notified, timeout):
                print("[leak] no webhook arrived", file=sys.stderr)
                return 1
            headers, payload = receiver.received[0]["headers"], receiver.received[0]["payload"]
            data = payload["data"]
            print(
                f"[leak] webhook received and verified: {payload['type']} {data['rule']} on "
                f"{data['key_prefix']}, rotate by {data['key']['rotate_by']} "
                f"(webhook-id {headers['webhook-id']}, "
                f"signature {headers['webhook-signature'][:14]}...)"
            )
            r = await call(ALLOWED)
            print(
                f"[leak] the owner's next call: {r.status_code}, Sunset: {r.headers.get('Sunset')}, "
                f"Link: {r.headers.get('Link')}, X-RateLimit-Limit: "
                f"{r.headers.get('X-RateLimit-Limit')} (quarantined)"
            )
            successor, info, _ = await accounts.rotate_key(key.prefix)
            r = await call(ALLOWED, successor.plaintext)
            print(
                f"[leak] the owner rotates: successor {info.prefix} answers {r.status_code}, "
                f"Sunset: {r.headers.get('Sunset')}; the old key stops at its deadline"
            )
        print(f"[leak] user {user.email}")
        return 0
    finally:
        await receiver.stop()
        await redis.aclose()
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m metering.dev.leak_demo", description=__doc__)
    ap.add_argument("--app", default="http://127.0.0.1:8000")
    ap.add_argument("--timeout", type=float, default=30.0)
    args = ap.parse_args(argv)
    return asyncio.run(run(args.app, args.timeout))


if __name__ == "__main__":
    sys.exit(main())
