"""Edge overhead: a trivial endpoint with and without the metering middleware.

    python -m bench.edge [--slices 12] [--slice-seconds 5] [--rate 1000]

Both apps run in uvicorn (one process each, same flags, same core) at the
same time, taking turns under load, against the real stack (the metered one
verifies a real key, runs the limits/quota script on Redis and emits a usage
event to Kafka per request).
The load tool is the same for both: vegeta (Go; installed into .stack/bin
with ``go install`` on first use), keep-alive connections.

* steady: constant-rate attacks at ``--rate`` req/s in ``--slices`` slices
  of ``--slice-seconds``, the apps alternating; p50/p90/p99/max latency over
  all slices of each app, and the p99 difference per slice;
* max: as fast as 32 connections go for ``--max-seconds``; reports req/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from bench.pipeline import create_db, drop_db, drop_redis_keys
from metering.accounts import AccountsService
from metering.db import connect
from metering.kafka import delete_topics, ensure_topics
from metering.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


VEGETA_VERSION = "v12.12.0"
# The server and the load tool on different cores, so neither steals the
# other's CPU (Redis and Kafka float); taskset is in util-linux.
PIN_SERVER: list[str] = ["taskset", "-c", "0"] if shutil.which("taskset") else []
PIN_CLIENT: list[str] = ["taskset", "-c", "1"] if shutil.which("taskset") else []


def vegeta() -> str:
    """The load tool: vegeta (constant-rate HTTP load), installed with `go install` once."""
    found = shutil.which("vegeta")
    if found:
        return found
    local = Path(".stack/bin/vegeta").resolve()
    if not local.exists():
        if shutil.which("go") is None:
            raise SystemExit(
                "the edge benchmark needs vegeta (go install github.com/tsenart/vegeta/v12)"
            )
        print("installing vegeta with go install (once) ...", flush=True)
        subprocess.run(
            ["go", "install", f"github.com/tsenart/vegeta/v12@{VEGETA_VERSION}"],
            env={**os.environ, "GOBIN": str(local.parent)},
            check=True,
        )
    return str(local)


def _attack_cmd(
    port: int, key: str | None, *, rate: float, seconds: float, workers: int
) -> tuple[list[str], bytes]:
    target = f"GET http://127.0.0.1:{port}/ping\n" + (f"X-API-Key: {key}\n" if key else "")
    cmd = [
        *PIN_CLIENT,
        vegeta(),
        "attack",
        f"-rate={rate:g}/s" if rate else "-rate=0",
        f"-duration={seconds}s",
        "-keepalive=true",
        f"-workers={workers}",
    ]
    if not rate:
        cmd.append(f"-max-workers={workers}")
    return cmd, target.encode()


def attack_raw(
    port: int, key: str | None, *, rate: float, seconds: float, workers: int = 64
) -> bytes:
    """vegeta's raw results. rate > 0: open loop at that rate; 0: as fast as `workers` go."""
    cmd, target = _attack_cmd(port, key, rate=rate, seconds=seconds, workers=workers)
    return subprocess.run(cmd, input=target, capture_output=True, check=True).stdout


def report(*raw_files: Path) -> dict[str, float]:
    """One report over the results of one or more attacks (latencies pooled)."""
    out = subprocess.run(
        [vegeta(), "report", "-type=json", *map(str, raw_files)], capture_output=True, check=True
    )
    r = json.loads(out.stdout)
    lat = r["latencies"]
    return {
        "achieved_rps": r["throughput"],
        "p50_ms": lat["50th"] / 1e6,
        "p90_ms": lat["90th"] / 1e6,
        "p99_ms": lat["99th"] / 1e6,
        "max_ms": lat["max"] / 1e6,
        "success": r["success"],
        "requests": r["requests"],
    }


