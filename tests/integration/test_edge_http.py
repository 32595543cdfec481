"""The edge through real HTTP: uvicorn on loopback + httpx, real PostgreSQL,
Redis and Kafka. Each test gets its own database, Redis key prefix and
topics; client addresses come through X-Forwarded-For (the server trusts
loopback as a proxy) so per-IP limits of one test don't touch another."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from itertools import count
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil
import pytest
import uvicorn

from examples.edge_app import create_app
from metering import keys, metrics
from metering.accounts import AccountsService, IdentityCache, KeyInfo, User
from metering.accounts import store as accounts
from metering.accounts.security import KeySecurity
from metering.settings import Settings
from metering.usage.counters import DailyTotal, UsageCounters
from tests.integration.conftest import eventually, listening_socket
from tests.integration.test_worker_faults import dlq_size

PEPPER = "test-pepper"
ISSUED: list[str] = []  # every plaintext key made in this module: must never reach a log
_ips = count(1)


def next_ip() -> str:
    n = next(_ips)
    return f"198.51.{100 + n // 250}.{n % 250 + 1}"


class LogTrap(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.loggers: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
        self.loggers.add(record.name)


TRAP = LogTrap()


# Where each shared service log stood when this module began: they are
# cumulative (other sessions, earlier runs), so only what this module's tests
# appended is theirs to answer for.
LOG_START: dict[Path, int] = {}


def service_logs(settings: Settings) -> list[Path]:
    """The logs of the running broker, Redis and PostgreSQL, found from the services."""
    import redis as redis_sync

    client = redis_sync.Redis.from_url(settings.redis_url, socket_timeout=5)
    try:
        redis_log = Path(client.config_get("logfile")["logfile"])
    finally:
        client.close()
    kafka_port = int(settings.kafka_bootstrap.rsplit(":", 1)[1])
    kafka_pid = next(
        c.pid
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == kafka_port
    )
    [logs_dir] = [
        a.split("=", 1)[1]
        for a in psutil.Process(kafka_pid).cmdline()
        if a.startswith("-Dkafka.logs.dir=")
    ]
    pg_logs = sorted(Path("/var/log/postgresql").glob("postgresql-*.log"))
    assert pg_logs, "no PostgreSQL log"
    return [redis_log, Path(logs_dir) / "kafka.log", *pg_logs]


@pytest.fixture(scope="module", autouse=True)
def trap_all_logs(services: Settings):
    for path in service_logs(services):
        LOG_START[path] = path.stat().st_size if path.is_file() else 0
    root = logging.getLogger()
    old = root.level
    root.addHandler(TRAP)
    root.setLevel(logging.DEBUG)
    yield
    root.removeHandler(TRAP)
    root.setLevel(old)


@pytest.fixture
def edge_settings(kafka_settings: Settings) -> Settings:
    fields = {f: getattr(kafka_settings, f) for f in kafka_settings.__dataclass_fields__}
    return Settings(
        **{
            **fields,
            "key_pepper": PEPPER,
            "trusted_proxies": "127.0.0.1/32",
            "anonymous_per_day": 3,
            "auth_failures_per_minute": 5,
        }
    )


class Server:
    def __init__(self, settings: Settings, app: Any = None) -> None:
        self.app = app if app is not None else create_app(settings)
        self.sock = listening_socket()
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="debug",
            access_log=True,
            log_config=None,  # leave logging alone: its records reach the root trap
            proxy_headers=False,  # as documented: only METERING_TRUSTED_PROXIES decides
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self.task: asyncio.Task[None] | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    async def start(self) -> Server:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        await eventually(lambda: _started(self.server), timeout=15, what="uvicorn to start")
        return self

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await asyncio.wait_for(self.task, 15)
        self.sock.close()

    @property
    def guard(self):  # type: ignore[no-untyped-def]
        return self.app.state.edge.guard


async def _started(server: uvicorn.Server) -> bool:
    return server.started


@pytest.fixture
async def servers(edge_settings: Settings) -> AsyncIterator[Callable[..., object]]:
    running: list[Server] = []

    async def make(settings: Settings | None = None, app: Any = None) -> Server:
        s = await Server(settings or edge_settings, app).start()
        running.append(s)
        return s

    yield make
    for s in running:
        await s.stop()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as c:
        yield c


@pytest.fixture
def service(db: asyncpg.Connection, redis_client: Any, edge_settings: Settings) -> AccountsService:
    """The accounts service over the test database and the edges' cache."""
    cache = IdentityCache(redis_client, prefix=edge_settings.redis_key_prefix)
    return AccountsService(db, cache=cache, pepper=PEPPER.encode())


async def make_user(db: asyncpg.Connection, tier: str = "free") -> User:
    return await accounts.create_user(db, email=f"{uuid.uuid4().hex[:8]}@example.com", tier=tier)


async def make_key(db: asyncpg.Connection, user: User, **kw: object) -> tuple[str, KeyInfo]:
    service = AccountsService(db, cache=None, pepper=PEPPER.encode())
    new, info = await service.create_key(user=user.id, **kw)  # type: ignore[arg-type]
    ISSUED.append(new.plaintext)
    return new.plaintext, info


def hdr(key: str | None = None, ip: str | None = None, bearer: bool = False) -> dict[str, str]:
    h = {"X-Forwarded-For": ip or next_ip()}
    if key is not None:
        h["Authorization" if bearer else "X-API-Key"] = f"Bearer {key}" if bearer else key
    return h


