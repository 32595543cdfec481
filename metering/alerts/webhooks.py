"""Signed webhooks (Standard Webhooks): endpoints, queued deliveries, the sender.

A message is queued as one ``webhook_deliveries`` row per endpoint (in the
transaction that raised it), so a crash never loses one and a replay never
sends one twice under two ids. :class:`WebhookSender` claims due rows (a
lease, ``FOR UPDATE SKIP LOCKED``: several workers share the queue), signs
each attempt with the ``standardwebhooks`` library (``webhook-id``,
``webhook-timestamp``, ``webhook-signature: v1,<HMAC-SHA256>``), records
every attempt, and retries failures with exponential backoff and jitter up
to ``max_attempts``. It runs beside the stream, never in its path.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
from standardwebhooks.webhooks import Webhook

from metering.db.connect import connection
from metering.db.queries import get
from metering.errors import InputError

log = logging.getLogger(__name__)

Q_ADD_WEBHOOK = get("add_webhook")
Q_LIST_WEBHOOKS = get("list_webhooks")
Q_WEBHOOK_BY_ID = get("webhook_by_id")
Q_ENQUEUE = get("enqueue_webhooks")
Q_CLAIM = get("claim_deliveries")
Q_RECORD_ATTEMPT = get("record_attempt")
Q_DELIVERY_ATTEMPTS = get("delivery_attempts")
Q_INSERT_DELIVERY = get("insert_delivery")

EVENT_TYPES = (
    "alert.opened", "alert.escalated", "alert.acknowledged", "alert.resolved", "webhook.test",
    "usage.threshold",
)  # fmt: skip
CUSTOMER_EVENT_TYPES = ("usage.threshold",)  # what a customer's own endpoint may receive
BACKOFF_BASE_S = 5.0
BACKOFF_CAP_S = 3600.0


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def backoff(attempt: int, rng: random.Random | None = None) -> float:
    """Seconds before attempt ``attempt + 1``: exponential, capped, with half jitter."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1))
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


def signed_headers(
    secret: str, msg_id: str, body: str, now: datetime | None = None
) -> dict[str, str]:
    when = now or datetime.now(UTC)
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, when, body),
        "user-agent": "metering-webhooks/1",
    }


async def add_endpoint(
    conn: asyncpg.Connection,
    url: str,
    *,
    event_types: list[str],
    description: str | None,
    user_id: Any = None,
) -> tuple[dict[str, Any], str]:
    """A new endpoint and its secret (shown once); ``user_id``: a customer's own
    endpoint, which receives only their usage notifications."""
    try:
        parsed = httpx.URL(url)
    except Exception:
        parsed = None
    if (
        parsed is None
        or parsed.scheme not in ("http", "https")
        or not parsed.host
        or any(c.isspace() for c in url)
    ):
        raise InputError(f"{url!r} is not an http(s) URL")
    unknown = sorted(set(event_types) - set(EVENT_TYPES))
    if unknown:
        raise InputError(
            f"unknown event type(s) {', '.join(unknown)}; known: {', '.join(EVENT_TYPES)}"
        )
    if user_id is not None:
        others = sorted(set(event_types) - set(CUSTOMER_EVENT_TYPES))
        if others:
            raise InputError(
                f"a customer's endpoint takes only {', '.join(CUSTOMER_EVENT_TYPES)}, "
                f"not {', '.join(others)}"
            )
        event_types = list(CUSTOMER_EVENT_TYPES)
    secret = new_secret()
    row = await conn.fetchrow(
        Q_ADD_WEBHOOK, url, secret, sorted(set(event_types)), description, user_id
    )
    assert row is not None
    return dict(row), secret