def start_server(factory: str, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            *PIN_SERVER,
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            f"bench.edge_app:{factory}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--no-proxy-headers",
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            if proc.poll() is not None:
                err = proc.stderr.read().decode()[-2000:] if proc.stderr else ""
                raise SystemExit(f"{factory} server died: {err}") from None
            time.sleep(0.2)
    raise SystemExit(f"{factory} server did not start")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


async def cleanup(base: Settings, db_name: str, tag: str) -> None:
    """Drop what the run made: its database, topics and Redis keys."""
    await drop_db(base, db_name)
    await delete_topics(base, lambda name: tag in name)
    await drop_redis_keys(base, f"bench-edge-{tag}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.edge", description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=12, help="steady-rate slices per app")
    ap.add_argument("--slice-seconds", type=float, default=5.0)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--max-seconds", type=float, default=10.0, help="max-throughput run per app")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.slice_seconds <= 0 or args.rate <= 0 or args.slices < 1 or args.max_seconds <= 0:
        ap.error("--slice-seconds, --rate and --max-seconds must be > 0, --slices >= 1")

    base = Settings.from_env()
    tag = f"{datetime.now(UTC):%Y%m%d%H%M%S}_{uuid.uuid4().hex[:6]}"
    db_name = f"bench_edge_{tag}"

    async def setup() -> tuple[Settings, str]:
        url = await create_db(base, db_name)
        s = Settings.from_env(
            database_url=url,
            events_topic=f"bench.edge.{tag}",
            dlq_topic=f"bench.edge.{tag}.dlq",
            alerts_topic=f"bench.edge.{tag}.alerts",
            redis_key_prefix=f"bench-edge-{tag}",
        )
        await ensure_topics(s)
        conn = await connect(url)
        try:
            service = AccountsService(conn, cache=None, pepper=None)
            await service.create_tier(
                name="bench", daily_quota=None, rate_limit_per_minute=1_000_000_000
            )
            user = await service.create_user(email="bench@example.com", tier="bench")
            new, _ = await service.create_key(user=user.id)
        finally:
            await conn.close()
        return s, new.plaintext

    s, key = asyncio.run(setup())
    env = dict(os.environ)
    for f in s.__dataclass_fields__:
        env[f"METERING_{f.upper()}"] = str(getattr(s, f))
    apps = {"without middleware": ("plain", None), "with middleware": ("metered", key)}
    ports = {name: free_port() for name in apps}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    results: dict[str, dict[str, float]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-edge-") as tmp:
            for name, (factory, k) in apps.items():
                procs[name] = start_server(factory, ports[name], env)
                attack_raw(ports[name], k, rate=0, seconds=1, workers=8)  # warm-up, fills caches
            # Steady rate: short slices, the two apps taking turns (order flipped
            # every slice), latencies pooled per app. A stall of the machine
            # (other processes, the hypervisor) lands on both alike instead of
            # deciding a whole run.
            files: dict[str, list[Path]] = {name: [] for name in apps}
            slice_p99: dict[str, list[float]] = {name: [] for name in apps}
            for i in range(args.slices):
                order = list(apps) if i % 2 == 0 else list(reversed(apps))
                for name in order:
                    f = Path(tmp) / f"{apps[name][0]}-{i}.bin"
                    f.write_bytes(
                        attack_raw(
                            ports[name], apps[name][1], rate=args.rate, seconds=args.slice_seconds
                        )
                    )
                    files[name].append(f)
                    slice_p99[name].append(report(f)["p99_ms"])
                a, b = slice_p99["without middleware"][-1], slice_p99["with middleware"][-1]
                print(
                    f"slice {i + 1:>2}/{args.slices}: p99 {a:.2f} ms without, {b:.2f} ms with middleware ({b - a:+.2f})",
                    flush=True,
                )
            for name in apps:
                results[name] = report(*files[name])
            for name, (_, k) in apps.items():
                raw = attack_raw(ports[name], k, rate=0, seconds=args.max_seconds, workers=32)
                f = Path(tmp) / f"max-{apps[name][0]}.bin"
                f.write_bytes(raw)
                results[name]["max_rps"] = report(f)["achieved_rps"]
    finally:
        for proc in procs.values():
            stop_server(proc)
        asyncio.run(cleanup(base, db_name, tag))

    a, b = results["without middleware"], results["with middleware"]
    secs = args.slices * args.slice_seconds
    for name, r in results.items():
        print(
            f"{name:<20} at {args.rate:,.0f} req/s for {secs:g} s ({r['requests']:,.0f} requests, "
            f"{100 * r['success']:.1f}% 2xx): p50 {r['p50_ms']:.2f} ms  p90 {r['p90_ms']:.2f} ms  "
            f"p99 {r['p99_ms']:.2f} ms  max {r['max_ms']:.2f} ms | max {r['max_rps']:,.0f} req/s"
        )
    deltas = sorted(
        m - p
        for p, m in zip(slice_p99["without middleware"], slice_p99["with middleware"], strict=True)
    )
    print(
        f"middleware adds p50 {b['p50_ms'] - a['p50_ms']:+.2f} ms, p99 {b['p99_ms'] - a['p99_ms']:+.2f} ms "
        f"at {args.rate:,.0f} req/s (pooled); per slice p99 added: median {statistics.median(deltas):+.2f} ms, "
        f"{sum(d <= 1.0 for d in deltas)}/{len(deltas)} slices within 1 ms; "
        f"max throughput {b['max_rps']:,.0f} vs {a['max_rps']:,.0f} req/s ({b['max_rps'] / a['max_rps']:.2f}x)"
    )
    if args.json:
        args.json.write_text(json.dumps({"pooled": results, "slice_p99": slice_p99}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
