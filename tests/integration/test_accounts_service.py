"""The accounts service keeps the edges' shared cache in step with PostgreSQL:
an older write never overwrites a newer state, a change whose refresh never
happened leaves no valid entry behind, and a change that fails to commit does
not lock the key out. Real PostgreSQL and Redis, decisions by the real EdgeGuard."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence

import asyncpg
import pytest
import redis.asyncio as aioredis

from metering.accounts import AccountsService, IdentityCache, store
from metering.accounts.cache import NEGATIVE, cache_entry, entry_key
from metering.edge.guard import EdgeGuard
from metering.errors import InputError

PEPPER = b"service-test-pepper"


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture
async def guard(
    pool: asyncpg.Pool, redis_client: aioredis.Redis, redis_prefix: str
) -> AsyncIterator[EdgeGuard]:
    guard = EdgeGuard(redis=redis_client, pool=pool, pepper=PEPPER, prefix=redis_prefix)
    await guard.start()
    yield guard
    await guard.stop()


def service_on(db: asyncpg.Connection | asyncpg.Pool, cache: IdentityCache) -> AccountsService:
    return AccountsService(db, cache=cache, pepper=PEPPER)


async def new_key(service: AccountsService, tier: str = "free") -> tuple[str, str]:
    user = await service.create_user(email=f"{uuid.uuid4().hex[:8]}@example.com", tier=tier)
    new, info = await service.create_key(user=user.id)
    return new.plaintext, info.prefix


class RefreshLost(IdentityCache):
    """The process is gone (or Redis dropped the write) after the commit."""

    async def refresh(self, conn: asyncpg.Connection, key_hashes: Sequence[str]) -> None:
        raise ConnectionError("the refresh after the commit never happened")


async def test_a_lost_refresh_leaves_no_valid_entry(db, pool, guard, redis_client, redis_prefix):
    service = service_on(db, RefreshLost(redis_client, prefix=redis_prefix))
    key, prefix = await new_key(service)
    assert (await guard.check(key, "192.0.2.1")).status is None  # cached as valid
    await service.revoke_key(prefix, reason="leaked")
    # The entry went before the commit: the next check looks the key up again.
    decision = await guard.check(key, "192.0.2.1")
    assert (decision.status, decision.reason) == (401, "unauthorized")
    assert service.cache_failures == 1


async def test_an_older_state_never_overwrites_a_newer_one(
    db, pool, guard, redis_client, redis_prefix
):
    cache = IdentityCache(redis_client, prefix=redis_prefix)
    service = service_on(db, cache)
    key, prefix = await new_key(service)
    key_hash = (await service.get_key(prefix)).key_hash
    stale, stale_version = await store.lookup_identity(db, key_hash)  # read before the revoke
    assert stale is not None
    await service.revoke_key(prefix, reason="leaked")
    # a slower refresh and an edge's fill, both computed from the earlier read
    assert await cache.set(key_hash, stale, stale_version) is False
    assert await cache.fill(key_hash, stale, stale_version) is False
    assert await redis_client.get(entry_key(redis_prefix, key_hash)) == NEGATIVE.encode()
    assert (await guard.check(key, "192.0.2.1")).status == 401


async def test_concurrent_changes_end_in_the_committed_state(
    database_url, db, guard, redis_client, redis_prefix
):
    cache = IdentityCache(redis_client, prefix=redis_prefix)
    conns = [await asyncpg.connect(database_url) for _ in range(3)]
    try:
        services = [service_on(c, cache) for c in conns]
        key, prefix = await new_key(services[0])
        key_hash = (await services[0].get_key(prefix)).key_hash
        user = (await services[0].get_key(prefix)).user_id
        for round_ in range(15):
            await guard.check(key, "192.0.2.1")  # an edge fills the entry meanwhile
            await asyncio.gather(
                services[0].suspend(user),
                services[1].activate(user),
                services[2].set_tier(user, "pro" if round_ % 2 else "free"),
            )
            identity, _ = await store.lookup_identity(db, key_hash)
            cached = await redis_client.get(entry_key(redis_prefix, key_hash))
            expected = cache_entry(identity) if identity else NEGATIVE
            assert cached is not None and cached.decode() == expected, f"round {round_}"
    finally:
        for c in conns:
            await c.close()


async def test_a_change_that_fails_to_commit_does_not_lock_the_key_out(
    db, guard, redis_client, redis_prefix
):
    service = service_on(db, IdentityCache(redis_client, prefix=redis_prefix))
    key, prefix = await new_key(service)
    assert (await guard.check(key, "192.0.2.1")).status is None
    # A deferred constraint fails at COMMIT, after the cache was invalidated.
    await db.execute(
        """
        CREATE FUNCTION refuse_at_commit() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN RAISE EXCEPTION 'refused at commit' USING ERRCODE = '40001'; END $$;
        CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER INSERT ON api_key_events
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_at_commit();
        """
    )
    with pytest.raises(asyncpg.SerializationError):
        await service.revoke_key(prefix, reason="never lands")
    assert (await service.get_key(prefix)).status == "active"
    # the version the failed change recorded is given back: the edge refills
    decision = await guard.check(key, "192.0.2.1")
    assert (decision.status, decision.reason) == (None, "ok")


async def test_set_tier_reaches_the_edge_at_once(db, guard, redis_client, redis_prefix):
    service = service_on(db, IdentityCache(redis_client, prefix=redis_prefix))
    key, prefix = await new_key(service, tier="free")
    before = await guard.check(key, "192.0.2.1")
    assert before.identity is not None and before.identity.tier == "free"
    user = await service.set_tier((await service.get_key(prefix)).user_id, "pro")
    assert user.tier == "pro"
    after = await guard.check(key, "192.0.2.1")
    assert after.identity is not None and after.identity.tier == "pro"
    assert after.identity.rate_limit_per_minute != before.identity.rate_limit_per_minute


class RefreshBroken(IdentityCache):
    """The database connection breaks between the commit and the refresh."""

    async def refresh(self, conn: asyncpg.Connection, key_hashes: Sequence[str]) -> None:
        raise asyncpg.InterfaceError("connection lost after the commit")


async def test_a_committed_rotation_is_reported_even_if_its_refresh_fails(
    db, guard, redis_client, redis_prefix
):
    service = service_on(db, RefreshBroken(redis_client, prefix=redis_prefix))
    key, prefix = await new_key(service)
    assert (await guard.check(key, "192.0.2.1")).status is None
    new, info, old = await service.rotate_key(prefix)  # the new key must be shown
    assert old.status == "rotating" and info.rotated_from == old.id
    assert (await guard.check(new.plaintext, "192.0.2.1")).status is None
    decision = await guard.check(key, "192.0.2.1")  # refilled from the committed state
    assert decision.status is None and decision.identity is not None
    assert decision.identity.status == "rotating"


async def test_a_failed_change_gives_back_the_version_it_replaced(
    db, guard, redis_client, redis_prefix
):
    """Revoke (committed), then a delete that fails at COMMIT: the revoke's
    version stays, so a fill from a read older than the revoke is still refused."""
    cache = IdentityCache(redis_client, prefix=redis_prefix)
    service = service_on(db, cache)
    key, prefix = await new_key(service)
    key_hash = (await service.get_key(prefix)).key_hash
    stale, stale_version = await store.lookup_identity(db, key_hash)
    await service.revoke_key(prefix, reason="leaked")
    await db.execute(
        """
        CREATE FUNCTION refuse_at_commit() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN RAISE EXCEPTION 'refused at commit' USING ERRCODE = '40001'; END $$;
        CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER INSERT ON api_key_events
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_at_commit();
        """
    )
    with pytest.raises(asyncpg.SerializationError):
        await service.delete_key(prefix)
    assert await cache.fill(key_hash, stale, stale_version) is False
    assert (await guard.check(key, "192.0.2.1")).status == 401


async def test_rotation_and_suspension_at_once_do_not_deadlock(
    database_url, db, redis_client, redis_prefix
):
    cache = IdentityCache(redis_client, prefix=redis_prefix)
    a, b = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
    try:
        rotator, admin = service_on(a, cache), service_on(b, cache)
        for _ in range(10):
            _, prefix = await new_key(rotator)
            user = (await rotator.get_key(prefix)).user_id
            results = await asyncio.gather(
                rotator.rotate_key(prefix), admin.suspend(user), return_exceptions=True
            )
            # the suspension may win (then the rotation is refused for it); never a deadlock
            for r in results:
                assert not isinstance(r, Exception) or isinstance(r, InputError), repr(r)
    finally:
        await a.close()
        await b.close()


async def test_probes_of_unknown_keys_leave_no_version_behind(guard, redis_client, redis_prefix):
    from metering import keys

    for _ in range(5):
        assert (await guard.check(keys.generate().plaintext, "192.0.2.7")).status == 401
    versions = [k async for k in redis_client.scan_iter(match=f"{redis_prefix}:keyver:*")]
    assert versions == []
