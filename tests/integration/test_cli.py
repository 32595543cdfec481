"""The CLI as an operator runs it: a subprocess with METERING_* settings."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, TopicPartition

from metering.settings import Settings


def run_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    for field in settings.__dataclass_fields__:
        env[f"METERING_{field.upper()}"] = str(getattr(settings, field))
    return subprocess.run(
        [sys.executable, "-m", "metering.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_migrate_is_idempotent_and_usage_prints_the_table(kafka_settings, db, redis_client):
    s = kafka_settings
    out = run_cli(s, "db", "migrate")
    assert out.returncode == 0 and "database is up to date" in out.stdout

    user = await db.fetchval(
        "INSERT INTO users (email, tier_id) VALUES ('ana@example.com',"
        " (SELECT id FROM access_tiers WHERE name = 'free')) RETURNING id"
    )
    today = datetime.now(UTC).date()
    await db.execute(
        "INSERT INTO daily_usage (user_id, date, request_count, units) VALUES ($1, $2, 250, 300)",
        user,
        today,
    )
    out = run_cli(s, "usage", "--days", "1")
    assert out.returncode == 0, out.stderr
    assert "ana@example.com" in out.stdout and "250" in out.stdout and "25.0%" in out.stdout

    out = run_cli(s, "counters", "rebuild")
    assert out.returncode == 0 and "rebuilt 1 counters" in out.stdout
    key = f"{s.redis_key_prefix}:usage:{user}:{today.isoformat()}"
    assert await redis_client.hget(key, "requests") == b"250"

    out = run_cli(s, "usage", "--user", str(uuid.uuid4()))
    assert out.returncode == 0 and "no usage recorded" in out.stdout


async def test_simulate_creates_users_and_publishes_what_it_reports(kafka_settings, db):
    s = kafka_settings
    out = run_cli(s, "simulate", "--users", "3", "--events", "120", "--bad", "2", "--seed", "5")
    assert out.returncode == 0, out.stderr
    assert "sent 120 events" in out.stdout and "2 malformed" in out.stdout
    emails = {r["email"] for r in await db.fetch("SELECT email FROM users")}
    assert emails == {f"sim-user-{i}@example.com" for i in (1, 2, 3)}

    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap)
    await consumer.start()
    try:
        parts = [TopicPartition(s.events_topic, p) for p in range(s.events_partitions)]
        assert sum((await consumer.end_offsets(parts)).values()) == 122
    finally:
        await consumer.stop()


def test_unreachable_database_is_one_line_exit_1(services):
    s = Settings.from_env(database_url="postgresql://metering:metering@127.0.0.1:1/none")
    out = run_cli(s, "db", "migrate")
    assert out.returncode == 1
    assert out.stderr.startswith("metering: error: cannot connect to PostgreSQL")
    assert out.stderr.count("\n") == 1
