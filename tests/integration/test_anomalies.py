"""Anomaly detection through the real stack: events on Kafka, the real worker,
alerts in PostgreSQL, actions on the keys, signed webhooks to a real local
HTTP receiver that verifies them with the standardwebhooks library.

The keys' baselines are learned from hours of history (event time), then
normal traffic and one attack per rule arrive "now".
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import re
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from metering.accounts.service import AccountsService, for_settings
from metering.alerts import webhooks
from metering.dev.receiver import Receiver
from metering.dev.scenario import ATTACKS, NORMAL, Actor, actor, attack, traffic
from metering.events import UsageEvent
from metering.settings import Settings
from tests.integration.conftest import eventually

HISTORY_H = 4
WARMUP = '{"warmup_minutes": 180}'  # the rules' default is a day; hours of history suffice here


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    yield r
    await r.stop()


@pytest.fixture
async def accounts(
    kafka_settings: Settings, db: asyncpg.Connection
) -> AsyncIterator[AccountsService]:
    client = aioredis.from_url(kafka_settings.redis_url, socket_timeout=5)
    yield for_settings(kafka_settings, db, client)
    await client.aclose()


async def make_actors(accounts: AccountsService, kinds: list[str]) -> list[Actor]:
    out = []
    tier = f"t{uuid.uuid4().hex[:8]}"
    await accounts.create_tier(name=tier, daily_quota=None, rate_limit_per_minute=100_000)
    for i, kind in enumerate(kinds):
        user = await accounts.create_user(
            email=f"{kind}-{i}-{uuid.uuid4().hex[:6]}@example.com", tier=tier
        )
        allow = ["10.0.0.0/8"] if kind == "forbidden_ip" else None
        _, key = await accounts.create_key(user=user.id, name=kind, ip_allowlist=allow)
        out.append(actor(f"{kind}-{i}", kind, user.id, key.id, i))
    return out


async def publish(
    s: Settings, events: list[UsageEvent], partition: dict[uuid.UUID, int] | None = None
) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=s.kafka_bootstrap, linger_ms=20, max_batch_size=256_000
    )
    await producer.start()
    try:
        pending = []
        for e in events:
            p = None if partition is None or e.user_id is None else partition.get(e.user_id)
            pending.append(
                await producer.send(s.events_topic, e.to_json(), key=e.partition_key, partition=p)
            )
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def metric(worker, name: str) -> float:
    try:
        return (await worker.metrics()).get(name, 0.0)
    except (OSError, TimeoutError):
        return -1.0


async def alerts(db: asyncpg.Connection) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT a.*, k.name AS key_name FROM key_alerts a LEFT JOIN api_keys k ON k.id = a.api_key_id ORDER BY a.id"
    )


def history(actors: list[Actor], now: float, rng: random.Random) -> list[UsageEvent]:
    """Hours of normal use (attack keys too: they were someone's working keys)."""
    start = now - HISTORY_H * 3600
    for_history = [
        dataclasses.replace(a, kind="steady") if a.kind in ATTACKS else a for a in actors
    ]
    return traffic(for_history, start, now - 90, rng, burst_from=start + 1800)


async def test_every_attack_is_flagged_with_its_action_and_normal_traffic_is_not(
    kafka_settings: Settings,
    db: asyncpg.Connection,
    accounts: AccountsService,
    worker_factory,
    receiver: Receiver,
) -> None:
    s = kafka_settings
    rng = random.Random(11)
    cast = await make_actors(accounts, [*NORMAL, *ATTACKS])
    by_kind = {a.kind: a for a in cast}
    url = await receiver.start()
    _, receiver.secret = await webhooks.add_endpoint(db, url, event_types=[], description="on-call")
    # rotated normally, and rotated after a leak: both in their grace period
    for kind in ("rotating", "grace_new_address"):
        await accounts.rotate_key(str(by_kind[kind].key_id))
    now = time.time()
    past = history(cast, now, rng)
    await publish(s, past)
    worker = worker_factory(dataclasses.replace(s, detection_rules=WARMUP))

    async def learned() -> bool:
        worker.assert_running()
        return await metric(worker, "metering_detection_events_total") >= len(past)

    await eventually(learned, timeout=90, what="the history to be consumed")
    assert await alerts(db) == [], "history raised alerts"

    # now: a minute of normal traffic (the batch job bursting) and the attacks
    live_start = time.time()
    normal = traffic(
        [a for a in cast if a.kind in NORMAL],
        live_start - 60,
        live_start,
        rng,
        burst_from=live_start - 60,
    )
    await publish(s, normal)
    started: dict[str, float] = {}
    for a in cast:
        if a.kind in ATTACKS:
            started[a.kind] = time.time()
            await publish(s, attack(a, time.time(), rng))

    async def all_flagged() -> bool:
        worker.assert_running()
        return {r["rule"] for r in await alerts(db)} >= set(ATTACKS)

    await eventually(all_flagged, timeout=30, what="an alert for every attack")
    rows = await alerts(db)
    latency = {r["rule"]: r["created_at"].timestamp() - started[r["rule"]] for r in rows}
    assert all(v <= 10 for v in latency.values()), latency
    # exactly one alert per attacked subject and rule, none for normal keys
    assert sorted(r["rule"] for r in rows) == sorted(ATTACKS), [
        (r["rule"], r["key_name"]) for r in rows
    ]
    for r in rows:
        assert r["status"] == "open"
        if r["rule"] != "auth_flood":
            assert r["key_name"] == r["rule"], (r["rule"], r["key_name"])
    by_rule = {r["rule"]: r for r in rows}
    assert by_rule["auth_flood"]["subject"] == f"net:{by_kind['auth_flood'].attacker}"
    assert by_rule["auth_flood"]["action"] == "none"
    ev = json.loads(by_rule["fan_out"]["evidence"])
    assert ev["distinct_addresses"] >= 20 and len(ev["addresses"]) == 10

    # the actions, on the keys and in their audit trail
    expected = {
        "rate_spike": "quarantine",
        "fan_out": "force_rotation",
        "forbidden_ip": "force_rotation",
        "scope_probe": "force_rotation",
        "grace_new_address": "force_rotation",  # critical, revocation not enabled
    }
    for rule, action in expected.items():
        assert by_rule[rule]["action"] == action, rule
        key = await accounts.get_key(str(by_kind[rule].key_id))
        assert key.quarantine_limit is not None and key.quarantine_limit >= 60
        if action == "force_rotation":
            assert key.rotate_by is not None
            left = key.rotate_by - datetime.now(UTC)
            assert timedelta(hours=23) < left <= timedelta(hours=24)
        else:
            assert key.rotate_by is None
        audit = await db.fetch(
            "SELECT action, detail FROM api_key_events WHERE api_key_id = $1 ORDER BY id",
            by_kind[rule].key_id,
        )
        actions = [a["action"] for a in audit]
        assert "quarantined" in actions
        assert f"alert {by_rule[rule]['id']}: {rule}" in json.loads(audit[-1]["detail"])["reason"]

    # the signed webhooks: one alert.opened per alert, every one verified
    async def notified() -> bool:
        return len(receiver.of_type("alert.opened")) >= len(ATTACKS)

    await eventually(notified, timeout=20, what="the webhooks")
    assert receiver.rejected == 0
    opened = receiver.of_type("alert.opened")
    assert sorted(p["data"]["rule"] for p in opened) == sorted(ATTACKS)
    fan = next(p for p in opened if p["data"]["rule"] == "fan_out")
    assert fan["data"]["key"]["rotate_by"] and fan["data"]["key"]["rotate_url"] == s.rotation_url
    attempts = await db.fetchval("SELECT count(*) FROM webhook_attempts WHERE status_code = 204")
    assert attempts == len(receiver.received)

    # one record per finding on keys.alerts
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        tp = TopicPartition(s.alerts_topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        got = await consumer.getmany(tp, timeout_ms=3000)
        records = [orjson.loads(m.value) for m in got.get(tp, [])]
    finally:
        await consumer.stop()
    assert {r["rule"] for r in records} == set(ATTACKS)
    assert all(r["alert_id"] in {row["id"] for row in rows} for r in records)


async def test_killed_worker_restores_its_state_and_still_detects(
    kafka_settings: Settings, db: asyncpg.Connection, accounts: AccountsService, worker_factory
) -> None:
    """SIGKILL after the baselines are learned: the restarted worker restores them
    from the changelog (a fresh state would be in warm-up and miss the spike),
    and the events replayed after the kill are not counted twice."""
    s = dataclasses.replace(kafka_settings, detection_rules=WARMUP)
    rng = random.Random(12)
    cast = await make_actors(accounts, ["steady", "rate_spike", "mobile"])
    now = time.time()
    past = history(cast, now, rng)
    await publish(s, past)
    first = worker_factory(s)

    async def saved() -> bool:
        first.assert_running()
        seen = await metric(first, "metering_detection_events_total")
        return (
            seen >= len(past) and await metric(first, "metering_detection_checkpoints_total") >= 2
        )

    await eventually(saved, timeout=90, what="the history consumed and checkpointed")
    # more events the checkpoint may not hold yet, then the crash
    extra = traffic(cast, now - 90, now - 30, rng)
    await publish(s, extra)
    await asyncio.sleep(0.5)
    first.kill()

    second = worker_factory(s)

    async def restored() -> bool:
        second.assert_running()
        return await metric(second, "metering_detection_keys") >= len(cast)

    await eventually(restored, timeout=90, what="the state restored")
    started = time.time()
    spike = next(a for a in cast if a.kind == "rate_spike")
    await publish(s, attack(spike, time.time(), rng))

    async def flagged() -> bool:
        second.assert_running()
        return bool(await alerts(db))

    await eventually(flagged, timeout=30, what="the spike flagged after the restart")
    rows = await alerts(db)
    assert [(r["rule"], r["api_key_id"]) for r in rows] == [("rate_spike", spike.key_id)]
    assert rows[0]["created_at"].timestamp() - started <= 10
    # the replay was skipped where the restored state held it; nothing counted twice
    logged = await db.fetchval("SELECT count(*) FROM usage_logs")
    assert logged == len(past) + len(extra) + 400


async def test_two_workers_on_different_partitions_both_detect(
    kafka_settings: Settings, db: asyncpg.Connection, accounts: AccountsService, worker_factory
) -> None:
    s = dataclasses.replace(kafka_settings, detection_rules=WARMUP)
    rng = random.Random(13)
    cast = await make_actors(accounts, ["rate_spike", "rate_spike", "steady"])
    one, two = worker_factory(s), worker_factory(s)

    def owned(w) -> list[int] | None:
        found = re.findall(
            r"usage consumer assigned \[([0-9, ]*)\]", w.log_path.read_text(errors="replace")
        )
        return [int(p) for p in found[-1].split(",") if p.strip()] if found else None

    async def split() -> bool:
        one.assert_running()
        two.assert_running()
        a, b = owned(one), owned(two)
        return bool(a) and bool(b) and sorted(a + b) == [0, 1, 2]

    await eventually(split, timeout=90, what="both workers to own partitions")
    partition = {
        cast[0].user_id: owned(one)[0],
        cast[1].user_id: owned(two)[0],
        cast[2].user_id: owned(one)[0],
    }
    now = time.time()
    past = history(cast, now, rng)
    await publish(s, past, partition)

    async def learned() -> bool:
        seen = [await metric(w, "metering_detection_events_total") for w in (one, two)]
        return sum(seen) >= len(past)

    await eventually(learned, timeout=90, what="the history consumed by both")
    for a in cast[:2]:
        await publish(s, attack(a, time.time(), rng), partition)

    async def both() -> bool:
        return len(await alerts(db)) >= 2

    await eventually(both, timeout=30, what="both spikes flagged")
    rows = await alerts(db)
    assert sorted(r["api_key_id"] for r in rows) == sorted([cast[0].key_id, cast[1].key_id])
    assert await metric(one, "metering_detection_findings_total") >= 1
    assert await metric(two, "metering_detection_findings_total") >= 1


async def test_a_tiers_own_thresholds_reach_the_worker(
    kafka_settings: Settings, db: asyncpg.Connection, accounts: AccountsService, worker_factory
) -> None:
    """The same fan-out on two keys: flagged on the default tier, not on a tier
    whose `features.detection` raises the floor (set with the service, read by
    the worker's watch list)."""
    s = dataclasses.replace(kafka_settings, detection_rules=WARMUP)
    rng = random.Random(14)
    plain = await make_actors(accounts, ["fan_out"])
    lenient = await make_actors(accounts, ["fan_out"])  # each call makes a tier of its own
    tier = (await accounts.get_user(lenient[0].user_id)).tier
    await accounts.set_tier_detection(tier, {"fanout_floor": 500})
    cast = plain + lenient
    now = time.time()
    past = history(cast, now, rng)
    await publish(s, past)
    worker = worker_factory(s)

    async def learned() -> bool:
        worker.assert_running()
        return await metric(worker, "metering_detection_events_total") >= len(past)

    await eventually(learned, timeout=90, what="the history")
    for a in cast:
        await publish(s, attack(a, time.time(), rng))

    async def flagged() -> bool:
        return bool(await alerts(db))

    await eventually(flagged, timeout=20, what="the default tier's key flagged")
    await asyncio.sleep(3)  # the other key's events were in the same batches
    rows = await alerts(db)
    assert [(r["rule"], r["api_key_id"]) for r in rows] == [("fan_out", plain[0].key_id)]
