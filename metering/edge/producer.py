"""Usage event producer for edge services.

``emit()`` is synchronous and never blocks the request path: it validates
the size and puts the event in a bounded in-memory buffer. A background task
drains the buffer into an idempotent aiokafka producer (``acks=all``, one
produce request per ``linger_ms``), keyed by ``user_id`` so one worker owns
each user's counters.

When Kafka is unreachable the buffer holds events and sends are retried with
backoff for as long as it takes. Events are dropped, and every drop is
counted (``stats.dropped``), only when the buffer is full, when an event is
over the contract's size, when Kafka refuses a delivery for good (a
non-retriable error, ``MAX_DELIVERY_FAILURES`` times) or at ``stop()``.
``stop()`` flushes what is buffered, bounded by a timeout; whatever it could
not send is counted as dropped (and as ``stats.abandoned``) and logged, so
at every moment

    emitted == sent + dropped + buffered

where ``buffered`` includes the events handed to Kafka and not yet
acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

from metering.edge.summary import RefusedSummary
from metering.errors import InvalidEventError
from metering.events import MAX_RECORD_BYTES, UsageEvent

log = logging.getLogger(__name__)

T = TypeVar("T")
# (key, value, billable); a None value is a tombstone. Billable events (a
# user's served requests) and the rest (refused, anonymous) have separate
# buffer budgets: a flood of refused requests cannot push billable ones out.
_Item = tuple[bytes, bytes | None, bool]
_DRAIN = 10_000  # events handed to aiokafka per round at most
# A delivery Kafka refuses with a non-retriable error (a topic that refuses the
# records) is tried this many times, then its events are dropped, counted.
# Retriable failures (no leader, timeouts) are retried for as long as it takes.
MAX_DELIVERY_FAILURES = 5
SUMMARY_FLUSH_S = 1.0  # how often summaries that are due go out


@dataclass(slots=True)
class ProducerStats:
    emitted: int = 0  # every event offered to emit()/emit_raw()
    sent: int = 0  # acknowledged by the broker
    dropped: int = 0  # never sent: buffer full, too large, emitted while stopping, abandoned
    abandoned: int = 0  # of dropped: still held when stop() ran out of time
    retried: int = 0  # send attempts that failed and were put back
    send_errors: int = 0
    dropped_unbilled: int = 0  # of dropped: refused or anonymous requests' events
    summarised: int = 0  # refused requests folded into summary records


class UsageProducer:
    def __init__(
        self,
        *,
        bootstrap_servers: str,
        topic: str = "usage.events",
        buffer_size: int = 100_000,
        unbilled_buffer_size: int = 10_000,
        summary: RefusedSummary | None = None,
        linger_ms: int = 100,
        max_batch_bytes: int = 256 * 1024,
        client_id: str = "metering-edge",
        retry_backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
    ) -> None:
        self._bootstrap = bootstrap_servers
        self._topic = topic
        # bounded by the two budgets below (retries re-queue what is already held)
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._budget = buffer_size
        self._unbilled_budget = unbilled_buffer_size
        self._linger_ms = linger_ms
        self._max_batch_bytes = max_batch_bytes
        self._client_id = client_id
        self._backoff = retry_backoff_s
        self._max_backoff = max_backoff_s
        self._kafka: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._partitioner = DefaultPartitioner()
        self._partition_of: dict[bytes, int] = {}  # murmur2 is pure Python: remember it per key
        self._partition_count = 0
        self._closing = False
        self._held = 0  # accepted, not yet acknowledged or dropped (queue + in flight)
        self._held_unbilled = 0  # of those, events nobody is billed for
        self._summary = summary
        self._summarising: asyncio.Task[None] | None = None
        self._failures: dict[int, int] = {}  # id(item) -> failed deliveries so far
        self._abandoned_at_stop = False
        self._generation = 0  # one per start(): a late callback of an older run is ignored
        self.stats = ProducerStats()

    @property
    def buffered(self) -> int:
        """Events accepted and not yet acknowledged (waiting or in flight)."""
        return self._held

    def emit(self, event: UsageEvent) -> bool:
        """Queue one event; False if it was dropped because its buffer is full.
        A user's served requests use the billable budget; refused and anonymous
        requests use their own, smaller one."""
        value = event.to_json()
        if len(value) > MAX_RECORD_BYTES:  # the stream would dead-letter it: say so here
            self.stats.emitted += 1
            self.stats.dropped += 1
            raise InvalidEventError("too_large", f"event is {len(value)} bytes")
        billable = event.user_id is not None and event.rejected is None
        if (
            event.rejected is not None
            and self._summary is not None
            and not self._summary.admit(event)
        ):
            self.stats.summarised += 1
            return True  # counted into a summary record, sent when its minute is over
        return self.emit_raw(event.partition_key, value, billable=billable)

    def _emit_summaries(self, *, everything: bool = False) -> None:
        if self._summary is not None:
            for record in self._summary.flush(everything=everything):
                self.emit_raw(record.partition_key, record.to_json(), billable=False)

    async def _summarise_forever(self) -> None:
        while True:
            await asyncio.sleep(SUMMARY_FLUSH_S)
            self._emit_summaries()

    def emit_raw(self, key: bytes, value: bytes | None, *, billable: bool = True) -> bool:
        """Queue pre-encoded bytes as they are (tools and tests; no validation)."""
        self.stats.emitted += 1
        if self._closing:
            self.stats.dropped += 1
            return False
        if billable:
            full = self._held - self._held_unbilled >= self._budget
        else:
            full = self._held_unbilled >= self._unbilled_budget
        if full:
            self.stats.dropped += 1
            if not billable:
                self.stats.dropped_unbilled += 1
            if self.stats.dropped in (1, 10, 100) or self.stats.dropped % 1000 == 0:
                log.warning(
                    "usage event buffer full: %d events dropped (%d of them unbilled)",
                    self.stats.dropped,
                    self.stats.dropped_unbilled,
                )
            return False
        self._queue.put_nowait((key, value, billable))
        self._held += 1
        self._held_unbilled += not billable
        return True

    def _release(self, items: list[_Item]) -> None:
        """These are no longer held (sent, or given up)."""
        self._held -= len(items)
        self._held_unbilled -= sum(1 for item in items if not item[2])

    async def start(self) -> None:
        if self._task is None:
            self._closing = False
            if self._abandoned_at_stop:  # a fresh run: nothing of the abandoned one survives
                self._queue = asyncio.Queue()
                self._failures.clear()
                self._abandoned_at_stop = False
            self._generation += 1
            self._task = asyncio.create_task(self._run(), name="metering-producer")
            if self._summary is not None:
                self._summarising = asyncio.create_task(self._summarise_forever())

    async def stop(self, timeout: float = 10.0) -> None:
        """Flush buffered events, then close, within ``timeout`` seconds in all
        (plus about a second to cut connections that do not close). Idempotent.

        Events still held when the time is up are lost with the process: they
        are counted as dropped and abandoned, and logged as an error."""
        if self._task is None:
            return
        if self._summarising is not None:  # the minutes in progress go out now
            self._summarising.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._summarising
            self._summarising = None
            self._emit_summaries(everything=True)
        self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout  # one budget for flushing and closing
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), max(0.0, timeout - min(3.0, timeout * 0.3)))
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        if self._kafka is not None:
            kafka, self._kafka = self._kafka, None
            try:  # delivers what aiokafka still holds, if the broker answers soon
                await asyncio.wait_for(kafka.stop(), max(0.5, deadline - loop.time()))
            except TimeoutError:
                log.warning("Kafka producer did not close in time; closing its connections")
                sender = getattr(getattr(kafka, "_sender", None), "sender_task", None)
                if sender is not None:  # or it keeps retrying, on new connections
                    sender.cancel()
                    with contextlib.suppress(BaseException):
                        await asyncio.wait_for(sender, 0.5)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(kafka.client.close(), 0.5)
        if self._held:
            lost, self._held, self._held_unbilled = self._held, 0, 0
            self._abandoned_at_stop = True
            self.stats.dropped += lost
            self.stats.abandoned += lost
            log.error(
                "producer stopped with %d usage events unsent (Kafka unreachable for %.0fs): "
                "they are lost and counted as dropped",
                lost,
                timeout,
            )
        while not self._queue.empty():  # forget them: they are counted
            self._queue.get_nowait()
            self._queue.task_done()

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything emitted so far is acknowledged by the broker."""
        await asyncio.wait_for(self._queue.join(), timeout)

    async def __aenter__(self) -> UsageProducer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _connect(self) -> AIOKafkaProducer:
        delay = self._backoff
        while True:
            kafka = AIOKafkaProducer(
                bootstrap_servers=self._bootstrap,
                client_id=self._client_id,
                acks="all",
                enable_idempotence=True,
                linger_ms=self._linger_ms,
                max_batch_size=self._max_batch_bytes,
                compression_type=None,
            )
            try:
                await kafka.start()
                return kafka
            except KafkaError as exc:
                await kafka.stop()
                log.warning("Kafka not reachable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_backoff)

    async def _run(self) -> None:
        self._kafka = await self._connect()
        linger = self._linger_ms / 1000
        while True:
            items = [await self._queue.get()]
            # Let a batch gather: one produce request per linger period instead
            # of one per event at low rates (aiokafka's own linger does not
            # apply to batches handed over whole). Each request costs the
            # event loop a loopback write of ~0.1 ms here, whatever its size,
            # so fewer and larger is what keeps request latency flat.
            if linger and not self._closing and self._queue.qsize() < _DRAIN:
                await asyncio.sleep(linger)
            while len(items) < _DRAIN:
                try:
                    items.append(self._queue.get_nowait())
                except asyncio.QueueEmpty:
                    break
            await self._send_all(items)

    async def _send_all(self, items: list[_Item]) -> None:
        """Partition like the Java client (murmur2 of the key) and hand aiokafka
        whole record batches: far less CPU per event than one send() each."""
        kafka = self._kafka
        assert kafka is not None
        partitions = sorted(
            await self._until_sent("Kafka metadata", lambda: kafka.partitions_for(self._topic))
        )
        if len(partitions) != self._partition_count:  # topic grew: keys move
            self._partition_of.clear()
            self._partition_count = len(partitions)
        by_partition: dict[int, list[_Item]] = {}
        cache = self._partition_of
        for item in items:
            p = cache.get(item[0])
            if p is None:
                p = self._partitioner(item[0], partitions, partitions)
                if len(cache) >= 100_000:
                    cache.clear()
                cache[item[0]] = p
            by_partition.setdefault(p, []).append(item)
        for partition, group in by_partition.items():
            while group:
                batch = kafka.create_batch()
                n = 0
                for key, value, _ in group:
                    if batch.append(key=key, value=value, timestamp=None) is None:
                        break
                    n += 1
                if n == 0:  # a single record larger than a batch: cannot be sent
                    self.stats.dropped += 1
                    self.stats.dropped_unbilled += not group[0][2]
                    self._failures.pop(id(group[0]), None)
                    self._release(group[:1])
                    self.stats.send_errors += 1
                    log.error(
                        "usage event of %d bytes exceeds the batch size", len(group[0][1] or b"")
                    )
                    self._queue.task_done()
                    group = group[1:]
                    continue
                sent, group = group[:n], group[n:]
                await self._send_batch(batch, partition, sent)

    async def _send_batch(self, batch: Any, partition: int, items: list[_Item]) -> None:
        kafka = self._kafka
        assert kafka is not None
        fut = await self._until_sent(
            "Kafka send", lambda: kafka.send_batch(batch, self._topic, partition=partition)
        )
        generation = self._generation
        fut.add_done_callback(lambda f: self._delivered(f, items, generation))

    async def _until_sent(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Retry a Kafka call with capped backoff until it goes through."""
        delay = self._backoff
        while True:
            try:
                return await attempt()
            except KafkaError as exc:
                self.stats.send_errors += 1
                log.warning("%s failed (%s); retrying in %.1fs", what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_backoff)

    def _delivered(self, fut: asyncio.Future[object], items: list[_Item], generation: int) -> None:
        if self._abandoned_at_stop or generation != self._generation:
            return  # stop() counted these as dropped; its sender is gone
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled() or exc is not None:
            # Retriable (no leader, a timeout): again, for as long as it takes.
            # Not retriable (the topic refuses them): a bounded number of times.
            refused = exc is not None and not getattr(exc, "retriable", False)
            self.stats.send_errors += 1
            given_up: list[_Item] = []
            for item in items:
                n = self._failures.get(id(item), 0) + refused
                if n >= MAX_DELIVERY_FAILURES:
                    self._failures.pop(id(item), None)
                    given_up.append(item)
                    continue
                if n:
                    self._failures[id(item)] = n
                self.stats.retried += 1
                self._queue.put_nowait(item)
            if given_up:
                self.stats.dropped += len(given_up)
                self._release(given_up)
                log.error(
                    "%d usage events dropped: Kafka refused them %d times (%s)",
                    len(given_up),
                    MAX_DELIVERY_FAILURES,
                    "cancelled" if exc is None else repr(exc),
                )
        else:
            self.stats.sent += len(items)
            self._release(items)
            if self._failures:
                for item in items:
                    self._failures.pop(id(item), None)
        for _ in items:
            self._queue.task_done()
