"""The edge producer against the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import uuid
from datetime import UTC, datetime

import psutil
import pytest
from aiokafka import AIOKafkaConsumer

from metering.edge.producer import MAX_DELIVERY_FAILURES, UsageProducer
from metering.errors import InvalidEventError
from metering.events import UsageEvent, decode
from tests.integration.conftest import eventually


def an_event(user: uuid.UUID | None = None) -> UsageEvent:
    return UsageEvent.new(
        user_id=user or uuid.uuid4(),
        api_key_id=None,
        endpoint="/v1/p",
        method="GET",
        status_code=200,
        response_time_ms=1.0,
        client_ip="192.0.2.1",
        occurred_at=datetime.now(UTC),
    )


async def test_events_are_keyed_by_user_and_flushed_on_stop(kafka_settings):
    s = kafka_settings
    users = [uuid.uuid4() for _ in range(3)]
    sent = [an_event(users[i % 3]) for i in range(300)]
    producer = UsageProducer(bootstrap_servers=s.kafka_bootstrap, topic=s.events_topic)
    await producer.start()
    for e in sent:
        assert producer.emit(e)
    await producer.stop()  # must flush everything buffered
    assert producer.stats.sent == 300 and producer.stats.dropped == 0

    records = await read_topic(s, 300)
    got = [decode(m.value) for m in records]
    partitions_by_user: dict[bytes, set[int]] = {}
    for m in records:
        partitions_by_user.setdefault(m.key, set()).add(m.partition)
    assert len(got) == 300
    assert {e.event_id for e in got} == {e.event_id for e in sent}
    assert set(partitions_by_user) == {str(u).encode() for u in users}
    assert all(len(p) == 1 for p in partitions_by_user.values())  # one user, one partition


async def test_emit_never_blocks_and_counts_drops_when_kafka_is_unreachable(caplog):
    # Nothing listens on port 1: the buffer fills and further events are dropped, counted.
    producer = UsageProducer(bootstrap_servers="127.0.0.1:1", buffer_size=10, retry_backoff_s=0.05)
    await producer.start()
    results = [producer.emit(an_event()) for _ in range(15)]
    assert results.count(True) == 10 and results.count(False) == 5
    assert producer.stats.dropped == 5 and producer.buffered == 10
    assert_accounts(producer)
    await producer.stop(timeout=0.2)
    # what stop() could not send is lost with the process: counted and logged
    st = producer.stats
    assert (st.emitted, st.sent, st.dropped, st.abandoned) == (15, 0, 15, 10)
    assert producer.buffered == 0
    assert "10 usage events unsent" in caplog.text


async def test_refused_requests_cannot_push_billable_events_out(caplog):
    """A flood of refused, unidentified requests while Kafka is away fills only
    its own budget: the billable events still fit."""
    producer = UsageProducer(
        bootstrap_servers="127.0.0.1:1",
        buffer_size=10,
        unbilled_buffer_size=5,
        retry_backoff_s=0.05,
    )
    await producer.start()
    flood = [
        UsageEvent.new(
            user_id=None,
            api_key_id=None,
            endpoint="/v1/p",
            method="GET",
            status_code=401,
            response_time_ms=0.1,
            client_ip="198.51.100.1",
            rejected="missing_key",
        )
        for _ in range(100)
    ]
    assert [producer.emit(e) for e in flood].count(True) == 5
    assert all(producer.emit(an_event()) for _ in range(10))  # the billable budget is whole
    assert not producer.emit(an_event())
    st = producer.stats
    assert (st.dropped, st.dropped_unbilled, producer.buffered) == (96, 95, 15)
    assert_accounts(producer)
    await producer.stop(timeout=0.2)
    assert_accounts(producer)


def assert_accounts(producer: UsageProducer) -> None:
    st = producer.stats
    assert st.emitted == st.sent + st.dropped + producer.buffered, st


def kafka_broker_pid(port: int) -> int:
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return conn.pid
    raise AssertionError(f"no process listens on the Kafka port {port}")


@contextlib.contextmanager
def broker_frozen(s):
    """The real broker stops answering (SIGSTOP) until the block ends (SIGCONT)."""
    pid = kafka_broker_pid(int(s.kafka_bootstrap.rsplit(":", 1)[1]))
    # a watchdog that outlives this process: a hung or killed test must not
    # leave the session's only broker stopped
    watchdog = subprocess.Popen(
        ["sh", "-c", f"sleep 30; kill -CONT {pid}"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
        os.killpg(watchdog.pid, signal.SIGKILL)
        watchdog.wait()


async def read_topic(s, expected: int) -> list:
    consumer = AIOKafkaConsumer(
        s.events_topic,
        bootstrap_servers=s.kafka_bootstrap,
        auto_offset_reset="earliest",
        group_id=None,
        enable_auto_commit=False,
    )
    await consumer.start()
    got: list = []
    try:

        async def all_read() -> bool:
            for msgs in (await consumer.getmany(timeout_ms=500)).values():
                got.extend(msgs)
            return len(got) >= expected

        await eventually(all_read, timeout=30, what=f"{expected} records on the topic")
        await asyncio.sleep(1)  # anything beyond the expected would show up now
        for msgs in (await consumer.getmany(timeout_ms=500)).values():
            got.extend(msgs)
    finally:
        await consumer.stop()
    return got


async def test_events_emitted_while_the_broker_is_away_are_sent_once_when_it_is_back(
    kafka_settings,
):
    s = kafka_settings
    producer = UsageProducer(
        bootstrap_servers=s.kafka_bootstrap, topic=s.events_topic, retry_backoff_s=0.1
    )
    await producer.start()
    before = [an_event() for _ in range(50)]
    during = [an_event() for _ in range(300)]
    try:
        for e in before:
            assert producer.emit(e)
        await producer.flush(timeout=30)
        assert producer.stats.sent == 50
        with broker_frozen(s):
            for e in during:
                assert producer.emit(e)
            await asyncio.sleep(2)
            assert producer.stats.sent == 50 and producer.buffered == 300
            assert_accounts(producer)
        await producer.flush(timeout=60)
    finally:
        await producer.stop()
    st = producer.stats
    assert (st.emitted, st.sent, st.dropped, producer.buffered) == (350, 350, 0, 0)
    got = await read_topic(s, 350)
    assert len(got) == 350  # no duplicates from the retries
    assert {decode(m.value).event_id for m in got} == {e.event_id for e in before + during}


async def test_stop_while_the_broker_is_away_counts_what_it_abandons(kafka_settings, caplog):
    s = kafka_settings
    producer = UsageProducer(
        bootstrap_servers=s.kafka_bootstrap, topic=s.events_topic, retry_backoff_s=0.1
    )
    await producer.start()
    try:
        assert producer.emit(an_event())
        await producer.flush(timeout=30)
        with broker_frozen(s):
            for _ in range(20):
                assert producer.emit(an_event())
            await producer.stop(timeout=1)
            st = producer.stats
            assert (st.emitted, st.sent, st.dropped, st.abandoned) == (21, 1, 20, 20)
            assert producer.buffered == 0
            assert "20 usage events unsent" in caplog.text
    finally:
        await producer.stop()
    assert_accounts(producer)


async def test_an_oversized_event_is_refused_at_emit_and_counted():
    """Events built without validation (as the middleware does) can still be
    too large for the contract: refused at once, counted as dropped."""
    producer = UsageProducer(bootstrap_servers="127.0.0.1:1", retry_backoff_s=0.05)
    big = UsageEvent(
        event_id=uuid.uuid4(),
        occurred_at=datetime.now(UTC),
        user_id=uuid.uuid4(),
        api_key_id=None,
        endpoint="/" + "x" * 20_000,
        method="GET",
        status_code=200,
        response_time_ms=1.0,
        client_ip="192.0.2.1",
    )
    await producer.start()
    try:
        with pytest.raises(InvalidEventError) as err:
            producer.emit(big)
        assert err.value.reason == "too_large"
        assert producer.emit(an_event())
        st = producer.stats
        assert (st.emitted, st.dropped, producer.buffered) == (2, 1, 1)
        assert_accounts(producer)
    finally:
        await producer.stop(timeout=0.2)


async def test_a_topic_that_refuses_the_events_does_not_loop_forever(kafka_settings, caplog):
    """The idempotent producer retries transient failures itself; a refusal
    that never heals (records over the topic's max.message.bytes) is retried a
    bounded number of times, then dropped, counted and logged."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    s = kafka_settings
    topic = f"{s.events_topic}.tiny"
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, 1, 1, topic_configs={"max.message.bytes": "200"})]
        )
    finally:
        await admin.close()
    producer = UsageProducer(
        bootstrap_servers=s.kafka_bootstrap, topic=topic, retry_backoff_s=0.05, linger_ms=0
    )
    await producer.start()
    try:
        for _ in range(3):
            assert producer.emit(an_event())  # each ~350 bytes

        async def given_up() -> bool:
            return producer.stats.dropped == 3

        await eventually(given_up, timeout=30, what="the refused events to be dropped")
        st = producer.stats
        assert (st.sent, producer.buffered) == (0, 0)
        assert st.retried == 3 * (MAX_DELIVERY_FAILURES - 1)
        assert_accounts(producer)
        assert "usage events dropped: Kafka refused them" in caplog.text
    finally:
        await producer.stop(timeout=1)