async def test_every_status_path(servers, client, db, edge_settings, redis_client, service):
    srv = await servers()
    user = await make_user(db, "free")  # 10/min, 1000/day
    key, _info = await make_key(db, user, scopes=["items:read"])

    # 200 with consistent rate-limit headers (both header styles accepted)
    ip = next_ip()
    r = await client.get(f"{srv.url}/v1/search", headers=hdr(key, ip))
    assert r.status_code == 200
    assert r.headers["X-RateLimit-Limit"] == "10"
    assert r.headers["X-RateLimit-Remaining"] == "9"
    assert int(r.headers["X-RateLimit-Reset"]) >= int(time.time())
    assert r.headers["X-Quota-Limit"] == "1000"
    r = await client.get(f"{srv.url}/v1/items/1", headers=hdr(key, ip, bearer=True))
    assert r.status_code == 200 and r.headers["X-RateLimit-Remaining"] == "8"

    # 401s: missing, unknown (valid checksum), bad checksum, revoked, expired: one body
    bodies = []
    unknown = keys.generate().plaintext
    ISSUED.append(unknown)
    bad_checksum = key[:-1] + ("A" if key[-1] != "A" else "B")
    revoked_key, revoked = await make_key(db, user)
    await service.revoke_key(revoked.prefix, reason="test")
    expired_key, expired = await make_key(
        db, user, expires_at=datetime.now(UTC) + timedelta(hours=1)
    )
    await db.execute(
        "UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = $1", expired.id
    )
    for k in (None, unknown, bad_checksum, revoked_key, expired_key):
        r = await client.get(f"{srv.url}/v1/search", headers=hdr(k))
        assert r.status_code == 401, k
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        bodies.append(r.content)
    assert len(set(bodies)) == 1

    # 403: missing scope (named), and a key used from outside its allowlist
    r = await client.post(f"{srv.url}/v1/items", headers=hdr(key, ip))
    assert r.status_code == 403 and r.json()["detail"]["missing_scopes"] == ["items:write"]
    fenced, _ = await make_key(db, user, ip_allowlist=["10.0.0.0/8", "2001:db8::/32"])
    assert (
        await client.get(f"{srv.url}/v1/search", headers=hdr(fenced, "10.1.2.3"))
    ).status_code == 200
    assert (
        await client.get(f"{srv.url}/v1/search", headers=hdr(fenced, "2001:db8::7"))
    ).status_code == 200
    r = await client.get(f"{srv.url}/v1/search", headers=hdr(fenced, "11.1.2.3"))
    assert r.status_code == 403 and r.json()["error"] == "forbidden"

    # 429 per minute: the 10th request of the minute passes, the 11th does not
    burst_key, _ = await make_key(db, await make_user(db, "free"))
    statuses = []
    for _ in range(11):
        r = await client.get(f"{srv.url}/v1/search", headers=hdr(burst_key))
        statuses.append(r.status_code)
    assert statuses == [200] * 10 + [429]
    assert r.headers["X-RateLimit-Remaining"] == "0"
    assert 1 <= int(r.headers["Retry-After"]) <= 6  # one token every 6 s at 10/min

    # daily quota from the stream's counters: warning at 80 %, 429 at 100 %
    quota_user = await make_user(db, "free")
    quota_key, _ = await make_key(db, quota_user)
    counters = UsageCounters(redis=redis_client, prefix=edge_settings.redis_key_prefix)
    # an edge whose clock stands still: 00:00 UTC passing mid-test cannot move its day
    frozen = datetime.now(UTC)
    quota_srv = await servers(app=small_app(edge_settings, clock=lambda: frozen))
    today = frozen.date()
    await counters.publish([DailyTotal(quota_user.id, today, 800, 800, 0)])
    r = await client.get(f"{quota_srv.url}/v1/search", headers=hdr(quota_key))
    assert r.status_code == 200 and r.headers["X-Quota-Warning"].startswith("80%")
    assert r.headers["X-Quota-Remaining"] == "200"
    await counters.publish([DailyTotal(quota_user.id, today, 1000, 1000, 0, 0)])
    r = await client.get(f"{quota_srv.url}/v1/search", headers=hdr(quota_key))
    assert r.status_code == 429 and r.json()["error"] == "quota_exceeded"
    assert int(r.headers["Retry-After"]) <= 86400
    # refused for the quota, they use up no rate-limit capacity (10/min here)
    for _ in range(15):
        r = await client.get(f"{quota_srv.url}/v1/search", headers=hdr(quota_key))
        assert r.json()["error"] == "quota_exceeded"
    # requests the edge refused (401, 403, 429) do not use up the quota
    await counters.publish([DailyTotal(quota_user.id, today, 1100, 1000, 100, 101, rejected=101)])
    r = await client.get(f"{quota_srv.url}/v1/search", headers=hdr(quota_key))
    assert r.status_code == 200 and r.headers["X-Quota-Remaining"] == "1"
    assert int(r.headers["X-RateLimit-Remaining"]) >= 8  # 2 of 10 used, not 17

    # 429 after 5 failed authentications from one address, for guesses only:
    # a working key behind the same address (a shared NAT) is still served
    attacker = next_ip()
    for _ in range(5):
        assert (
            await client.get(f"{srv.url}/v1/search", headers=hdr(unknown, attacker))
        ).status_code == 401
    other_guess = keys.generate().plaintext
    ISSUED.append(other_guess)
    r = await client.get(f"{srv.url}/v1/search", headers=hdr(other_guess, attacker))
    assert r.status_code == 429 and "Retry-After" in r.headers
    assert r.json()["error"] == "too_many_requests"
    neighbour = await make_user(db, "pro")
    neighbour_key, _ = await make_key(db, neighbour)
    assert (await client.get(f"{srv.url}/v1/search", headers=hdr(neighbour_key))).status_code == 200
    r = await client.get(f"{srv.url}/v1/search", headers=hdr(neighbour_key, attacker))
    assert r.status_code == 200, r.text
    # and it stays so when its cache entry expires while guesses keep the
    # address's budget spent: it worked from here, so its miss is no guess
    neighbour_hash = (await accounts.get_key(db, neighbour_key[:16])).key_hash
    await redis_client.delete(f"{edge_settings.redis_key_prefix}:id3:{neighbour_hash}")
    r = await client.get(f"{srv.url}/v1/search", headers=hdr(neighbour_key, attacker))
    assert r.status_code == 200, r.text

    # anonymous paths: per-IP allowance (3/day in this test), then 429
    anon_ip = next_ip()
    anon = [
        (await client.get(f"{srv.url}/public/status", headers=hdr(None, anon_ip))).status_code
        for _ in range(4)
    ]
    assert anon == [200, 200, 200, 429]


async def test_rotation_grace_then_old_key_stops(servers, client, db, service, redis_client):
    srv = await servers()
    user = await make_user(db, "pro")
    old_key, old = await make_key(db, user, scopes=["items:read"])
    ip = next_ip()
    assert (await client.get(f"{srv.url}/v1/items/1", headers=hdr(old_key, ip))).status_code == 200
    new, info, old_after = await service.rotate_key(old.prefix, grace=timedelta(minutes=10))
    ISSUED.append(new.plaintext)
    assert info.scopes == ["items:read"] and info.rotated_from == old.id
    assert old_after.status == "rotating"
    for k in (old_key, new.plaintext):  # both work during the grace period
        assert (await client.get(f"{srv.url}/v1/items/1", headers=hdr(k, ip))).status_code == 200
    # The grace period ends (moved into the past rather than slept through):
    # the edge's cached entry carries rotates_at, so the old key stops by itself.
    await db.execute(
        "UPDATE api_keys SET rotates_at = now() - interval '1 second', "
        "version = nextval('api_key_versions') WHERE id = $1",
        old.id,
    )
    await IdentityCache(redis_client, prefix=srv.guard._prefix).refresh(db, [old.key_hash])

    async def old_key_refused() -> bool:
        r = await client.get(f"{srv.url}/v1/items/1", headers=hdr(old_key, ip))
        return r.status_code == 401

    await eventually(old_key_refused, timeout=10, what="the old key to stop after its grace")
    assert (
        await client.get(f"{srv.url}/v1/items/1", headers=hdr(new.plaintext, ip))
    ).status_code == 200


