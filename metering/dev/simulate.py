"""Realistic demo traffic: a handful of users, keys and endpoints.

Users are created in PostgreSQL (``sim-user-N@example.com``, tiers in turn)
so reports can join them; key ids are stable UUIDs derived from the user.
Events go through :class:`~metering.edge.producer.UsageProducer`, like an edge.
Optional extras exercise the pipeline's guarantees: exact duplicates (a
producer retry resends the same record) and malformed records (which must
land in the dead-letter topic).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg

from metering.edge.producer import UsageProducer
from metering.events import UsageEvent

_NS = uuid.UUID("5f1d6c3e-9a57-4c1e-9a43-0d3c2b7f8e11")

# (method, endpoint, weight, units, typical latency ms)
ENDPOINTS = [
    ("GET", "/v1/search", 40, 1, 35.0),
    ("GET", "/v1/items/{id}", 25, 1, 12.0),
    ("POST", "/v1/items", 10, 1, 48.0),
    ("PUT", "/v1/items/{id}", 6, 1, 40.0),
    ("DELETE", "/v1/items/{id}", 3, 1, 20.0),
    ("POST", "/v1/batch", 6, 10, 180.0),
    ("GET", "/v1/reports/usage", 5, 5, 250.0),
    ("GET", "/health", 5, 0, 1.5),
]
STATUSES = [(200, 86), (201, 4), (400, 3), (403, 1), (404, 3), (429, 2), (500, 1)]

_EVENT_SHAPE = (
    '{"event_id": "6f1c9a52-8d3e-4f61-9a7b-2c4d5e6f7a8b", "occurred_at": "%s",'
    ' "user_id": null, "api_key_id": null, "endpoint": "/v1/x", "method": "GET",'
    ' "status_code": 200, "response_time_ms": 1, "client_ip": "%s", "schema_version": 1}'
)
BAD_RECORDS = [
    (b"not json at all", "invalid_json"),
    (b'{"event_id": "x"}', "missing_field"),
    (None, "empty_record"),
    # records that once stopped the worker for good (issue #7)
    ((_EVENT_SHAPE % ("2026-01-01T00:00:00Z", "203.0.113.1\\u0000")).encode(), "bad_value"),
    ((_EVENT_SHAPE % ("0001-01-01T00:30:00+01:00", "203.0.113.1")).encode(), "bad_value"),
]


@dataclass(frozen=True, slots=True)
class SimUser:
    id: uuid.UUID
    email: str
    tier: str
    key_ids: tuple[uuid.UUID, ...]
    client_ips: tuple[str, ...]
    weight: float


@dataclass(slots=True)
class SimReport:
    sent_valid: int = 0  # distinct valid events
    sent_duplicates: int = 0
    sent_bad: int = 0
    dropped: int = 0
    seconds: float = 0.0
    per_user: Counter[str] = field(default_factory=Counter)  # email -> distinct valid events
    per_user_day: Counter[tuple[str, str]] = field(default_factory=Counter)


async def ensure_users(conn: asyncpg.Connection, count: int) -> list[SimUser]:
    tiers = ["enterprise", "pro", "free"]  # the busiest simulated user gets the biggest tier
    users: list[SimUser] = []
    for i in range(count):
        email = f"sim-user-{i + 1}@example.com"
        tier = tiers[i % len(tiers)]
        uid = await conn.fetchval(
            """
            INSERT INTO users (email, name, tier_id)
            VALUES ($1, $2, (SELECT id FROM access_tiers WHERE name = $3))
            ON CONFLICT (lower(email)) DO UPDATE SET updated_at = now()
            RETURNING id
            """,
            email,
            f"Simulated user {i + 1}",
            tier,
        )
        keys = tuple(uuid.uuid5(_NS, f"{uid}:key:{k}") for k in range(1 + i % 2))
        ips = tuple(f"203.0.113.{(i * 7 + k) % 250 + 1}" for k in range(1 + i % 3))
        users.append(SimUser(uid, email, tier, keys, ips, weight=1.0 / (i + 1) ** 0.8))
    return users


def make_event(rng: random.Random, user: SimUser | None, now: datetime) -> UsageEvent:
    method, endpoint, _, units, typical = rng.choices(ENDPOINTS, [e[2] for e in ENDPOINTS])[0]
    status = rng.choices([s for s, _ in STATUSES], [w for _, w in STATUSES])[0]
    latency = round(rng.lognormvariate(0, 0.6) * typical, 3)
    if user is None:
        return UsageEvent.new(
            user_id=None,
            api_key_id=None,
            endpoint=endpoint,
            method=method,
            status_code=401 if rng.random() < 0.3 else status,
            response_time_ms=latency,
            client_ip=f"198.51.100.{rng.randint(1, 254)}",
            bytes_out=rng.randint(50, 400),
            units=0,
            occurred_at=now,
        )
    return UsageEvent.new(
        user_id=user.id,
        api_key_id=rng.choice(user.key_ids),
        endpoint=endpoint,
        method=method,
        status_code=status,
        response_time_ms=latency,
        client_ip=rng.choice(user.client_ips),
        bytes_out=rng.randint(200, 60_000),
        units=units,
        occurred_at=now,
    )


async def run(
    producer: UsageProducer,
    users: list[SimUser],
    *,
    events: int,
    rate: float | None = None,
    duplicate_ratio: float = 0.0,
    bad_records: int = 0,
    anonymous_ratio: float = 0.05,
    seed: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> SimReport:
    rng = random.Random(seed)
    report = SimReport()
    weights = [u.weight for u in users]
    started = time.perf_counter()
    chunk = max(1, min(500, int(rate / 20))) if rate else 500
    for i in range(events):
        now = datetime.now(UTC) - timedelta(milliseconds=rng.randint(0, 50))
        user = None if rng.random() < anonymous_ratio else rng.choices(users, weights)[0]
        event = make_event(rng, user, now)
        while not producer.emit(event):  # buffer full: wait instead of counting drops
            await asyncio.sleep(0.01)
        report.sent_valid += 1
        if user is not None:
            report.per_user[user.email] += 1
            report.per_user_day[(user.email, event.occurred_at.date().isoformat())] += 1
        if duplicate_ratio and rng.random() < duplicate_ratio:
            while not producer.emit(event):
                await asyncio.sleep(0.01)
            report.sent_duplicates += 1
        if (i + 1) % chunk == 0 or i + 1 == events:
            if progress:
                progress(min(chunk, (i % chunk) + 1))
            if rate:
                target = (i + 1) / rate
                ahead = target - (time.perf_counter() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            else:
                await asyncio.sleep(0)
    for n in range(bad_records):
        raw, _ = BAD_RECORDS[n % len(BAD_RECORDS)]
        producer.emit_raw(b"bad-record", raw)
        report.sent_bad += 1
    await producer.flush(timeout=120)
    report.dropped = producer.stats.dropped
    report.seconds = time.perf_counter() - started
    return report


# -- real HTTP through a metered edge (the example app) ------------------------

# (method, path, weight, scope needed)
HTTP_ROUTES = [
    ("GET", "/v1/search?q=shoes", 45, None),
    ("GET", "/v1/items/{id}", 30, "items:read"),
    ("POST", "/v1/items", 10, "items:write"),
    ("POST", "/v1/batch", 5, "items:write"),
    ("GET", "/public/status", 10, None),
]


@dataclass(slots=True)
class HttpReport:
    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    per_user: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0


async def issue_keys(
    conn: asyncpg.Connection, users: list[SimUser], pepper: bytes | None
) -> dict[uuid.UUID, str]:
    """One key per simulated user (kept in memory only); every other user lacks items:write."""
    from metering.accounts import AccountsService

    # New keys: nothing cached at the edge to keep in step, so no cache here.
    service = AccountsService(conn, cache=None, pepper=pepper)
    out = {}
    for i, u in enumerate(users):
        scopes = ["items:read", "items:write"] if i % 2 == 0 else ["items:read"]
        new, _ = await service.create_key(user=u.id, name="simulate", scopes=scopes)
        out[u.id] = new.plaintext
    return out


async def run_http(
    base_url: str,
    users: list[SimUser],
    user_keys: dict[uuid.UUID, str],
    *,
    requests: int,
    rate: float | None = None,
    concurrency: int = 32,
    bad_key_ratio: float = 0.02,
    seed: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> HttpReport:
    """Send realistic traffic to a metered app; client IPs go in X-Forwarded-For
    (start the app with METERING_TRUSTED_PROXIES=127.0.0.1/32)."""
    import httpx

    from metering.keys import generate

    rng = random.Random(seed)
    weights = [u.weight for u in users]
    report = HttpReport()
    queue: asyncio.Queue[tuple[str, str, dict[str, str], str | None] | None] = asyncio.Queue(
        maxsize=concurrency * 4
    )
    fake_key = generate().plaintext  # well-formed, never issued: 401
    attacker_ip = "192.0.2.66"

    async def worker(client: httpx.AsyncClient) -> None:
        while (item := await queue.get()) is not None:
            method, path, headers, email = item
            try:
                r = await client.request(method, base_url + path, headers=headers)
                report.statuses[r.status_code] += 1
            except httpx.HTTPError:
                report.statuses[0] += 1
            if email:
                report.per_user[email] += 1
            if progress:
                progress(1)

    started = time.perf_counter()
    async with httpx.AsyncClient(
        timeout=10, limits=httpx.Limits(max_connections=concurrency)
    ) as client:
        tasks = [asyncio.create_task(worker(client)) for _ in range(concurrency)]
        for i in range(requests):
            method, path, _, _ = rng.choices(HTTP_ROUTES, [r[2] for r in HTTP_ROUTES])[0]
            path = path.replace("{id}", str(rng.randint(1, 500)))
            if rng.random() < bad_key_ratio:
                headers = {"X-API-Key": fake_key, "X-Forwarded-For": attacker_ip}
                email = None
            elif path.startswith("/public"):
                headers = {"X-Forwarded-For": f"198.51.100.{rng.randint(1, 254)}"}
                email = None
            else:
                user = rng.choices(users, weights)[0]
                headers = {
                    "Authorization": f"Bearer {user_keys[user.id]}",
                    "X-Forwarded-For": rng.choice(user.client_ips),
                }
                email = user.email
            await queue.put((method, path, headers, email))
            report.sent += 1
            if rate:
                ahead = (i + 1) / rate - (time.perf_counter() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        for _ in tasks:
            await queue.put(None)
        await asyncio.gather(*tasks)
    report.seconds = time.perf_counter() - started
    return report
