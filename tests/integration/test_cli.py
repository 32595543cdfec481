"""The CLI as an operator runs it: a subprocess with METERING_* settings."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, TopicPartition

from metering.kafka import delete_topics
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
    out = run_cli(s, "usage", "--days", "2")  # still shows "today" if 00:00 UTC passes meanwhile
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


def test_db_maintain_lists_partitions_and_drops_nothing_fresh(kafka_settings):
    out = run_cli(kafka_settings, "db", "maintain")
    assert out.returncode == 0, out.stderr
    now = datetime.now(UTC)
    assert f"usage_logs_y{now.year:04d}m{now.month:02d}" in out.stdout
    assert "partitions dropped: none" in out.stdout


async def test_topics_ensure_creates_the_three_topics_once(services):
    tag = uuid.uuid4().hex[:10]
    s = Settings.from_env(
        events_topic=f"test.{tag}.usage.events",
        dlq_topic=f"test.{tag}.usage.events.dlq",
        alerts_topic=f"test.{tag}.keys.alerts",
    )
    try:
        first = run_cli(s, "topics", "ensure")
        assert first.returncode == 0, first.stderr
        for topic in (s.events_topic, s.dlq_topic, s.alerts_topic):
            assert topic in first.stdout
        again = run_cli(s, "topics", "ensure")
        assert again.returncode == 0 and "topics exist" in again.stdout
        consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap)
        await consumer.start()
        try:
            assert await consumer.topics() >= {s.events_topic, s.dlq_topic, s.alerts_topic}
            parts = [TopicPartition(s.events_topic, p) for p in range(s.events_partitions)]
            assert len(await consumer.end_offsets(parts)) == s.events_partitions
        finally:
            await consumer.stop()
    finally:
        await delete_topics(s, lambda name: tag in name)


def test_stack_status_reports_each_service(services):
    out = run_cli(services, "stack", "status")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.split()[-1] == "up" for line in lines)
    assert {line.split()[0] for line in lines} == {"kafka", "postgres", "redis"}
    down = Settings.from_env(redis_url="redis://127.0.0.1:1/0")
    out = run_cli(down, "stack", "status")
    assert out.returncode == 1 and "down" in out.stdout


def test_debug_shows_the_traceback_that_is_otherwise_one_line(services):
    s = Settings.from_env(database_url="postgresql://metering:metering@127.0.0.1:1/none")
    plain = run_cli(s, "db", "migrate")
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    debug = run_cli(s, "--debug", "db", "migrate")
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert "ServiceUnavailable" in debug.stderr


async def test_worker_flags_choose_the_web_port_or_turn_it_off(kafka_settings, tmp_path):
    import asyncio

    from tests.integration.conftest import free_port, port_answers

    env = dict(os.environ)
    for field in kafka_settings.__dataclass_fields__:
        env[f"METERING_{field.upper()}"] = str(getattr(kafka_settings, field))
    port, default_port = free_port(), free_port()
    env["METERING_WEB_PORT"] = str(default_port)  # the flag must win over this

    def start(*flags: str) -> subprocess.Popen[bytes]:
        with (tmp_path / "worker.log").open("ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "metering.cli", "worker", "-l", "info", *flags],
                env=env,
                cwd=tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    with_port = start("--web-port", str(port))
    try:
        for _ in range(120):
            if port_answers(port) or with_port.poll() is not None:
                break
            await asyncio.sleep(0.25)
        assert port_answers(port) and not port_answers(default_port)
    finally:
        with_port.terminate()
        assert with_port.wait(timeout=30) == 0
    (tmp_path / "worker.log").write_bytes(b"")
    no_web = start("--no-web")
    try:
        for _ in range(240):  # until it consumes: by then a web server would be up
            if "usage consumer assigned" in (tmp_path / "worker.log").read_text(errors="replace"):
                break
            assert no_web.poll() is None, (tmp_path / "worker.log").read_text()
            await asyncio.sleep(0.25)
        else:
            raise AssertionError("the --no-web worker never started consuming")
        assert not port_answers(default_port)
    finally:
        no_web.terminate()
        assert no_web.wait(timeout=30) == 0
