"""The edge producer against the real broker."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer

from metering.events import UsageEvent, decode
from metering.producer import UsageProducer
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

    consumer = AIOKafkaConsumer(
        s.events_topic,
        bootstrap_servers=s.kafka_bootstrap,
        auto_offset_reset="earliest",
        group_id=None,
        enable_auto_commit=False,
    )
    await consumer.start()
    got = []
    partitions_by_user: dict[bytes, set[int]] = {}
    try:

        async def all_read() -> bool:
            for msgs in (await consumer.getmany(timeout_ms=500)).values():
                for m in msgs:
                    got.append(decode(m.value))
                    partitions_by_user.setdefault(m.key, set()).add(m.partition)
            return len(got) >= 300

        await eventually(all_read, timeout=30, what="300 events on the topic")
    finally:
        await consumer.stop()
    assert {e.event_id for e in got} == {e.event_id for e in sent}
    assert set(partitions_by_user) == {str(u).encode() for u in users}
    assert all(len(p) == 1 for p in partitions_by_user.values())  # one user, one partition


async def test_emit_never_blocks_and_counts_drops_when_kafka_is_unreachable():
    # Nothing listens on port 1: the buffer fills and further events are dropped, counted.
    producer = UsageProducer(bootstrap_servers="127.0.0.1:1", buffer_size=10, retry_backoff_s=0.05)
    await producer.start()
    results = [producer.emit(an_event()) for _ in range(15)]
    assert results.count(True) == 10 and results.count(False) == 5
    assert producer.stats.dropped == 5 and producer.buffered == 10
    await producer.stop(timeout=0.2)
