"""Creating the pipeline's Kafka topics (idempotent)."""

from __future__ import annotations

from collections.abc import Callable

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from metering.errors import ServiceUnavailable
from metering.settings import Settings


def topic_specs(settings: Settings) -> list[NewTopic]:
    rf = settings.replication_factor
    return [
        NewTopic(settings.events_topic, settings.events_partitions, rf),
        # The DLQ keeps records for 30 days so an operator can inspect and replay.
        NewTopic(settings.dlq_topic, 1, rf, topic_configs={"retention.ms": str(30 * 86_400_000)}),
        NewTopic(settings.alerts_topic, 1, rf),
        # The detectors' state, one partition per events partition, compacted
        # (the latest record of each bucket is the state); small segments so
        # compaction keeps it near the size of the live state.
        NewTopic(
            settings.state_topic,
            settings.events_partitions,
            rf,
            topic_configs={
                "cleanup.policy": "compact",
                "segment.bytes": str(64 * 1024 * 1024),
                "segment.ms": str(3_600_000),
                "min.cleanable.dirty.ratio": "0.2",
                "max.compaction.lag.ms": str(6 * 3_600_000),
            },
        ),
    ]


async def ensure_topics(settings: Settings, specs: list[NewTopic] | None = None) -> list[str]:
    """Create missing topics; return the names created by this call."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=15000
    )
    try:
        await admin.start()
    except KafkaError as exc:
        await admin.close()
        raise ServiceUnavailable(
            f"cannot reach Kafka at {settings.kafka_bootstrap}: {exc}"
        ) from exc
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in (specs or topic_specs(settings)) if t.name not in existing]
        created = []
        for spec in missing:
            try:
                await admin.create_topics([spec])
                created.append(spec.name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        await admin.close()


async def delete_topics(settings: Settings, match: Callable[[str], bool]) -> list[str]:
    """Delete the topics whose names ``match`` (benchmarks and tests clean up after
    themselves: a broker holding thousands of stale partitions gets slower)."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=15000
    )
    await admin.start()
    try:
        doomed = sorted(t for t in await admin.list_topics() if match(t))
        if doomed:
            await admin.delete_topics(doomed)
        return doomed
    finally:
        await admin.close()