async def test_quarantine_and_forced_rotation_reach_the_edge(servers, client, db, service):
    """The anomaly rules' actions as a client sees them: a forced rotation
    names its deadline on every response (Sunset, RFC 8594, with a Link to
    rotate) and stops the key at it; a quarantine is the key's own, enforced
    limit until lifted; the owner's successor carries neither."""
    srv = await servers()
    user = await make_user(db, "free")  # 10 a minute per user
    key, info = await make_key(db, user, limits_mode="shadow")  # a quarantine holds anyway
    security = KeySecurity(service)
    ip = next_ip()
    r = await client.get(f"{srv.url}/v1/search", headers=hdr(key, ip))
    assert r.status_code == 200 and "Sunset" not in r.headers

    deadline = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=24)
    await security.force_rotation(str(info.id), deadline=deadline, reason="alert 1: fan_out")
    r = await client.get(f"{srv.url}/v1/search", headers=hdr(key, ip))
    assert r.status_code == 200
    assert parsedate_to_datetime(r.headers["Sunset"]) == deadline
    assert r.headers["Link"] == '</keys/rotate>; rel="sunset"'

    await security.quarantine(str(info.id), limit=3, reason="alert 2: rate_spike")
    answers = [await client.get(f"{srv.url}/v1/search", headers=hdr(key, ip)) for _ in range(5)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429, 429]
    assert answers[0].headers["X-RateLimit-Limit"] == "3"
    assert "Sunset" in answers[3].headers  # refusals say it too

    _, lifted = await security.lift_quarantine(str(info.id), reason="acknowledged")
    assert lifted
    r = await client.get(f"{srv.url}/v1/search", headers=hdr(key, ip))
    assert r.status_code == 200 and r.headers["X-RateLimit-Limit"] == "10"

    # the owner rotates: the successor works without a Sunset
    new, _, _ = await service.rotate_key(info.prefix)
    ISSUED.append(new.plaintext)
    r = await client.get(f"{srv.url}/v1/search", headers=hdr(new.plaintext, ip))
    assert r.status_code == 200 and "Sunset" not in r.headers
    # the deadline comes (an earlier one is set rather than slept through): the old key stops
    await security.force_rotation(
        str(info.id), deadline=datetime.now(UTC) + timedelta(seconds=1), reason="test"
    )
    await asyncio.sleep(1.2)
    assert (await client.get(f"{srv.url}/v1/search", headers=hdr(key, ip))).status_code == 401
    history = [e["action"] for e in await service.key_history(str(info.id))]
    assert history == [
        "created", "rotation_forced", "quarantined", "quarantine_lifted", "rotated", "rotation_forced",
    ]  # fmt: skip


async def test_a_leaked_key_and_a_credential_stuffer_through_the_edge_are_caught(
    servers, client, db, kafka_settings, edge_settings, worker_factory, service
):
    """Through real HTTP, the real edge, Kafka and the worker: a key used from
    outside its allowlist is flagged within seconds, and the owner's next
    response names the forced rotation's deadline; an address guessing keys
    is flagged too, although most of its refusals travel as summaries."""
    srv = await servers()
    worker_factory(kafka_settings)
    user = await make_user(db, "pro")
    key, info = await make_key(db, user, ip_allowlist=["10.0.0.0/8"])
    assert (
        await client.get(f"{srv.url}/v1/search", headers=hdr(key, "10.9.8.7"))
    ).status_code == 200
    started = time.time()
    thief = next_ip()
    for _ in range(12):
        r = await client.get(f"{srv.url}/v1/search", headers=hdr(key, thief))
        assert r.status_code == 403
    guesser = next_ip()
    for _ in range(130):  # 5 a minute are failures; the rest are throttled (429) and summarised
        await client.get(f"{srv.url}/v1/search", headers=hdr(keys.generate().plaintext, guesser))

    async def rules() -> set[str]:
        return {r["rule"] for r in await db.fetch("SELECT rule FROM key_alerts")}

    await eventually(
        lambda: _has(rules, {"forbidden_ip", "auth_flood"}), timeout=20, what="both alerts"
    )
    rows = {r["rule"]: r for r in await db.fetch("SELECT * FROM key_alerts")}
    assert rows["forbidden_ip"]["api_key_id"] == info.id
    assert rows["auth_flood"]["subject"] == f"net:{guesser}"
    for row in rows.values():
        assert row["created_at"].timestamp() - started <= 10, row["rule"]
    r = await client.get(f"{srv.url}/v1/search", headers=hdr(key, "10.9.8.7"))
    assert r.status_code == 200 and "Sunset" in r.headers
    assert r.headers["X-RateLimit-Limit"] == "60"  # quarantined: max(floor, its learned peak)


async def _has(found: Callable[[], Any], wanted: set[str]) -> bool:
    return wanted <= await found()


