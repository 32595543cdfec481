"""The on-call's commands against the real database, Redis and a real HTTP
receiver: alerts list/show/ack/resolve (and the undo of every action),
webhooks add/list/test/attempts, keys history/release, tiers set-detection."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid

import pytest
import redis.asyncio as aioredis

from metering.accounts.security import KeySecurity
from metering.accounts.service import for_settings
from metering.alerts.service import AlertsService
from metering.detect.rules import Finding
from metering.dev.receiver import Receiver
from metering.settings import Settings
from tests.integration.test_cli import run_cli


async def run_cli_async(settings: Settings, *args: str) -> tuple[int, str, str]:
    env = {
        f"METERING_{f.upper()}": str(getattr(settings, f)) for f in settings.__dataclass_fields__
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "metering.cli",
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


def finding(key_id: uuid.UUID, user_id: uuid.UUID, rule: str, severity: str) -> Finding:
    now = time.time()
    return Finding(
        rule=rule,
        severity=severity,
        subject=f"key:{key_id}",
        api_key_id=str(key_id),
        user_id=str(user_id),
        first_seen=now - 5,
        last_seen=now,
        evidence={"distinct_addresses": 42, "addresses": ["203.0.113.1"]},
        baseline_per_minute=75,
    )


@pytest.fixture
async def setup(kafka_settings, db):
    client = aioredis.from_url(kafka_settings.redis_url, socket_timeout=5)
    accounts = for_settings(kafka_settings, db, client)
    alerts = AlertsService(db, KeySecurity(accounts), revoke_enabled=True)
    user = await accounts.create_user(email=f"{uuid.uuid4().hex[:8]}@example.com", tier="free")
    _, key = await accounts.create_key(user=user.id, name="leaky")
    yield accounts, alerts, user, key
    await client.aclose()


async def test_alerts_through_the_cli_and_every_action_undone(kafka_settings, db, setup) -> None:
    s = kafka_settings
    accounts, alerts, user, key = setup
    alert, event = await alerts.record(finding(key.id, user.id, "fan_out", "high"))
    assert event == "alert.opened" and alert.action == "force_rotation"
    # the same finding again (a replay): the alert is updated, nothing is repeated
    again, event = await alerts.record(finding(key.id, user.id, "fan_out", "high"))
    assert again.id == alert.id and again.occurrences == 2 and event is None
    assert await db.fetchval("SELECT count(*) FROM key_alerts") == 1

    out = run_cli(s, "alerts", "list")
    assert out.returncode == 0, out.stderr
    assert "fan_out" in out.stdout and key.prefix in out.stdout and "force_rotati" in out.stdout
    shown = json.loads(run_cli(s, "alerts", "show", str(alert.id)).stdout)
    assert shown["evidence"]["distinct_addresses"] == 42 and shown["occurrences"] == 2
    listed = run_cli(s, "keys", "list", "--user", str(user.id))
    assert "quarantined (75/min)" in listed.stdout and "rotate by" in listed.stdout

    out = run_cli(s, "alerts", "ack", str(alert.id), "--note", "looking")
    assert out.returncode == 0 and "acknowledged" in out.stdout
    after_ack = await accounts.get_key(str(key.id))
    assert after_ack.quarantine_limit is None and after_ack.rotate_by is not None
    assert run_cli(s, "alerts", "ack", str(alert.id)).returncode == 2  # not open any more

    out = run_cli(s, "alerts", "resolve", str(alert.id), "--undo", "--note", "our own load test")
    assert out.returncode == 0 and "undone" in out.stdout
    after = await accounts.get_key(str(key.id))
    assert after.rotate_by is None and after.quarantine_limit is None and after.status == "active"
    history = run_cli(s, "keys", "history", key.prefix).stdout
    for action in ("quarantined", "rotation_forced", "quarantine_lifted", "rotation_cancelled"):
        assert action in history
    assert json.loads(run_cli(s, "alerts", "show", str(alert.id)).stdout)["status"] == "resolved"

    # a critical finding revokes where revocation is enabled; resolve --undo reinstates
    crit, _ = await alerts.record(finding(key.id, user.id, "grace_new_address", "critical"))
    assert crit.action == "revoke" and (await accounts.get_key(str(key.id))).status == "revoked"
    assert run_cli(s, "alerts", "resolve", str(crit.id), "--undo").returncode == 0
    assert (await accounts.get_key(str(key.id))).status == "active"

    # a new finding after a resolve opens a new alert
    fresh, event = await alerts.record(finding(key.id, user.id, "fan_out", "high"))
    assert fresh.id != alert.id and event == "alert.opened"
    out = run_cli(s, "keys", "release", key.prefix, "--reason", "owner confirmed")
    assert out.returncode == 0 and "not quarantined, no forced rotation" in out.stdout

    for bad in (
        ["alerts", "show", "999999"],
        ["alerts", "list", "--status", "odd"],
        ["alerts", "ack", "x"],
    ):
        out = run_cli(s, *bad)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, (bad, out.stderr)


async def test_webhooks_through_the_cli_are_signed_and_recorded(kafka_settings, db) -> None:
    s = kafka_settings
    receiver = Receiver()
    url = await receiver.start()
    try:
        out = run_cli(
            s, "webhooks", "add", url, "--event", "alert.opened", "--description", "on-call"
        )
        assert out.returncode == 0, out.stderr
        receiver.secret = out.stdout.strip().splitlines()[-1]
        assert receiver.secret.startswith("whsec_")
        endpoint = out.stdout.split()[1]
        # the CLI runs beside this loop, where the receiver answers
        code, stdout, stderr = await run_cli_async(s, "webhooks", "test", endpoint)
        assert code == 0, stderr
        assert "delivered (204)" in stdout
        assert [r["payload"]["type"] for r in receiver.received] == ["webhook.test"]
        assert receiver.received[0]["headers"]["webhook-id"].startswith("msg_test_")
        listed = run_cli(s, "webhooks", "list").stdout
        assert url in listed and "alert.opened" in listed
        attempts = run_cli(s, "webhooks", "attempts", endpoint).stdout
        assert "webhook.test" in attempts and "204" in attempts
        # a wrong secret: the receiver refuses, the attempt records it
        receiver.secret = "whsec_" + "A" * 43
        code, stdout, _ = await run_cli_async(s, "webhooks", "test", endpoint)
        assert code == 1 and "failed (401)" in stdout and receiver.rejected == 1
    finally:
        await receiver.stop()
    for bad in (
        ["webhooks", "add", "ftp://x"],
        ["webhooks", "add", "http://[::1/"],
        ["webhooks", "add", "http:///nohost"],
        ["webhooks", "add", url, "--event", "nope"],
    ):
        out = run_cli(s, *bad)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr


async def test_tier_detection_overrides_are_checked(kafka_settings, db) -> None:
    s = kafka_settings
    out = run_cli(s, "tiers", "set-detection", "free", "fanout_floor=500", "severity_fan_out=low")
    assert out.returncode == 0, out.stderr
    features = json.loads(
        await db.fetchval("SELECT features::text FROM access_tiers WHERE name = 'free'")
    )
    assert features["detection"] == {"fanout_floor": 500, "severity_fan_out": "low"}
    for bad in (["nope=1"], ["fanout_floor=0"], ["severity_fan_out=huge"], ["fanout_floor"]):
        out = run_cli(s, "tiers", "set-detection", "free", *bad)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, (bad, out.stderr)
    assert run_cli(s, "tiers", "set-detection", "nosuch", "fanout_floor=5").returncode == 2
    assert run_cli(s, "tiers", "set-detection", "free").returncode == 0
    features = json.loads(
        await db.fetchval("SELECT features::text FROM access_tiers WHERE name = 'free'")
    )
    assert "detection" not in features


async def test_undo_reverses_only_what_the_alert_did(kafka_settings, db, setup) -> None:
    accounts, alerts, user, key = setup
    # two alerts force the rotation: undoing one keeps the other's deadline
    first, _ = await alerts.record(finding(key.id, user.id, "fan_out", "high"))
    second, _ = await alerts.record(finding(key.id, user.id, "scope_probe", "high"))
    await alerts.resolve(first.id, by="oncall", undo=True)
    after = await accounts.get_key(str(key.id))
    assert after.rotate_by is not None and after.quarantine_limit is not None
    await alerts.resolve(second.id, by="oncall", undo=True)
    after = await accounts.get_key(str(key.id))
    assert after.rotate_by is None and after.quarantine_limit is None

    # the owner revoked the key themselves: a false alarm's undo does not bring it back
    await accounts.revoke_key(str(key.id), reason="owner: leaked in a gist")
    crit, _ = await alerts.record(finding(key.id, user.id, "grace_new_address", "critical"))
    assert crit.action == "revoke"
    await alerts.resolve(crit.id, by="oncall", undo=True)
    assert (await accounts.get_key(str(key.id))).status == "revoked"

    # a key in its rotation grace revoked by an alert comes back in its grace
    _, other = await accounts.create_key(user=user.id, name="other")
    await accounts.rotate_key(str(other.id))
    crit, _ = await alerts.record(finding(other.id, user.id, "grace_new_address", "critical"))
    assert (await accounts.get_key(str(other.id))).status == "revoked"
    await alerts.resolve(crit.id, by="oncall", undo=True)
    back = await accounts.get_key(str(other.id))
    assert back.status == "rotating" and back.rotates_at is not None


async def test_a_webhook_lost_before_it_was_queued_is_queued_by_the_retry(
    kafka_settings, db, setup
) -> None:
    _, alerts, user, key = setup
    await db.execute(
        "INSERT INTO webhook_endpoints (url, secret) VALUES ('http://127.0.0.1:9/x', 'whsec_AAAA')"
    )
    alert, event = await alerts.record(finding(key.id, user.id, "fan_out", "high"))
    assert event == "alert.opened"
    assert await db.fetchval("SELECT count(*) FROM webhook_deliveries") == 1
    # as if the transaction queueing it had failed after the actions
    await db.execute("DELETE FROM webhook_deliveries")
    await db.execute(
        "UPDATE key_alerts SET notified_severity = NULL, notified_action = NULL WHERE id = $1",
        alert.id,
    )
    again, event = await alerts.record(finding(key.id, user.id, "fan_out", "high"))
    assert again.id == alert.id and event == "alert.opened"
    assert await db.fetchval("SELECT count(*) FROM webhook_deliveries") == 1
    # and a replay once it is queued sends nothing more
    assert (await alerts.record(finding(key.id, user.id, "fan_out", "high")))[1] is None
    # a rise in severity is news
    _, event = await alerts.record(finding(key.id, user.id, "fan_out", "critical"))
    assert event == "alert.escalated"


async def test_a_failed_delivery_is_retried_with_backoff_and_every_attempt_recorded(
    kafka_settings, db, setup
) -> None:
    from metering.alerts.webhooks import WebhookSender, add_endpoint, backoff

    _, alerts, user, key = setup
    receiver = Receiver()
    answers = iter([b"500 Internal Server Error", b"204 No Content"])
    serve = receiver._serve

    async def flaky(reader, writer):  # the first attempt fails, the second is verified
        status = next(answers)
        if status.startswith(b"500"):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        await serve(reader, writer)

    receiver._serve = flaky  # type: ignore[method-assign]
    url = await receiver.start()
    try:
        _, receiver.secret = await add_endpoint(db, url, event_types=[], description=None)
        await alerts.record(finding(key.id, user.id, "fan_out", "high"))
        sender = WebhookSender(db, timeout_s=5, max_attempts=3)
        assert await sender.deliver_due() == 1
        row = await db.fetchrow(
            "SELECT status, attempts, next_attempt_at - now() AS wait FROM webhook_deliveries"
        )
        assert row["status"] == "pending" and row["attempts"] == 1
        assert 2.4 <= row["wait"].total_seconds() <= 5.1  # 5 s, half of it jittered
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not receiver.received:
            await sender.deliver_due()
            await asyncio.sleep(0.25)
        await sender.close()
        assert [r["payload"]["type"] for r in receiver.received] == ["alert.opened"]
        attempts = await db.fetch(
            "SELECT attempt, status_code FROM webhook_attempts ORDER BY attempt"
        )
        assert [(a["attempt"], a["status_code"]) for a in attempts] == [(1, 500), (2, 204)]
        assert await db.fetchval("SELECT status FROM webhook_deliveries") == "delivered"
    finally:
        await receiver.stop()
    waits = [backoff(n) for n in range(1, 16)]
    assert all(
        min(5 * 2 ** (n - 1), 3600) / 2 <= w <= min(5 * 2 ** (n - 1), 3600)
        for n, w in enumerate(waits, 1)
    )
