"""Edge overhead: a trivial endpoint with and without the metering middleware.

    python -m bench.edge [--seconds 10] [--rate 1000]

Both apps run in the same uvicorn (one process, same flags), one after the
other, against the real stack (the metered one verifies a real key, runs the
limits/quota script on Redis and emits a usage event to Kafka per request).
The load tool is the same for both: vegeta (Go; installed into .stack/bin
with ``go install`` on first use), keep-alive connections.

* steady: a constant-rate attack at ``--rate`` req/s for ``--seconds``;
  reports p50/p90/p99/max latency;
* max: as fast as 32 connections go for ``--seconds``; reports req/s.
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
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from bench.pipeline import create_db, drop_db
from metering.db import accounts, connect
from metering.settings import Settings
from metering.topics import ensure_topics


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


def attack(
    port: int, key: str | None, *, rate: float, seconds: float, workers: int = 64
) -> dict[str, float]:
    """rate > 0: open loop at that rate; rate == 0: as fast as `workers` connections go."""
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
    raw = subprocess.run(cmd, input=target.encode(), capture_output=True, check=True).stdout
    report = subprocess.run(
        [vegeta(), "report", "-type=json"], input=raw, capture_output=True, check=True
    )
    r = json.loads(report.stdout)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.edge", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--repeat", type=int, default=3, help="rounds, plain and metered alternating")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.rate <= 0 or args.repeat < 1:
        ap.error("--seconds and --rate must be > 0, --repeat >= 1")

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
            await accounts.create_tier(
                conn, name="bench", daily_quota=None, rate_limit_per_minute=1_000_000_000
            )
            user = await accounts.create_user(conn, email="bench@example.com", tier="bench")
            new, _ = await accounts.create_key(conn, user=user.id, pepper=None)
        finally:
            await conn.close()
        return s, new.plaintext

    s, key = asyncio.run(setup())
    env = dict(os.environ)
    for f in s.__dataclass_fields__:
        env[f"METERING_{f.upper()}"] = str(getattr(s, f))
    runs: dict[str, list[dict[str, float]]] = {"without middleware": [], "with middleware": []}
    try:
        for round_ in range(1, args.repeat + 1):
            for name, factory, k in (
                ("without middleware", "plain", None),
                ("with middleware", "metered", key),
            ):
                port = free_port()
                proc = start_server(factory, port, env)
                try:
                    attack(port, k, rate=0, seconds=1, workers=8)  # warm-up (fills the key cache)
                    top = attack(port, k, rate=0, seconds=args.seconds, workers=32)["achieved_rps"]
                    st = attack(port, k, rate=args.rate, seconds=args.seconds)
                finally:
                    stop_server(proc)
                runs[name].append({"max_rps": top, **st})
                print(
                    f"round {round_} {name:<20} max {top:>7,.0f} req/s | at {args.rate:,.0f} req/s: "
                    f"p50 {st['p50_ms']:.2f} ms  p90 {st['p90_ms']:.2f} ms  p99 {st['p99_ms']:.2f} ms  "
                    f"max {st['max_ms']:.2f} ms  ({st['achieved_rps']:,.0f} req/s, "
                    f"{100 * st['success']:.1f}% 2xx)",
                    flush=True,
                )
        med = {
            name: {m: statistics.median(r[m] for r in rs) for m in rs[0]}
            for name, rs in runs.items()
        }
        a, b = med["without middleware"], med["with middleware"]
        p99_deltas = [
            m["p99_ms"] - p["p99_ms"]
            for p, m in zip(runs["without middleware"], runs["with middleware"], strict=True)
        ]
        print(
            f"median of {args.repeat}: middleware adds p50 {b['p50_ms'] - a['p50_ms']:+.2f} ms, "
            f"p99 {b['p99_ms'] - a['p99_ms']:+.2f} ms at {args.rate:,.0f} req/s "
            f"(per round: {', '.join(f'{d:+.2f}' for d in p99_deltas)} ms); "
            f"max throughput {b['max_rps']:,.0f} vs {a['max_rps']:,.0f} req/s ({b['max_rps'] / a['max_rps']:.2f}x)"
        )
        if args.json:
            args.json.write_text(json.dumps({"runs": runs, "median": med}, indent=2))
    finally:
        asyncio.run(drop_db(base, db_name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
