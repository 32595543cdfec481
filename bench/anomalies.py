"""Anomaly detection benchmark: detection latency, false positives, throughput
with detection on against off, and the state's memory and restore time.

    python -m bench.anomalies

1. **Detection.** ``--keys`` keys of normal traffic (steady, diurnal, a nightly
   batch job bursting 20x, mobile apps seen from hundreds of addresses, keys
   rotated normally; ``metering/dev/scenario.py``) learn their baselines from
   ``--history-hours`` of history, then a live minute of normal traffic runs
   while ``--attacks`` attacks per rule start one after another. Reported per
   rule: detection latency from the attack's first event being published to
   its alert being recorded (p50, max), and the alerts raised on normal keys.
2. **Throughput.** ``bench.pipeline --detection both`` over the same
   pre-loaded events: events/s with the rules on and off, and the ratio.
3. **State.** ``--state-keys`` active keys (two addresses each) and as many
   failing addresses go through a worker; reported: its peak RSS, the state's
   bytes per key in memory (tracemalloc, in this process) and in the
   changelog, then the worker is killed (SIGKILL) and a new one restores the
   state: the time until it holds every key again.

Needs the stack (``metering stack up``); cleans up its databases and topics.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from bench import pipeline as pipeline_bench
from bench.pipeline import create_db, drop_db, drop_redis_keys, metrics
from metering.accounts.service import for_settings
from metering.detect.detector import Detector
from metering.detect.rules import Rules
from metering.dev.scenario import ATTACKS, Actor, actor, attack, traffic
from metering.events import UsageEvent
from metering.kafka import delete_topics, ensure_topics
from metering.settings import Settings

SHAPES = (("steady", 0.55), ("diurnal", 0.2), ("batch", 0.1), ("mobile", 0.05), ("rotating", 0.1))


class Worker:
    def __init__(self, s: Settings, log: Path) -> None:
        self.port = 18000 + random.randint(0, 2000)
        env = dict(os.environ)
        env.update({f"METERING_{f.upper()}": str(getattr(s, f)) for f in s.__dataclass_fields__})
        env.update(METERING_WEB_PORT=str(self.port), METERING_WEB_ENABLED="true")
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "metering.cli", "worker", "-l", "warn"],
                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent,
                start_new_session=True,
            )  # fmt: skip
        self.log = log

    def metrics(self) -> dict[str, float]:
        if self.proc.poll() is not None:
            raise SystemExit(f"worker exited ({self.proc.returncode}); see {self.log}")
        try:
            return metrics(self.port)
        except OSError:
            return {}

    def wait(self, what: str, done: Any, timeout: float) -> dict[str, float]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = self.metrics()
            if m and done(m):
                return m
            time.sleep(0.1)
        raise SystemExit(f"timed out waiting for {what}; see {self.log}")

    def peak_rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


async def publish(s: Settings, events: list[UsageEvent]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=s.kafka_bootstrap, linger_ms=20, max_batch_size=512 * 1024
    )
    await producer.start()
    try:
        pending = []
        for e in events:
            pending.append(await producer.send(s.events_topic, e.to_json(), key=e.partition_key))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


def settings_for(base: Settings, tag: str, url: str, **extra: Any) -> Settings:
    return Settings.from_env(
        events_topic=f"bench.{tag}.usage.events",
        dlq_topic=f"bench.{tag}.dlq",
        alerts_topic=f"bench.{tag}.alerts",
        detection_state_topic=f"bench.{tag}.detection.state",
        worker_id=f"bench-{tag}",
        database_url=url,
        redis_key_prefix=f"bench-{tag}",
        **extra,
    )


# -- 1. detection -----------------------------------------------------------------


async def cast(s: Settings, n: int, attacks: int, rng: random.Random) -> list[Actor]:
    """Normal keys (ids only, except the rotated ones) and attack keys (real keys)."""
    conn = await asyncpg.connect(s.database_url)
    client = aioredis.from_url(s.redis_url)
    accounts = for_settings(s, conn, client)
    out: list[Actor] = []
    try:
        await accounts.create_tier(name="bench", daily_quota=None, rate_limit_per_minute=1_000_000)

        async def real(kind: str) -> tuple[uuid.UUID, uuid.UUID]:
            user = await accounts.create_user(email=f"{uuid.uuid4().hex[:10]}@bench", tier="bench")
            _, key = await accounts.create_key(user=user.id, name=kind)
            if kind in ("rotating", "grace_new_address"):
                await accounts.rotate_key(str(key.id))
            return user.id, key.id

        kinds = rng.choices([k for k, _ in SHAPES], [w for _, w in SHAPES], k=n)
        for i, kind in enumerate(kinds):
            ids = await real(kind) if kind == "rotating" else (uuid.uuid4(), uuid.uuid4())
            out.append(actor(f"{kind}-{i}", kind, *ids, i))
        for j, kind in enumerate(k for k in ATTACKS for _ in range(attacks)):
            out.append(actor(f"{kind}-{j}", kind, *(await real(kind)), n + j))
    finally:
        await client.aclose()
        await conn.close()
    return out


def detection(base: Settings, tag: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    name = f"bench_{tag.replace('-', '_')}_detect"
    url = asyncio.run(create_db(base, name))
    rules = json.dumps({"warmup_minutes": args.warmup_minutes})
    s = settings_for(base, tag, url, detection_rules=rules)
    worker = None
    try:
        asyncio.run(ensure_topics(s))
        actors = asyncio.run(cast(s, args.keys, args.attacks, rng))
        normal = [a for a in actors if a.kind not in ATTACKS]
        attackers = [a for a in actors if a.kind in ATTACKS]
        now = time.time()
        start = now - args.history_hours * 3600
        as_normal = [
            dataclasses.replace(a, kind="steady") if a.kind in ATTACKS else a for a in actors
        ]
        past = traffic(as_normal, start, now - 90, rng, burst_from=start + 1800)
        t0 = time.perf_counter()
        asyncio.run(publish(s, past))
        print(f"detection: {len(actors):,} keys, {len(past):,} history events published in "
              f"{time.perf_counter() - t0:.1f}s")  # fmt: skip
        worker = Worker(s, tmp / "detect-worker.log")
        worker.wait("the history", lambda m: m.get("metering_detection_events_total", 0) >= len(past),
                    timeout=max(300, len(past) / 2000))  # fmt: skip
        live_start = time.time()
        live = traffic(normal, live_start - 60, live_start, rng, burst_from=live_start - 60)
        asyncio.run(publish(s, live))
        started: dict[uuid.UUID, tuple[str, float]] = {}
        order = sorted(attackers, key=lambda a: (ATTACKS.index(a.kind), a.name))
        rng.shuffle(order)
        for a in order:
            started[a.key_id] = (a.kind, time.time())
            asyncio.run(publish(s, attack(a, time.time(), rng)))
            time.sleep(0.2)
        deadline = time.time() + 60
        rows: list[asyncpg.Record] = []
        while time.time() < deadline:
            rows = asyncio.run(alert_rows(url))
            subjects = {r["subject"] for r in rows}
            flagged = {r["api_key_id"] for r in rows} | {
                a.key_id for a in attackers if f"net:{a.attacker}" in subjects
            }  # fmt: skip
            if flagged >= set(started):
                break
            time.sleep(0.5)
        time.sleep(3)  # anything late on the normal keys shows up too
        rows = asyncio.run(alert_rows(url))
    finally:
        if worker is not None:
            worker.stop()
        asyncio.run(drop_db(base, name))
    per_rule: dict[str, list[float]] = {rule: [] for rule in ATTACKS}
    # an address's attack is known by its subject
    by_subject = {
        f"net:{a.attacker}": started[a.key_id] for a in attackers if a.kind == "auth_flood"
    }
    false_positives = []
    for r in rows:
        kind, t = started.get(r["api_key_id"]) or by_subject.get(r["subject"]) or ("", 0.0)
        if r["rule"] == kind:
            per_rule[kind].append(r["created_at"].timestamp() - t)
        else:
            false_positives.append((r["rule"], r["subject"]))
    report: dict[str, Any] = {"keys": len(actors), "history_events": len(past),
                              "false_positives": len(false_positives), "rules": {}}  # fmt: skip
    print(f"{'rule':18} {'flagged':>8} {'p50 s':>7} {'max s':>7}")
    for rule, lat in per_rule.items():
        expected = args.attacks
        p50 = statistics.median(lat) if lat else float("nan")
        worst = max(lat) if lat else float("nan")
        print(f"{rule:18} {len(lat):>4}/{expected:<3} {p50:7.2f} {worst:7.2f}")
        report["rules"][rule] = {"flagged": len(lat), "expected": expected,
                                 "p50_s": round(p50, 3), "max_s": round(worst, 3)}  # fmt: skip
    print(
        f"false positives on {len(normal):,} normal keys: {len(false_positives)} {false_positives[:5]}"
    )
    return report


async def alert_rows(url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch("SELECT api_key_id, subject, rule, created_at FROM key_alerts")
    finally:
        await conn.close()


# -- 3. state ---------------------------------------------------------------------


def state_events(n: int, now: float) -> list[UsageEvent]:
    """A request from each of two addresses per key, and a failed login from each of n addresses."""
    out = []
    for i in range(n):
        key, user = uuid.uuid4(), uuid.uuid4()
        a, b = divmod(i, 250)
        for j in range(2):
            ip = f"10.{a // 250}.{a % 250}.{b + 1}" if j == 0 else f"172.16.{a % 250}.{b + 1}"
            out.append(scenario_event(user, key, ip, now - 600 + (i % 600)))
    for i in range(n):
        a, b = divmod(i, 250)
        out.append(scenario_event(None, None, f"198.{18 + a // 250}.{a % 250}.{b + 1}", now - 300,
                                  rejected="unauthorized"))  # fmt: skip
    return out


def scenario_event(user: uuid.UUID | None, key: uuid.UUID | None, ip: str, t: float,
                   rejected: str | None = None) -> UsageEvent:  # fmt: skip
    return UsageEvent(
        event_id=uuid.uuid4(), occurred_at=datetime.fromtimestamp(t, UTC), user_id=user,
        api_key_id=key, endpoint="/v1/items", method="GET",
        status_code=401 if rejected else 200, response_time_ms=3.0, client_ip=ip,
        units=0 if rejected else 1, rejected=rejected,
    )  # fmt: skip


def state(base: Settings, tag: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    n = args.state_keys
    events = state_events(n, time.time())
    # in memory, here: the detector alone over the same events
    sources = {id(e): _Src(0, i) for i, e in enumerate(events)}
    gc.collect()
    tracemalloc.start()
    d = Detector(Rules())
    for k in range(0, 2 * n, 5000):  # the keys' events first, then the failing addresses'
        d.observe(events[k : min(k + 5000, 2 * n)], sources)
    keys_held, _ = tracemalloc.get_traced_memory()
    for k in range(2 * n, len(events), 5000):
        d.observe(events[k : k + 5000], sources)
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    per_key, per_addr = keys_held / n, (held - keys_held) / n
    _, records = d.snapshot(0)
    changelog_bytes = sum(len(v) for _, v in records)
    del d, sources
    print(f"state    : {n:,} keys ({per_key:.0f} bytes each in memory) and {n:,} failing "
          f"addresses ({per_addr:.0f} bytes each): {held / 2**20:.0f} MiB; the changelog holds "
          f"{changelog_bytes / 2**20:.1f} MiB ({changelog_bytes / (2 * n):.0f} bytes each)")  # fmt: skip
    name = f"bench_{tag.replace('-', '_')}_state"
    url = asyncio.run(create_db(base, name))
    # static membership: the restarted worker takes its partitions back at once
    s = settings_for(
        base, f"{tag}-state", url, detection_checkpoint_s=5.0, worker_instance_id=f"bench-{tag}"
    )
    first = second = None
    try:
        asyncio.run(ensure_topics(s))
        asyncio.run(publish(s, events))
        first = Worker(s, tmp / "state-worker-1.log")
        m = first.wait("the state events", lambda m: m.get("metering_detection_events_total", 0)
                       >= len(events), timeout=600)  # fmt: skip
        checkpoints = m.get("metering_detection_checkpoints_total", 0)
        first.wait("a checkpoint", lambda m: m.get("metering_detection_checkpoints_total", 0)
                   > checkpoints, timeout=60)  # fmt: skip
        rss = first.peak_rss_mib()
        keys = first.metrics().get("metering_detection_keys", 0)
        first.stop(signal.SIGKILL)
        t0 = time.time()
        second = Worker(s, tmp / "state-worker-2.log")
        m2 = second.wait("the restore", lambda m: m.get("metering_detection_keys", 0) >= keys,
                         timeout=300)  # fmt: skip
        restored_after = time.time() - t0
        print(f"worker   : peak RSS {rss:.0f} MiB holding {keys:,.0f} keys; after SIGKILL a new "
              f"worker holds them again {restored_after:.1f}s after it was started (its restore "
              f"took {m2.get('metering_detection_restore_seconds', 0):.1f}s, the rest is start-up "
              f"and the group's rebalance)")  # fmt: skip
    finally:
        for w in (first, second):
            if w is not None:
                w.stop()
        asyncio.run(drop_db(base, name))
    return {
        "state_keys": n,
        "bytes_per_key_memory": round(per_key),
        "bytes_per_address_memory": round(per_addr),
        "bytes_per_key_changelog": round(changelog_bytes / (2 * n)),
        "worker_peak_rss_mib": round(rss, 1),
        "restore_seconds": round(m2.get("metering_detection_restore_seconds", 0), 2),
        "restored_after_start_seconds": round(restored_after, 1),
    }


@dataclasses.dataclass
class _Src:
    partition: int
    offset: int


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.anomalies", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--keys", type=int, default=500, help="keys of normal traffic")
    ap.add_argument("--attacks", type=int, default=5, help="attacks per rule")
    ap.add_argument("--history-hours", type=float, default=6.0)
    ap.add_argument(
        "--warmup-minutes",
        type=int,
        default=300,
        help="the rules' warm-up (default a day; shorter here so history is hours)",
    )
    ap.add_argument("--events", type=int, default=200_000, help="throughput run's events")
    ap.add_argument("--users", type=int, default=1000, help="throughput run's users (one key each)")
    ap.add_argument("--state-keys", type=int, default=100_000)
    ap.add_argument(
        "--skip", action="append", default=[], choices=("detection", "throughput", "state")
    )
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)  # fmt: skip
    if args.history_hours * 60 <= args.warmup_minutes:
        ap.error("--history-hours must cover --warmup-minutes")
    base = Settings.from_env()
    tag = f"{datetime.now(UTC):%Y%m%d%H%M%S}-{uuid.uuid4().hex[:6]}"
    results: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if "detection" not in args.skip:
                results["detection"] = detection(base, tag, args, Path(tmp))
            if "throughput" not in args.skip:
                out = Path(tmp) / "pipeline.json"
                pipeline_bench.main(["--events", str(args.events), "--users", str(args.users),
                                     "--detection", "both", "--naive-events", "0",
                                     "--json", str(out)])  # fmt: skip
                results["throughput"] = json.loads(out.read_text())
            if "state" not in args.skip:
                results["state"] = state(base, tag, args, Path(tmp))
    finally:
        asyncio.run(drop_redis_keys(base, f"bench-{tag}"))
        asyncio.run(delete_topics(base, lambda name: tag in name))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
