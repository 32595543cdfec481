"""End-to-end pipeline benchmark: Kafka -> faust worker -> PostgreSQL + Redis.

    python -m bench.pipeline --events 200000

1. pre-loads N realistic events into a fresh topic (nothing consumes yet);
2. starts ``metering worker`` on an empty, freshly migrated database and
   measures events/s from the start of its first batch to the commit of its
   last one (read from the worker's /metrics), plus the worker's CPU time
   and peak RSS (VmHWM), and checks the result is exact;
3. runs a naive consumer on the same events, doing what the seed articles
   do: per event one INSERT, one daily_usage upsert and one Redis INCR
   (``--naive-events`` caps how many it gets, default 50,000: at ~1k/s
   the whole set would only take longer, not change the rate);
4. prints both rates and their ratio.

``--detection both`` runs step 2 twice over the same events, with the
anomaly rules on and then off, and prints the ratio (the #11 target: on is
at least 0.9x off).

Needs the stack (``metering stack up``). Leaves nothing behind but the Kafka
topics (named bench.<tag>.*) and drops its databases.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import psutil
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from metering.db.admin import database_url, drop_database
from metering.db.migrate import migrate
from metering.dev.simulate import SimUser, make_event
from metering.events import decode
from metering.kafka import delete_topics, ensure_topics
from metering.metrics import parse
from metering.settings import Settings
from metering.usage.store import to_row


async def create_db(base: Settings, name: str) -> str:
    admin = await asyncpg.connect(base.database_url)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    url = database_url(base.database_url, name)
    conn = await asyncpg.connect(url)
    await migrate(conn)
    await conn.close()
    return url


async def drop_db(base: Settings, name: str) -> None:
    await drop_database(base.database_url, name)


async def drop_redis_keys(base: Settings, prefix: str) -> None:
    """Delete the run's Redis keys (``<prefix>*``: every run's prefix starts with it)."""
    r = aioredis.from_url(base.redis_url)
    try:
        found = [k async for k in r.scan_iter(match=f"{prefix}*", count=1000)]
        if found:
            await r.delete(*found)
    finally:
        await r.aclose()


async def preload(s: Settings, n: int, users: int, seed: int) -> int:
    rng = random.Random(seed)
    sim_users = [
        SimUser(
            uuid.uuid4(),
            f"bench-{i}@example.com",
            "pro",
            (uuid.uuid4(),),
            (f"203.0.113.{i % 250 + 1}",),
            1.0 / (i + 1) ** 0.8,
        )
        for i in range(users)
    ]
    weights = [u.weight for u in sim_users]
    producer = AIOKafkaProducer(
        bootstrap_servers=s.kafka_bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=20,
        max_batch_size=512 * 1024,
    )
    await producer.start()
    now = datetime.now(UTC)
    try:
        pending = []
        for _ in range(n):
            user = None if rng.random() < 0.05 else rng.choices(sim_users, weights)[0]
            at = now - timedelta(seconds=rng.uniform(0, 6 * 3600))
            e = make_event(rng, user, at)
            pending.append(await producer.send(s.events_topic, e.to_json(), key=e.partition_key))
            if len(pending) >= 20000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return n


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        return parse(r.read().decode())


def run_worker(s: Settings, n: int, port: int, log: Path, timeout: float) -> dict[str, float]:
    env = dict(os.environ)
    for f in s.__dataclass_fields__:
        env[f"METERING_{f.upper()}"] = str(getattr(s, f))
    env["METERING_WEB_PORT"] = str(port)
    env["METERING_WEB_ENABLED"] = "true"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "metering.cli", "worker", "-l", "warn"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=log.parent,
            start_new_session=True,
        )
    ps = psutil.Process(proc.pid)
    started = time.time()
    m: dict[str, float] = {}
    try:
        while time.time() - started < timeout:
            if proc.poll() is not None:
                raise SystemExit(f"worker exited ({proc.returncode}); see {log}")
            try:
                m = metrics(port)
            except OSError:
                m = {}
            if m.get("metering_records_total", 0) >= n:
                break
            time.sleep(0.1)
        else:
            raise SystemExit(f"worker did not finish {n} events in {timeout:.0f}s; see {log}")
        cpu = ps.cpu_times()
        with open(f"/proc/{proc.pid}/status") as f:
            hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
        m["cpu_seconds"] = cpu.user + cpu.system
        m["peak_rss_mib"] = hwm / 1024
        m["wall_from_start"] = time.time() - started
        return m
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


NAIVE_INSERT = """
INSERT INTO usage_logs (event_id, created_at, user_id, api_key_id, endpoint, method, status_code,
                        response_time_ms, client_ip, bytes_out, units, schema_version)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT DO NOTHING
