"""Limiter benchmark: metering's GCRA limiter vs the `limits` library, same Redis.

    python -m bench.limiter [--seconds 5]

Throughput: checks/s with 1 caller and with 64 concurrent callers in one
process, for metering.RateLimiter and for limits' moving-window and
sliding-window-counter strategies (redis-py asyncio storage). Keys rotate
over 1,000 buckets of 1,000/minute so nothing is ever denied (denials are
cheaper; we measure the allow path).

Accuracy (limit 10 per 2 s), two patterns, each on fresh keys:
* boundary burst: 10 requests just before a 2-second boundary, 10 just after
  (a fixed window admits 20; ideal is 10);
* sustained overload: one request every 20 ms for 6 s (300 requests); we
  report the most admitted in any 2-second sliding window (ideal 10) and
  the total (ideal ~30 plus the initial burst).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis.asyncio as aioredis
from limits import RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

from metering.redis.limiter import RateLimiter
from metering.settings import Settings

Check = Callable[[str], Awaitable[bool]]


async def throughput(check: Check, callers: int, seconds: float) -> float:
    done = 0
    stop_at = time.perf_counter() + seconds

    async def caller(n: int) -> None:
        nonlocal done
        i = n
        while time.perf_counter() < stop_at:
            await check(f"k{i % 1000}")
            i += callers
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller(n) for n in range(callers)))
    return done / (time.perf_counter() - started)


async def boundary_burst(check: Check) -> int:
    # wait until 1.9 s into a 2 s window (fixed windows align to the epoch)
    await asyncio.sleep((1.9 - time.time() % 2) % 2)
    allowed = [await check("burst") for _ in range(10)]
    await asyncio.sleep((2.05 - time.time() % 2) % 2)
    allowed += [await check("burst") for _ in range(10)]
    return sum(allowed)


async def sustained(check: Check) -> tuple[int, int]:
    admitted: list[float] = []
    start = time.perf_counter()
    for i in range(300):
        target = start + i * 0.02
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if await check("steady"):
            admitted.append(time.perf_counter())
    worst = 0
    j = 0
    for i, t in enumerate(admitted):
        while admitted[j] < t - 2.0:
            j += 1
        worst = max(worst, i - j + 1)
    return worst, len(admitted)


def contenders(redis_url: str, tag: str) -> dict[str, tuple[Check, Check]]:
    """name -> (fast check at 1000/min, accuracy check at 10 per 2 s)."""
    client = aioredis.from_url(redis_url)
    ours = RateLimiter(client, prefix=f"bench-{tag}:metering")
    storage = RedisStorage(
        redis_url.replace("redis://", "async+redis://"), implementation="redispy"
    )
    moving = MovingWindowRateLimiter(storage)
    sliding = SlidingWindowCounterRateLimiter(storage)
    per_min = RateLimitItemPerMinute(1000)
    per_2s = RateLimitItemPerSecond(10, 2)

    def lim(
        strategy: MovingWindowRateLimiter | SlidingWindowCounterRateLimiter, item, name: str
    ) -> Check:  # type: ignore[no-untyped-def]
        async def check(key: str) -> bool:
            return bool(await strategy.hit(item, f"bench-{tag}", name, key))

        return check

    async def ours_fast(key: str) -> bool:
        return (await ours.hit(key, limit=1000, period_s=60)).allowed

    async def ours_acc(key: str) -> bool:
        return (await ours.hit("acc-" + key, limit=10, period_s=2)).allowed

    return {
        "metering GCRA (coalesced)": (ours_fast, ours_acc),
        "limits moving window": (lim(moving, per_min, "mw"), lim(moving, per_2s, "mw-acc")),
        "limits sliding window counter": (
            lim(sliding, per_min, "swc"),
            lim(sliding, per_2s, "swc-acc"),
        ),
    }


async def run(seconds: float) -> dict[str, dict[str, float]]:
    s = Settings.from_env()
    tag = uuid.uuid4().hex[:8]
    results: dict[str, dict[str, float]] = {}
    for name, (fast, acc) in contenders(s.redis_url, tag).items():
        await fast("warm-up")
        one = await throughput(fast, 1, seconds)
        many = await throughput(fast, 64, seconds)
        burst = await boundary_burst(acc)
        worst, total = await sustained(acc)
        results[name] = {
            "checks_s_1": one,
            "checks_s_64": many,
            "boundary_burst_admitted": burst,
            "max_in_any_2s": worst,
            "sustained_admitted": total,
        }
        print(
            f"{name:<32} 1 caller {one:>8,.0f}/s   64 callers {many:>8,.0f}/s   "
            f"boundary burst {burst:>2} (ideal 10)   sustained: max {worst:>2} in any 2 s, "
            f"{total} admitted of 300",
            flush=True,
        )
    client = aioredis.from_url(s.redis_url)
    keys = [k async for k in client.scan_iter(match=f"*bench-{tag}*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.limiter", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="per throughput measurement")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.seconds <= 0:
        ap.error("--seconds must be > 0")
    results = asyncio.run(run(args.seconds))
    ours = results["metering GCRA (coalesced)"]["checks_s_64"]
    best = max(v["checks_s_64"] for k, v in results.items() if k.startswith("limits"))
    print(f"ratio at 64 callers vs the faster limits strategy: {ours / best:.1f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