async def test_revocation_reaches_two_instances_on_their_next_request(
    servers, client, db, edge_settings
):
    a, b = await servers(), await servers()
    user = await make_user(db, "pro")
    key, info = await make_key(db, user)
    ip = next_ip()
    for srv in (a, b):  # warm both caches
        assert (await client.get(f"{srv.url}/v1/search", headers=hdr(key, ip))).status_code == 200
    env = {
        f"METERING_{f.upper()}": str(getattr(edge_settings, f))
        for f in edge_settings.__dataclass_fields__
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "metering.cli",
        "keys",
        "revoke",
        info.prefix,
        "--reason",
        "leaked",
        env={**env, "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _out, err = await proc.communicate()
    assert proc.returncode == 0, err
    # The CLI rewrote the shared cache entry before it returned: the very next
    # request on either instance is refused, however slow the machine is.
    for srv in (a, b):
        assert (await client.get(f"{srv.url}/v1/search", headers=hdr(key, ip))).status_code == 401


async def test_shadow_mode_reports_but_does_not_reject(servers, client, db):
    srv = await servers()
    user = await make_user(db, "free")
    key, _ = await make_key(db, user, limits_mode="shadow")
    ip = next_ip()
    responses = [await client.get(f"{srv.url}/v1/search", headers=hdr(key, ip)) for _ in range(12)]
    assert [r.status_code for r in responses] == [200] * 12
    assert "X-RateLimit-Shadow" not in responses[9].headers
    assert responses[10].headers["X-RateLimit-Shadow"] == "rate_limited"
    assert sum(srv.guard.stats.shadowed.values()) == 2
    assert srv.guard.stats.shadowed["rate_limited"] == 2
    # the tier can be shadowed too
    await accounts.set_tier_limits_mode(db, "free", "shadow")
    other = await make_user(db, "free")  # limits are per user: a fresh bucket
    key2, _ = await make_key(db, other)
    tier_shadowed = [
        await client.get(f"{srv.url}/v1/search", headers=hdr(key2, ip)) for _ in range(12)
    ]
    assert [r.status_code for r in tier_shadowed] == [200] * 12
    assert [r.headers.get("X-RateLimit-Shadow") for r in tier_shadowed] == [None] * 10 + [
        "rate_limited"
    ] * 2
    assert srv.guard.stats.shadowed["rate_limited"] == 4


async def test_one_round_trip_when_warm_and_coalescing(servers, client, db):
    srv = await servers()
    user = await make_user(db, "enterprise")
    key, _ = await make_key(db, user)
    ip = next_ip()
    await client.get(f"{srv.url}/v1/search", headers=hdr(key, ip))  # fills the cache
    before = srv.guard.round_trips
    assert (await client.get(f"{srv.url}/v1/search", headers=hdr(key, ip))).status_code == 200
    assert srv.guard.round_trips - before == 1
    before = srv.guard.round_trips
    results = await asyncio.gather(*(srv.guard.check(key, "203.0.113.9") for _ in range(64)))
    assert all(d.status is None for d in results)
    # 64 checks: the first goes out at once, the other 63 as one script call
    assert srv.guard.round_trips - before == 2


async def test_metrics_count_checks_rejections_and_events(servers, client, db):
    srv = await servers()
    user = await make_user(db, "free")
    key, _ = await make_key(db, user)
    ip = next_ip()
    assert (await client.get(f"{srv.url}/v1/search", headers=hdr(key, ip))).status_code == 200
    assert (await client.get(f"{srv.url}/v1/search", headers=hdr(None, ip))).status_code == 401
    assert (await client.get(f"{srv.url}/v1/items/1", headers=hdr(key, ip))).status_code == 403
    await srv.app.state.edge.producer.flush()
    r = await client.get(f"{srv.url}/metrics")  # no key needed, not metered
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "# TYPE metering_edge_checks_total counter" in r.text
    m = metrics.parse(r.text)
    assert m["metering_edge_checks_total"] == 2  # the keyless request never reaches Redis
    assert m['metering_edge_rejected_total{reason="missing_key"}'] == 1
    assert m["metering_edge_key_cache_misses_total"] == 1
    assert m["metering_edge_events_emitted_total"] == 3  # the 403 is metered too
    assert m["metering_edge_events_sent_total"] == 3
    assert m["metering_edge_events_buffered"] == 0
    assert m["metering_edge_redis_failures_total"] == 0
    # one overhead observation per metered request (the keyless 401 included)
    assert m["metering_edge_overhead_seconds_count"] == 3
    assert 0 < m["metering_edge_overhead_seconds_sum"] < 3


async def test_redis_down_fail_open_and_fail_closed(servers, client, db, edge_settings):
    user = await make_user(db, "free")
    key, _ = await make_key(db, user)
    dead = {"redis_url": "redis://127.0.0.1:1/0"}
    fields = {f: getattr(edge_settings, f) for f in edge_settings.__dataclass_fields__}
    open_srv = await servers(Settings(**{**fields, **dead, "redis_failure_mode": "open"}))
    closed_srv = await servers(Settings(**{**fields, **dead, "redis_failure_mode": "closed"}))
    logged_before = sum("Redis unavailable" in line for line in TRAP.lines)
    ip = next_ip()
    r = await client.get(f"{open_srv.url}/v1/search", headers=hdr(key, ip))
    assert r.status_code == 200 and "X-RateLimit-Limit" not in r.headers
    bogus = keys.generate().plaintext
    ISSUED.append(bogus)
    assert (
        await client.get(f"{open_srv.url}/v1/search", headers=hdr(bogus, ip))
    ).status_code == 401
    assert open_srv.guard.stats.redis_failures == 2
    # the allowlist reads an IPv4-mapped IPv6 client as its IPv4 address, as the
    # script does when Redis is up
    fenced, _ = await make_key(db, user, ip_allowlist=["198.51.100.0/24"])
    mapped = hdr(fenced, "::ffff:198.51.100.77")
    assert (await client.get(f"{open_srv.url}/v1/search", headers=mapped)).status_code == 200
    outside = hdr(fenced, "::ffff:192.0.2.77")
    assert (await client.get(f"{open_srv.url}/v1/search", headers=outside)).status_code == 403
    r = await client.get(f"{closed_srv.url}/v1/search", headers=hdr(key, ip))
    assert r.status_code == 503 and r.headers["Retry-After"] == "5"
    # one warning per edge per interval, not one per request
    assert sum("Redis unavailable" in line for line in TRAP.lines) - logged_before == 2
    up = await servers()
    assert (await client.get(f"{up.url}/v1/search", headers=mapped)).status_code == 200


async def test_with_redis_away_the_limits_hold_in_process(servers, client, db, edge_settings):
    """Fail-open keeps serving, but not as an open door: per-minute limits,
    the failed-auth throttle and the anonymous allowance hold per process
    (divided by METERING_EDGE_INSTANCES), and a key is looked up once."""
    fields = {f: getattr(edge_settings, f) for f in edge_settings.__dataclass_fields__}
    away = {"redis_url": "redis://127.0.0.1:1/0", "redis_failure_mode": "open"}
    srv = await servers(Settings(**{**fields, **away}))
    two = await servers(Settings(**{**fields, **away, "edge_instances": 2}))
    user = await make_user(db, "free")  # 10 a minute
    key, _ = await make_key(db, user)
    ip = next_ip()
    statuses = [
        (await client.get(f"{srv.url}/v1/search", headers=hdr(key, ip))).status_code
        for _ in range(11)
    ]
    assert statuses == [200] * 10 + [429]
    assert srv.guard.lookups == 1  # the identity is cached in the process meanwhile
    other = await make_user(db, "free")
    other_key, _ = await make_key(db, other)
    statuses = [
        (await client.get(f"{two.url}/v1/search", headers=hdr(other_key, ip))).status_code
        for _ in range(6)
    ]
    assert statuses == [200] * 5 + [429]  # one of two instances: half the limit
    attacker = next_ip()
    guesses = [keys.generate().plaintext for _ in range(7)]
    ISSUED.extend(guesses)
    statuses = [
        (await client.get(f"{srv.url}/v1/search", headers=hdr(g, attacker))).status_code
        for g in guesses
    ]
    assert statuses == [401] * 5 + [429] * 2
    assert srv.guard.lookups == 1 + 5  # guesses beyond the budget cost no lookup
    anon_ip = next_ip()
    anon = [
        (await client.get(f"{srv.url}/public/status", headers=hdr(None, anon_ip))).status_code
        for _ in range(4)
    ]
    assert anon == [200, 200, 200, 429]
    # concurrent first requests of one working key share one lookup and one
    # failure slot (with 4 instances the budget is 1 a minute per process)
    four = await servers(Settings(**{**fields, **away, "edge_instances": 4}))
    big = await make_user(db, "enterprise")
    big_key, _ = await make_key(db, big)
    burst = await asyncio.gather(
        *(client.get(f"{four.url}/v1/search", headers=hdr(big_key, ip)) for _ in range(6))
    )
    assert [r.status_code for r in burst] == [200] * 6
    assert four.guard.lookups == 1


async def test_database_down_cached_keys_work_uncached_get_503(servers, client, db, edge_settings):
    user = await make_user(db, "pro")
    warm_key, _ = await make_key(db, user)
    cold_key, _ = await make_key(db, user)
    ip = next_ip()
    good = await servers()
    assert (await client.get(f"{good.url}/v1/search", headers=hdr(warm_key, ip))).status_code == 200
    fields = {f: getattr(edge_settings, f) for f in edge_settings.__dataclass_fields__}
    no_db = await servers(
        Settings(**{**fields, "database_url": "postgresql://metering:metering@127.0.0.1:1/none"})
    )
    # the identity is in Redis: no database needed
    assert (
        await client.get(f"{no_db.url}/v1/search", headers=hdr(warm_key, ip))
    ).status_code == 200
    logged_before = sum("PostgreSQL unavailable" in line for line in TRAP.lines)
    for _ in range(10):
        r = await client.get(f"{no_db.url}/v1/search", headers=hdr(cold_key, ip))
        assert r.status_code == 503 and r.headers["Retry-After"] == "5"
    # one line per interval with a count, not one per request
    assert sum("PostgreSQL unavailable" in line for line in TRAP.lines) - logged_before == 1
    assert no_db.guard.stats.db_failures == 10
    # a lookup that could not be made is no failed authentication: the slot its
    # miss reserved is given back, so working keys are not throttled afterwards
    cold_keys = [(await make_key(db, user))[0] for _ in range(8)]
    for k in cold_keys:
        r = await client.get(f"{no_db.url}/v1/search", headers=hdr(k, ip))
        assert r.status_code == 503, r.text

    async def reachable() -> bool:  # the given-back slots land in the background
        r = await client.get(f"{good.url}/v1/search", headers=hdr(cold_keys[-1], ip))
        return r.status_code == 200

    await eventually(reachable, timeout=5, what="the database's keys to work again")


async def test_events_for_every_request_land_in_usage_logs(
    servers, client, db, kafka_settings, edge_settings, worker_factory
):
    flush_s = 1.0
    srv = await servers(replace(edge_settings, last_used_flush_s=flush_s))
    user = await make_user(db, "free")
    key, info = await make_key(db, user, scopes=["items:read"])
    ip = next_ip()
    first_request_at = await db.fetchval("SELECT now()")
    expected = {200: 0, 401: 0, 403: 0}
    for path, k, status in [
        ("/v1/search", key, 200),
        ("/v1/items/5", key, 200),
        ("/v1/search", None, 401),
        ("/v1/search", keys.generate().plaintext, 401),
    ]:
        r = await client.get(f"{srv.url}{path}", headers=hdr(k, ip))
        assert r.status_code == status
        expected[status] += 1
    r = await client.post(f"{srv.url}/v1/items", headers=hdr(key, ip))
    assert r.status_code == 403
    expected[403] += 1
    # a NUL in the raw path (no route matches) still makes a valid event, not a dead letter
    r = await client.get(f"{srv.url}/v1/%00nul", headers=hdr(key, ip))
    assert r.status_code == 404
    expected[404] = 1
    # the app weights /v1/batch at 10 units (request.state.metering_units)
    wkey, winfo = await make_key(db, user, scopes=["items:write"])
    r = await client.post(f"{srv.url}/v1/batch", headers=hdr(wkey, ip))
    assert r.status_code == 200
    expected[200] += 1
    last_request_at = await db.fetchval("SELECT clock_timestamp()")

    # last_used_at is written by the edge's own batch, within the flush interval
    async def last_used() -> bool:
        return (
            await db.fetchval("SELECT last_used_at FROM api_keys WHERE id = $1", info.id)
        ) is not None

    await eventually(last_used, timeout=flush_s + 5, what="last_used_at to be written")
    used_at = await db.fetchval("SELECT last_used_at FROM api_keys WHERE id = $1", info.id)
    assert first_request_at <= used_at <= last_request_at + timedelta(seconds=flush_s + 5)
    await srv.app.state.edge.producer.flush(timeout=10)

    worker_factory(kafka_settings)

    async def landed() -> bool:
        return await db.fetchval("SELECT count(*) FROM usage_logs") == sum(expected.values())

    await eventually(landed, timeout=60, what="the edge's events in usage_logs")
    rows = await db.fetch(
        "SELECT status_code, user_id, api_key_id, endpoint, units, rejected,"
        " host(client_ip) AS ip FROM usage_logs"
    )
    by_status: dict[int, int] = {}
    for row in rows:
        by_status[row["status_code"]] = by_status.get(row["status_code"], 0) + 1
        assert row["ip"] == ip
        if row["status_code"] == 401:
            assert row["user_id"] is None and row["api_key_id"] is None
        elif row["endpoint"] == "/v1/batch":
            assert row["api_key_id"] == winfo.id and row["user_id"] == user.id
        else:
            assert row["user_id"] == user.id and row["api_key_id"] == info.id
        # served requests carry their weight; rejected ones bill nothing
        want_units = 0 if row["rejected"] else 10 if row["endpoint"] == "/v1/batch" else 1
        assert row["units"] == want_units, dict(row)
        # and say why they were refused
        want_rejected = {401: {"missing_key", "unauthorized"}, 403: {"missing_scope"}}
        if row["status_code"] in want_rejected:
            assert row["rejected"] in want_rejected[row["status_code"]], dict(row)
        else:
            assert row["rejected"] is None, dict(row)
    assert by_status == expected
    assert {r["endpoint"] for r in rows} >= {
        "/v1/search",
        "/v1/items/{item_id}",
        "/v1/items",
        "/v1/%00nul",
    }
    assert await dlq_size(kafka_settings) == 0


async def test_a_leaked_allowlisted_key_cannot_burn_its_owners_quota(
    servers, client, db, kafka_settings, edge_settings, worker_factory, service
):
    """30 requests from outside the key's allowlist: 403 until the key's per-minute
    limit, then 429; the worker records them as refused, and the owner's other
    key still has its whole daily quota."""
    await service.create_tier(name="tiny", daily_quota=20, rate_limit_per_minute=10)
    srv = await servers()
    user = await make_user(db, "tiny")
    leaked, _ = await make_key(db, user, ip_allowlist=["10.0.0.0/8"])
    other, _ = await make_key(db, user)
    attacker = next_ip()
    statuses = [
        (await client.get(f"{srv.url}/v1/search", headers=hdr(leaked, attacker))).status_code
        for _ in range(30)
    ]
    assert statuses == [403] * 10 + [429] * 20
    await srv.stop()  # sends the summary of the refused requests beyond the first 10
    worker_factory(kafka_settings)

    async def counted() -> bool:
        n = await db.fetchval("SELECT request_count FROM daily_usage WHERE user_id = $1", user.id)
        return n == 30

    await eventually(counted, timeout=60, what="the 30 refused requests in daily_usage")
    row = await db.fetchrow(
        "SELECT request_count, rejected_count, units FROM daily_usage WHERE user_id = $1", user.id
    )
    assert (row["rejected_count"], row["units"]) == (30, 0)  # recorded, nothing billable
    reasons = await db.fetch(
        "SELECT rejected, sum(request_count) FROM usage_logs WHERE user_id = $1"
        " GROUP BY 1 ORDER BY 1",
        user.id,
    )
    assert [(r[0], r[1]) for r in reasons] == [("forbidden_ip", 10), ("forbidden_throttled", 20)]
    # 10 records of their own, then one summary: a flood costs no row per request
    assert await db.fetchval("SELECT count(*) FROM usage_logs WHERE user_id = $1", user.id) == 11

    srv = await servers()

    async def counters_current() -> bool:  # the worker published the day's totals to Redis
        return (
            await srv.app.state.edge._redis.hget(
                f"{edge_settings.redis_key_prefix}:usage:{user.id}:{datetime.now(UTC).date()}",
                "requests",
            )
        ) == b"30"

    await eventually(counters_current, timeout=30, what="the Redis counter")
    r = await client.get(f"{srv.url}/v1/search", headers=hdr(other, next_ip()))
    assert r.status_code == 200, r.text
    assert r.headers["X-Quota-Remaining"] == "20"


async def test_ipv6_clients_share_their_throttles_per_64(servers, client):
    srv = await servers()
    guesses = [keys.generate().plaintext for _ in range(7)]
    ISSUED.extend(guesses)
    for i in range(5):  # five addresses of one /64
        r = await client.get(
            f"{srv.url}/v1/search", headers=hdr(guesses[i], f"2001:db8:7:1::{i + 1}")
        )
        assert r.status_code == 401
    r = await client.get(f"{srv.url}/v1/search", headers=hdr(guesses[5], "2001:db8:7:1:ffff::9"))
    assert r.status_code == 429  # the /64's budget is spent
    r = await client.get(f"{srv.url}/v1/search", headers=hdr(guesses[6], "2001:db8:7:2::1"))
    assert r.status_code == 401  # the next /64 has its own
    # the anonymous allowance (3 a day in these tests) is per /64 as well
    anon = [
        (
            await client.get(f"{srv.url}/public/status", headers=hdr(None, f"2001:db8:8:1::{i}"))
        ).status_code
        for i in range(1, 5)
    ]
    assert anon == [200, 200, 200, 429]


async def test_a_burst_of_unknown_keys_costs_at_most_the_budget_in_lookups(servers, client, db):
    srv = await servers()
    ip = next_ip()
    guesses = [keys.generate().plaintext for _ in range(60)]
    ISSUED.extend(guesses)
    responses = await asyncio.gather(
        *(client.get(f"{srv.url}/v1/search", headers=hdr(g, ip)) for g in guesses)
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [401] * 5 + [429] * 55
    assert srv.guard.lookups == 5  # auth_failures_per_minute: reserved before looking up
    # 20 requests with one uncached working key at once: one lookup between them,
    # and the slots their misses reserved are given back (the key works)
    user = await make_user(db, "pro")
    key, _ = await make_key(db, user)
    shared = next_ip()
    responses = await asyncio.gather(
        *(client.get(f"{srv.url}/v1/search", headers=hdr(key, shared)) for _ in range(20))
    )
    assert [r.status_code for r in responses] == [200] * 20
    assert srv.guard.lookups == 6
    for _ in range(5):  # the shared address still has its whole failure budget
        r = await client.get(f"{srv.url}/v1/search", headers=hdr(keys.generate().plaintext, shared))
        assert r.status_code == 401


async def test_forwarded_addresses_with_ports_and_whole_path_segments(servers, client, db):
    srv = await servers()
    user = await make_user(db, "pro")
    key, _ = await make_key(db, user, ip_allowlist=["198.51.100.9/32", "2001:db8:9::5/128"])
    for forwarded in ("198.51.100.9:51234", "[2001:db8:9::5]:443", "[2001:db8:9::5]"):
        r = await client.get(f"{srv.url}/v1/search", headers=hdr(key, forwarded))
        assert r.status_code == 200, (forwarded, r.status_code)
    # not an address in any form: the proxy's own address is used (outside the allowlist)
    r = await client.get(f"{srv.url}/v1/search", headers=hdr(key, "198.51.100.9:port"))
    assert r.status_code == 403
    # exempt "/health" and anonymous "/public" cover whole segments only
    assert (await client.get(f"{srv.url}/health")).status_code == 200
    for path in ("/healthcare/records", "/publicity"):
        r = await client.get(f"{srv.url}{path}", headers=hdr(None))
        assert r.status_code == 401, path


async def test_a_cached_entry_this_release_cannot_read_is_never_a_500(
    servers, client, db, redis_client, edge_settings
):
    from metering.accounts.cache import entry_key

    srv = await servers()
    user = await make_user(db, "pro")
    key, info = await make_key(db, user)
    ip = next_ip()
    assert (await client.get(f"{srv.url}/v1/search", headers=hdr(key, ip))).status_code == 200
    name = entry_key(edge_settings.redis_key_prefix, info.key_hash)
    entry = json.loads(await redis_client.get(name))
    entry["added_by_a_later_release"] = 1  # same format name, fields this edge does not know
    await redis_client.set(name, json.dumps(entry), ex=60)
    r = await client.get(f"{srv.url}/v1/search", headers=hdr(key, ip))
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert (await client.get(f"{srv.url}/v1/search", headers=hdr(key, ip))).status_code == 200


async def test_forwarded_for_is_ignored_unless_the_proxy_is_trusted(
    servers, client, db, edge_settings
):
    """Run as documented (uvicorn without proxy headers), an empty
    METERING_TRUSTED_PROXIES means the header decides nothing."""
    srv = await servers(replace(edge_settings, trusted_proxies=""))
    user = await make_user(db, "pro")
    key, _ = await make_key(db, user, ip_allowlist=["198.51.100.50/32"])
    r = await client.get(f"{srv.url}/v1/search", headers=hdr(key, "198.51.100.50"))
    assert r.status_code == 403  # the client is 127.0.0.1, whatever it claims


async def test_limits_are_per_user_and_survive_rotation(servers, client, db, service):
    srv = await servers()
    user = await make_user(db, "free")  # 10 a minute, per user
    a, _ = await make_key(db, user)
    b, _ = await make_key(db, user)
    ip = next_ip()
    statuses = [
        (await client.get(f"{srv.url}/v1/search", headers=hdr(k, ip))).status_code
        for k in [a] * 6 + [b] * 5
    ]
    assert statuses == [200] * 10 + [429]  # two keys, one budget
    # a tier may give each key its own budget; a rotation's successor inherits it
    await service.create_tier(
        name="perkey", daily_quota=None, rate_limit_per_minute=3, rate_limit_scope="key"
    )
    owner = await make_user(db, "perkey")
    c, c_info = await make_key(db, owner)
    d, _ = await make_key(db, owner)
    assert [
        (await client.get(f"{srv.url}/v1/search", headers=hdr(c, ip))).status_code for _ in range(4)
    ] == [200, 200, 200, 429]
    assert (await client.get(f"{srv.url}/v1/search", headers=hdr(d, ip))).status_code == 200
    new, _, _ = await service.rotate_key(c_info.prefix)
    ISSUED.append(new.plaintext)
    r = await client.get(f"{srv.url}/v1/search", headers=hdr(new.plaintext, ip))
    assert r.status_code == 429  # rotating does not reset the limit


async def test_a_keyless_flood_becomes_a_few_records_and_a_summary(
    servers, client, db, kafka_settings, worker_factory
):
    """50 keyless requests from one client: the first 10 of its minute are
    records of their own, the rest one summary record with their count."""
    srv = await servers()
    flooder, other = next_ip(), next_ip()
    for _ in range(50):
        assert (
            await client.get(f"{srv.url}/v1/search", headers=hdr(None, flooder))
        ).status_code == 401
    for _ in range(3):
        assert (
            await client.get(f"{srv.url}/v1/search", headers=hdr(None, other))
        ).status_code == 401
    producer = srv.app.state.edge.producer
    assert producer.stats.summarised >= 30  # 40, unless a minute ended mid-flood
    await srv.stop()  # the summaries of the minute in progress go out at shutdown
    worker_factory(kafka_settings)

    async def landed() -> bool:
        n = await db.fetchval("SELECT coalesce(sum(request_count), 0) FROM usage_logs")
        return n == 53

    await eventually(landed, timeout=60, what="53 requests in usage_logs")
    rows = await db.fetch(
        "SELECT host(client_ip) AS ip, request_count, rejected, units FROM usage_logs"
    )
    mine = [r for r in rows if r["ip"] == flooder]
    assert 11 <= len(mine) <= 22  # 10 records + a summary per minute it spanned
    assert sum(r["request_count"] for r in mine) == 50
    assert all(r["rejected"] == "missing_key" and r["units"] == 0 for r in mine)
    assert sorted(r["request_count"] for r in rows if r["ip"] == other) == [1, 1, 1]


def run_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        f"METERING_{f.upper()}": str(getattr(settings, f)) for f in settings.__dataclass_fields__
    }
    return subprocess.run(
        [sys.executable, "-m", "metering.cli", *args],
        env={**env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_key_and_user_lifecycle_through_the_cli_reaches_the_edge(
    servers, client, db, edge_settings
):
    """Every change an operator makes reaches a warm edge on its next request,
    and every key action leaves exactly one audit row."""
    srv = await servers()
    user = await make_user(db, "free")  # 10 per minute
    key, info = await make_key(db, user)
    ip = next_ip()

    async def status() -> int:
        return (await client.get(f"{srv.url}/v1/search", headers=hdr(key, ip))).status_code

    def cli(*args: str) -> None:
        out = run_cli(edge_settings, *args)
        assert out.returncode == 0, out.stderr

    assert await status() == 200  # the cache is warm from here on
    cli("users", "suspend", user.email)
    assert await status() == 401
    cli("users", "activate", user.email)
    assert await status() == 200
    cli("users", "set-tier", user.email, "pro")  # 100 per minute
    answers = [await client.get(f"{srv.url}/v1/search", headers=hdr(key, ip)) for _ in range(15)]
    assert [r.status_code for r in answers] == [200] * 15  # 17 in a minute: over free's 10
    assert answers[-1].headers["X-RateLimit-Limit"] == "100"
    cli("keys", "delete", info.prefix)
    assert await status() == 401

    other, other_info = await make_key(db, user)
    cli("keys", "rotate", other_info.prefix, "--grace", "1h")
    cli("keys", "revoke", other_info.prefix, "--reason", "leaked in a CI log")
    assert (await client.get(f"{srv.url}/v1/search", headers=hdr(other, ip))).status_code == 401
    rows = await db.fetch(
        "SELECT api_key_id, action FROM api_key_events WHERE api_key_id = ANY($1::uuid[])"
        " ORDER BY id",
        [info.id, other_info.id],
    )
    assert [(r["api_key_id"], r["action"]) for r in rows] == [
        (info.id, "created"),
        (info.id, "deleted"),
        (other_info.id, "created"),
        (other_info.id, "rotated"),
        (other_info.id, "revoked"),
    ]


@pytest.mark.parametrize(
    "args",
    [
        ("users", "suspend", "nobody@example.com"),
        ("users", "set-tier", "nobody@example.com", "pro"),
        ("keys", "delete", "mk_live_ZZZZZZZZ"),
        ("keys", "revoke", "mk_live_ZZZZZZZZ", "--reason", "x"),
        ("keys", "rotate", "mk_live_ZZZZZZZZ", "--grace", "banana"),
        ("keys", "create", "nobody@example.com", "--allow-ip", "not-a-cidr"),
        ("tiers", "set-mode", "no-such-tier", "shadow"),
    ],
)
async def test_bad_lifecycle_input_is_one_line_and_exit_2(edge_settings, args):
    out = run_cli(edge_settings, *args)
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("metering")
    assert "Traceback" not in out.stderr


def small_app(
    settings: Settings,
    *,
    allow_query_key: bool = False,
    clock: Callable[[], datetime] | None = None,
) -> Any:
    """The smallest metered app, with the options the example app does not take."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    from metering.edge import MeteringEdge, MeteringMiddleware

    edge = MeteringEdge(settings, clock=clock)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with edge:
            yield

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(
        MeteringMiddleware,
        guard=edge.guard,
        producer=edge.producer,
        allow_query_key=allow_query_key,
        trusted_proxies=["127.0.0.1/32"],
    )
    app.state.edge = edge

    @app.get("/v1/search")
    async def search() -> dict[str, str]:
        return {"ok": "yes"}

    return app


async def test_a_key_in_the_query_string_only_where_the_app_allows_it(
    servers, client, db, edge_settings
):
    default = await servers()
    opted_in = await servers(app=small_app(edge_settings, allow_query_key=True))
    user = await make_user(db, "pro")
    key, _ = await make_key(db, user)
    ip = next_ip()
    headers = {"X-Forwarded-For": ip}
    # A key in a URL lands in every access log on its way (why it is off by
    # default): uvicorn's and the test client's are silenced for these calls
    # only (uvicorn's access_log=False is process-wide), not the edge's own.
    quiet = [logging.getLogger(name) for name in ("uvicorn.access", "httpx", "httpcore")]
    for lg in quiet:
        lg.disabled = True
    try:
        r = await client.get(f"{opted_in.url}/v1/search", params={"api_key": key}, headers=headers)
        assert r.status_code == 200 and r.headers["X-RateLimit-Limit"] == "100"
        r = await client.get(f"{default.url}/v1/search", params={"api_key": key}, headers=headers)
        assert r.status_code == 401  # query strings end up in access logs: off by default
    finally:
        for lg in quiet:
            lg.disabled = False


async def test_simulate_sends_real_http_through_the_edge(servers, db, edge_settings):
    srv = await servers()
    checks_before = srv.guard.stats.checks
    env = {
        f"METERING_{f.upper()}": str(getattr(edge_settings, f))
        for f in edge_settings.__dataclass_fields__
    }
    proc = await asyncio.create_subprocess_exec(  # async: the edge runs in this loop
        sys.executable,
        "-m",
        "metering.cli",
        "simulate",
        "--http",
        srv.url,
        "--users",
        "2",
        "--events",
        "40",
        "--seed",
        "3",
        env={**env, "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    assert f"sent 40 requests to {srv.url}" in out.decode()
    assert srv.guard.stats.checks - checks_before >= 40  # they really went through the edge
    users = await db.fetch("SELECT id FROM users WHERE email LIKE 'sim-user-%'")
    assert len(users) == 2
    assert (
        await db.fetchval(
            "SELECT count(*) FROM api_keys WHERE user_id = ANY($1::uuid[])",
            [u["id"] for u in users],
        )
        >= 2
    )


async def test_the_daily_quota_turns_over_at_utc_midnight_at_a_months_end(
    servers, client, db, edge_settings, redis_client
):
    """The edge's clock injected at 23:59:30 UTC on the last day of a month:
    a spent quota says when it resets, and it has reset at 00:00:05."""
    now = [datetime(2027, 1, 31, 23, 59, 30, tzinfo=UTC)]
    srv = await servers(app=small_app(edge_settings, clock=lambda: now[0]))
    user = await make_user(db, "free")  # 1000 a day
    key, _ = await make_key(db, user)
    counters = UsageCounters(redis=redis_client, prefix=edge_settings.redis_key_prefix)
    await counters.publish([DailyTotal(user.id, now[0].date(), 1000, 1000, 0)])
    ip = next_ip()
    r = await client.get(f"{srv.url}/v1/search", headers=hdr(key, ip))
    assert r.status_code == 429 and r.json()["error"] == "quota_exceeded"
    assert r.headers["Retry-After"] == "31"  # 30 s to midnight, rounded up
    now[0] = datetime(2027, 2, 1, 0, 0, 5, tzinfo=UTC)
    r = await client.get(f"{srv.url}/v1/search", headers=hdr(key, ip))
    assert r.status_code == 200 and r.headers["X-Quota-Remaining"] == "1000"


# Keep this last in the module: it reads every log the tests above wrote.
def log_files(basetemp: Path) -> dict[str, str]:
    """The workers' logs, whole, and what this module appended to the service logs."""
    out: dict[str, str] = {}
    workers = sorted(basetemp.rglob("worker-*.log"))
    assert workers, "no worker log"
    for path in workers:
        text = path.read_text(errors="replace")
        assert text.strip(), f"log {path} is empty"
        out[str(path)] = text
    assert LOG_START, "the service logs were not located when the module began"
    for path, start in LOG_START.items():
        assert path.is_absolute() and path.is_file() and path.stat().st_size, f"no log {path}"
        with path.open("rb") as f:
            f.seek(start if path.stat().st_size >= start else 0)  # rotated: all of it
            out[f"{path} (from byte {start})"] = f.read().decode(errors="replace")
    return out


async def test_no_plaintext_key_in_any_log(tmp_path_factory):
    """Runs last in this module: every log line captured in-process (uvicorn
    access and error logs, metering, faust), the workers' logs and the logs of
    the running broker, Redis and PostgreSQL (what the module appended) must
    be free of keys. Each source must exist and hold something: a missing
    log proves nothing."""
    assert ISSUED, "the tests above issued keys"
    assert TRAP.lines, "nothing was logged in-process"
    sources: dict[str, str] = {"in-process": "\n".join(TRAP.lines)}
    assert {"uvicorn.access", "uvicorn.error", "metering.edge.middleware"} <= TRAP.loggers, (
        TRAP.loggers
    )
    sources.update(log_files(Path(tmp_path_factory.getbasetemp())))
    for name, text in sources.items():
        for key in ISSUED:
            assert key not in text, f"a key in {name}"
        assert not keys.KEY_PATTERN.search(text), f"something key-shaped in {name}"