"""
NAIVE_UPSERT = """
INSERT INTO daily_usage (user_id, date, request_count) VALUES ($1, $2, 1)
ON CONFLICT (user_id, date) DO UPDATE SET request_count = daily_usage.request_count + 1
"""


async def naive(s: Settings, limit: int) -> tuple[int, float]:
    """The seeds' way: one INSERT, one upsert, one INCR per event, as they come."""
    conn = await asyncpg.connect(s.database_url)
    r = aioredis.from_url(s.redis_url)
    consumer = AIOKafkaConsumer(
        s.events_topic,
        bootstrap_servers=s.kafka_bootstrap,
        group_id=f"naive-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=True,
        max_poll_records=500,
    )
    await consumer.start()
    done, first = 0, None
    try:
        while done < limit:
            batch = await consumer.getmany(timeout_ms=1000)
            for msgs in batch.values():
                for msg in msgs:
                    if done >= limit:
                        break
                    if first is None:
                        first = time.perf_counter()
                    e = decode(msg.value)
                    await conn.execute(NAIVE_INSERT, *to_row(e))
                    if e.user_id is not None:
                        day = e.occurred_at.date()
                        await conn.execute(NAIVE_UPSERT, e.user_id, day)
                        await r.incr(f"{s.redis_key_prefix}:naive:{e.user_id}:{day}")
                    done += 1
        elapsed = time.perf_counter() - (first or time.perf_counter())
    finally:
        await consumer.stop()
        await conn.close()
        await r.aclose()
    return done, elapsed


async def topic_size(s: Settings) -> int:
    c = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap)
    await c.start()
    try:
        parts = [TopicPartition(s.events_topic, p) for p in range(s.events_partitions)]
        ends = await c.end_offsets(parts)
        return sum(ends.values())
    finally:
        await c.stop()


async def verify(url: str, n: int) -> tuple[int, int]:
    conn = await asyncpg.connect(url)
    try:
        logs = await conn.fetchval("SELECT count(*) FROM usage_logs")
        anon = await conn.fetchval("SELECT count(*) FROM usage_logs WHERE user_id IS NULL")
        daily = await conn.fetchval("SELECT coalesce(sum(request_count), 0) FROM daily_usage")
        return logs, daily + anon
    finally:
        await conn.close()


