"""The detection state's changelog: a compacted Kafka topic.

Partition *p* of the changelog holds the state of partition *p* of
``usage.events``, one record per bucket (key: the bucket number), each the
bucket's whole state and the source offset it covers. Compaction keeps the
latest record of each bucket, so reading a partition from the beginning to
its end restores the state; the offsets tell the detector which replayed
events it already holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from metering.errors import ServiceUnavailable

log = logging.getLogger(__name__)


class Changelog:
    def __init__(self, bootstrap: str, topic: str, *, client_id: str = "metering-detect") -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self._client_id = client_id
        self.producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        self.producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            client_id=self._client_id,
            acks="all",
            linger_ms=20,
            compression_type="gzip",
            max_request_size=4 * 1024 * 1024,
        )
        await self.producer.start()

    async def stop(self) -> None:
        if self.producer is not None:
            await self.producer.stop()
            self.producer = None

    async def write(self, partition: int, records: list[tuple[int, bytes]]) -> None:
        """Every record acknowledged, or :class:`ServiceUnavailable`."""
        assert self.producer is not None
        try:
            acks = [
                await self.producer.send(
                    self.topic, value=value, key=str(bucket).encode(), partition=partition
                )
                for bucket, value in records
            ]
            await asyncio.gather(*acks)
        except KafkaError as exc:
            raise ServiceUnavailable(f"detection changelog write failed: {exc!r}") from exc

    async def read(
        self, partitions: list[int], *, timeout_s: float = 120.0
    ) -> dict[int, list[tuple[int, bytes]]]:
        """Every record of the partitions, oldest first: {partition: [(bucket, value)]}."""
        tps = [TopicPartition(self.topic, p) for p in partitions]
        out: dict[int, list[tuple[int, bytes]]] = {p: [] for p in partitions}
        if not tps:
            return out
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            client_id=f"{self._client_id}-restore",
            enable_auto_commit=False,
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        try:
            await consumer.start()
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            while True:
                behind = [tp for tp in tps if await consumer.position(tp) < ends[tp]]
                if not behind:
                    return out
                if loop.time() > deadline:
                    raise ServiceUnavailable(
                        f"restoring detection state from {self.topic} took over {timeout_s:.0f}s"
                    )
                batch = await consumer.getmany(*behind, timeout_ms=1000, max_records=10_000)
                for tp, msgs in batch.items():
                    for msg in msgs:
                        if msg.key is not None and msg.value is not None:
                            out[tp.partition].append((int(msg.key), msg.value))
        except KafkaError as exc:
            raise ServiceUnavailable(f"detection changelog read failed: {exc!r}") from exc
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()