async def list_endpoints(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    return [dict(r) for r in await conn.fetch(Q_LIST_WEBHOOKS)]


async def attempts(
    conn: asyncpg.Connection, endpoint_id: int, limit: int = 20
) -> list[dict[str, Any]]:
    return [dict(r) for r in await conn.fetch(Q_DELIVERY_ATTEMPTS, endpoint_id, limit)]


async def send_test(
    conn: asyncpg.Connection, endpoint_id: int, *, timeout_s: float
) -> tuple[bool, int | None, str | None]:
    """Sign and send a ``webhook.test`` message to one endpoint now, recorded like
    any delivery: (delivered, HTTP status, error)."""
    endpoint = await conn.fetchrow(Q_WEBHOOK_BY_ID, endpoint_id)
    if endpoint is None:
        raise InputError(f"no webhook {endpoint_id}")
    msg_id = f"msg_test_{secrets.token_hex(8)}"
    now = datetime.now(UTC)
    body = json.dumps(
        {
            "type": "webhook.test",
            "timestamp": now.isoformat().replace("+00:00", "Z"),
            "data": {"endpoint_id": endpoint_id, "message": "a test from metering webhooks test"},
        },
        separators=(",", ":"),
    )
    await conn.execute(Q_INSERT_DELIVERY, msg_id, endpoint_id, "webhook.test", body)
    sender = WebhookSender(conn, timeout_s=timeout_s, max_attempts=1)
    try:
        ok, status, error, ms = await sender._attempt(
            {"id": msg_id, "url": endpoint["url"], "secret": endpoint["secret"], "body": body}
        )
    finally:
        await sender.close()
    await conn.execute(Q_RECORD_ATTEMPT, msg_id, 1, ok, status, error, ms, None)
    return ok, status, error


@dataclass(slots=True)
class SenderStats:
    attempts: int = 0
    delivered: int = 0
    failed_attempts: int = 0
    given_up: int = 0


class WebhookSender:
    def __init__(
        self,
        db: asyncpg.Pool | asyncpg.Connection | None,
        *,
        timeout_s: float = 10.0,
        max_attempts: int = 10,
        batch: int = 20,
    ) -> None:
        self.db = db  # may be set later, before run()
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.batch = batch
        self.stats = SenderStats()
        self._wake = asyncio.Event()
        self._client: httpx.AsyncClient | None = None

    def wake(self) -> None:
        self._wake.set()

    async def run(self, *, poll_s: float = 1.0) -> None:
        """Deliver forever (a worker task); a database outage is waited out."""
        while True:
            try:
                sent = await self.deliver_due()
            except asyncio.CancelledError:
                raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("webhook deliveries paused: %s", exc)
                sent = 0
                await asyncio.sleep(5)
            except Exception:  # never let the sender die: the next round tries again
                log.exception("webhook delivery round failed")
                sent = 0
                await asyncio.sleep(5)
            if sent == 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), poll_s)
                except TimeoutError:
                    pass

    async def deliver_due(self) -> int:
        """One round: claim what is due, send it, record the attempts."""
        lease = self.timeout_s + 30
        db = self.db
        assert db is not None
        async with connection(db) as conn:
            rows = await conn.fetch(Q_CLAIM, self.batch, lease)
        if not rows:
            return 0
        results = await asyncio.gather(*(self._attempt(r) for r in rows))
        for row, (ok, status, error, ms) in zip(rows, results, strict=True):
            attempt = row["attempts"] + 1
            delay = None if ok or attempt >= self.max_attempts else backoff(attempt)
            self.stats.attempts += 1
            if ok:
                self.stats.delivered += 1
            else:
                self.stats.failed_attempts += 1
                if delay is None:
                    self.stats.given_up += 1
                    log.warning(
                        "webhook %s to %s failed %d times; given up (%s)",
                        row["id"], row["url"], attempt, error,
                    )  # fmt: skip
            async with connection(db) as conn:
                await conn.execute(
                    Q_RECORD_ATTEMPT, row["id"], attempt, ok, status, error, ms, delay
                )
        return len(rows)

    async def _attempt(self, row: Mapping[str, Any]) -> tuple[bool, int | None, str | None, float]:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=False)
        started = time.perf_counter()
        msg_id = row["id"]
        try:  # one bound on the whole attempt (httpx's timeout is per phase)
            response = await asyncio.wait_for(
                self._client.post(
                    row["url"],
                    content=row["body"].encode(),
                    headers=signed_headers(row["secret"], msg_id, row["body"]),
                ),
                self.timeout_s,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # refused, timed out, an address httpx cannot use ...
            return False, None, f"{type(exc).__name__}: {exc}"[:500], _ms(started)
        ok = 200 <= response.status_code < 300
        return (
            ok,
            response.status_code,
            None if ok else f"HTTP {response.status_code}",
            _ms(started),
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
