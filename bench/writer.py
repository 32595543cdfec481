"""The batch write alone: what the per-key/endpoint histograms cost PostgreSQL.

    python -m bench.writer [--batches 40] [--pairs 3]

One ``UsageWriter`` (one connection, the pipeline's COPY + one statement per
batch) writes ``--batches`` batches of 5,000 realistic events (50 users, two
keys each, the simulator's endpoints and latencies, 6 hours) into a fresh
database, timed from the second batch on. Each pair runs the statement as
shipped and, on another fresh database, the same statement without its
``daily_endpoint_usage`` step (the state before #12), in turn. Reported:
events/s of each and their ratio. This isolates the database's share; the
pipeline end to end (``bench.pipeline``) runs two writers beside decoding,
Kafka and Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from bench.pipeline import create_db, drop_db
from metering.dev.simulate import SimUser, make_event
from metering.settings import Settings
from metering.usage import store
from metering.usage.store import UsageWriter

BATCH = 5_000


def without_histograms(sql: str) -> str:
    """The batch statement minus its per_bucket, per_endpoint and detail steps."""
    start, end = sql.index("), per_bucket AS ("), sql.index("), upserted AS (")
    return sql[:start] + sql[end:]


async def once(batches: int, histograms: bool, seed: int) -> float:
    base = Settings.from_env()
    name = f"bench_writer_{uuid.uuid4().hex[:8]}"
    url = await create_db(base, name)
    shipped = store.INSERT_AND_AGGREGATE
    store.INSERT_AND_AGGREGATE = shipped if histograms else without_histograms(shipped)
    try:
        conn = await asyncpg.connect(url)
        rng = random.Random(seed)
        users = [
            SimUser(uuid.uuid4(), f"u{i}@example.com", "pro", (uuid.uuid4(), uuid.uuid4()),
                    (f"203.0.113.{i % 250 + 1}",), 1 / (i + 1) ** 0.8)
            for i in range(50)
        ]  # fmt: skip
        weights = [u.weight for u in users]
        now = datetime.now(UTC)
        data = [
            [
                make_event(rng, None if rng.random() < 0.05 else rng.choices(users, weights)[0],
                           now - timedelta(seconds=rng.uniform(0, 6 * 3600)))
                for _ in range(BATCH)
            ]
            for _ in range(batches)
        ]  # fmt: skip
        writer = UsageWriter(conn)
        await writer.write(data[0])
        t = time.perf_counter()
        for batch in data[1:]:
            await writer.write(batch)
        took = time.perf_counter() - t
        await conn.close()
        return (batches - 1) * BATCH / took
    finally:
        store.INSERT_AND_AGGREGATE = shipped
        await drop_db(base, name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.writer", description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    ratios = []
    for i in range(args.pairs):
        before = asyncio.run(once(args.batches, False, args.seed))
        after = asyncio.run(once(args.batches, True, args.seed))
        ratios.append(after / before)
        print(f"pair {i + 1}: without histograms {before:,.0f} events/s, with {after:,.0f} "
              f"events/s: {after / before:.2f}x")  # fmt: skip
    print(
        f"ratio median {statistics.median(ratios):.2f}x (spread {min(ratios):.2f}-{max(ratios):.2f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
