"""The GCRA limiter against real Redis."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import DataError

from metering.redis.limiter import RateLimiter


@pytest.fixture
async def limiter(redis_client, redis_prefix):
    limiter = RateLimiter(redis_client, prefix=redis_prefix)
    yield limiter
    await limiter.aclose()


async def test_burst_then_steady_rate(limiter):
    results = [await limiter.hit("k", limit=5, period_s=1) for _ in range(6)]
    assert [r.allowed for r in results] == [True] * 5 + [False]
    assert [r.remaining for r in results[:5]] == [4, 3, 2, 1, 0]
    denied = results[-1]
    assert 0 < denied.retry_after_s <= 0.2  # one request every 200 ms
    assert (await limiter.peek("k", limit=5, period_s=1)).allowed is False
    await asyncio.sleep(denied.retry_after_s + 0.02)
    assert (await limiter.peek("k", limit=5, period_s=1)).allowed  # peek uses nothing
    assert (await limiter.hit("k", limit=5, period_s=1)).allowed
    assert not (await limiter.hit("k", limit=5, period_s=1)).allowed


async def test_never_more_than_limit_across_a_window_boundary(limiter):
    first = [await limiter.hit("b", limit=10, period_s=60) for _ in range(10)]
    second = [await limiter.hit("b", limit=10, period_s=60) for _ in range(10)]
    assert all(r.allowed for r in first)
    assert not any(r.allowed for r in second)  # unlike a fixed window, no second burst


async def test_concurrent_checks_share_one_round_trip(limiter):
    before = limiter.round_trips
    results = await asyncio.gather(*(limiter.hit("c", limit=50, period_s=60) for _ in range(64)))
    assert limiter.round_trips - before == 2  # the first at once, the other 63 together
    assert sum(r.allowed for r in results) == 50  # exactly the limit, even when concurrent


async def test_cancelling_the_batch_leader_does_not_strand_its_followers(limiter):
    before = limiter.round_trips
    tasks = [asyncio.create_task(limiter.hit(f"x{i}", limit=5, period_s=60)) for i in range(8)]
    # One loop step: task 0 finds the wire idle and sends alone; task 1 finds
    # it busy and leads a batch (yielding once for company); tasks 2-7 join it.
    await asyncio.sleep(0)
    leader, followers = tasks[1], [tasks[0], *tasks[2:]]
    leader.cancel()  # while it gathers: it has not sent the batch yet
    done = await asyncio.wait_for(asyncio.gather(*followers), timeout=5)
    assert all(r.allowed for r in done)
    assert leader.cancelled()
    assert limiter.round_trips - before == 2  # task 0 alone, then the leader's batch


async def test_a_bad_key_fails_its_own_check_and_no_other(limiter):
    """An exhausted bucket stays exhausted after a call that could not be sent,
    alone or inside a coalesced batch, and nobody waits forever."""
    assert (await limiter.hit("a", limit=1, period_s=60)).allowed
    with pytest.raises(DataError):
        await limiter.hit("lone \ud800", limit=1, period_s=60)
    assert not (await limiter.hit("a", limit=1, period_s=60)).allowed
    results = await asyncio.wait_for(
        asyncio.gather(
            *(limiter.hit("a", limit=1, period_s=60) for _ in range(5)),
            limiter.hit("bad \udfff", limit=1, period_s=60),
            *(limiter.hit(f"fresh-{i}", limit=1, period_s=60) for i in range(5)),
            return_exceptions=True,
        ),
        timeout=10,
    )
    assert [r.allowed for r in results[:5]] == [False] * 5
    assert isinstance(results[5], DataError)
    assert [r.allowed for r in results[6:]] == [True] * 5


async def test_cost_is_honoured_and_bad_arguments_refused(limiter):
    r = await limiter.hit("c", limit=10, period_s=60, cost=4)
    assert r.allowed and r.remaining == 6
    assert not (await limiter.hit("c", limit=10, period_s=60, cost=7)).allowed  # all or nothing
    r = await limiter.hit("c", limit=10, period_s=60, cost=6)
    assert r.allowed and r.remaining == 0
    assert not (await limiter.peek("c", limit=10, period_s=60)).allowed
    for kwargs in (
        {"cost": 11},
        {"cost": 0},
        {"cost": True},
        {"cost": 2.5},
        {"period_s": 0.0004},
        {"limit": 0},
        {"limit": 1.5},
    ):
        args = {"limit": 10, "period_s": 60, **kwargs}
        with pytest.raises(ValueError):
            await limiter.hit("d", **args)  # type: ignore[arg-type]