def measure(
    base: Settings, s: Settings, n: int, label: str, *, detection: bool
) -> tuple[float, dict[str, float], bool]:
    """One worker over the pre-loaded topic on a fresh database: (events/s, metrics, exact)."""
    name = f"{s.worker_id.replace('-', '_')}_{label}"
    url = asyncio.run(create_db(base, name))
    run = dataclasses.replace(
        s,
        worker_id=f"{s.worker_id}-{label}",
        database_url=url,
        detection_enabled=detection,
        detection_state_topic=f"{s.events_topic}.{label}.state",
        redis_key_prefix=f"{s.redis_key_prefix}-{label}",
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "worker.log"
            port = 16000 + random.randint(0, 2000)
            m = run_worker(run, n, port, log, timeout=max(120, n / 500))
        span = (
            m["metering_last_batch_timestamp_seconds"] - m["metering_first_batch_timestamp_seconds"]
        )
        logs, daily = asyncio.run(verify(url, n))
    finally:
        asyncio.run(drop_db(base, name))
    exact = logs == n == daily
    rate = n / span
    if detection:
        took = m.get("metering_detection_seconds_total", 0.0)
        print(
            f"detection: {took:.2f}s in the rules = {took / n * 1e6:.2f} us/event, "
            f"{100 * took / m['cpu_seconds']:.1f}% of the worker's CPU"
        )
    print(
        f"pipeline ({label:13}): {n:,} events in {span:.2f}s = {rate:,.0f} events/s end to end "
        f"(first batch start -> last commit); worker CPU {m['cpu_seconds']:.1f}s, "
        f"peak RSS {m['peak_rss_mib']:.0f} MiB; {m['metering_batches_total']:.0f} batches; "
        f"usage_logs={logs:,} daily_usage+anonymous={daily:,} -> {'exact' if exact else 'MISMATCH'}"
    )
    return rate, m, exact


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.pipeline", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=5000)
    ap.add_argument("--naive-events", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument(
        "--detection",
        choices=("on", "off", "both"),
        default="on",
        help="anomaly detection in the worker; both: one run each, in turn, over the same events",
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if args.events < 1 or args.naive_events < 0 or args.batch_size < 1:
        ap.error("--events and --batch-size must be >= 1, --naive-events >= 0")

    base = Settings.from_env()
    tag = f"{datetime.now(UTC):%Y%m%d%H%M%S}-{uuid.uuid4().hex[:6]}"
    db_name = f"bench_{tag.replace('-', '_')}"
    naive_db = f"{db_name}_naive"
    results: dict[str, object] = {"events": args.events, "batch_size": args.batch_size}

    async def setup() -> tuple[Settings, Settings]:
        naive_url = await create_db(base, naive_db)
        s = Settings.from_env(
            events_topic=f"bench.{tag}.usage.events",
            dlq_topic=f"bench.{tag}.dlq",
            alerts_topic=f"bench.{tag}.alerts",
            detection_state_topic=f"bench.{tag}.detection.state",
            worker_id=f"bench-{tag}",
            redis_key_prefix=f"bench-{tag}",
            batch_size=args.batch_size,
        )
        await ensure_topics(s)
        t0 = time.perf_counter()
        await preload(s, args.events, args.users, args.seed)
        print(
            f"pre-loaded {await topic_size(s):,} events into {s.events_topic} "
            f"in {time.perf_counter() - t0:.1f}s"
        )
        return s, Settings.from_env(
            events_topic=s.events_topic, database_url=naive_url, redis_key_prefix=f"bench-{tag}"
        )

    s, naive_settings = asyncio.run(setup())
    try:
        runs = {"on": [True], "off": [False], "both": [False, True]}[args.detection]
        rates: dict[bool, float] = {}
        exact = True
        for detection in runs:
            label = "detection-on" if detection else "detection-off"
            rate, m, ok = measure(base, s, args.events, label, detection=detection)
            rates[detection] = rate
            exact = exact and ok
            key = "pipeline_events_per_s" if detection else "pipeline_events_per_s_detection_off"
            results.update({key: round(rate), f"worker_cpu_s_{label}": round(m["cpu_seconds"], 2)})
            results[f"worker_peak_rss_mib_{label}"] = round(m["peak_rss_mib"], 1)
        results["exact"] = exact
        rate = rates.get(True) or rates[False]
        if len(rates) == 2:
            print(f"detection: on/off = {rates[True] / rates[False]:.2f}x")
            results["detection_ratio"] = round(rates[True] / rates[False], 3)
        if args.naive_events:
            n, secs = asyncio.run(naive(naive_settings, min(args.naive_events, args.events)))
            naive_rate = n / secs
            print(
                f"naive    : {n:,} events in {secs:.2f}s = {naive_rate:,.0f} events/s "
                "(INSERT + upsert + INCR per event)"
            )
            print(f"ratio    : {rate / naive_rate:.1f}x")
            results.update(
                naive_events=n,
                naive_events_per_s=round(naive_rate),
                ratio=round(rate / naive_rate, 1),
            )
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return 0 if exact else 1
    finally:

        async def cleanup() -> None:
            await drop_db(base, naive_db)
            await drop_redis_keys(base, f"bench-{tag}")
            await delete_topics(base, lambda name: tag in name)

        asyncio.run(cleanup())


if __name__ == "__main__":
    sys.exit(main())
