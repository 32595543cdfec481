"""Dead letters published through the Faust app's producer (see
:class:`FaustDeadLetters`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence

import faust
from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)
from faust.exceptions import ProducerSendError

from metering.errors import ServiceUnavailable
from metering.usage.deadletters import DeadLetter

log = logging.getLogger(__name__)


_SIZE_ERRORS = (MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError)


def _is_size_error(exc: BaseException) -> bool:
    """The record is too large for the producer or the topic: retrying never helps."""
    return isinstance(exc, _SIZE_ERRORS) or isinstance(exc.__cause__, _SIZE_ERRORS)


_KAFKA_ERRORS = (KafkaError, ProducerSendError)


class FaustDeadLetters:
    """Publishes dead letters with the app's producer and waits for the acks.

    A letter larger than the producer's request size goes out truncated
    (:meth:`DeadLetter.fitted`); if it is refused for its size anyway (a DLQ
    topic with a smaller ``max.message.bytes``) or by the client itself, it
    goes out minimal (headers and an empty value). A letter not even that can
    be published is logged and counted (``unpublishable``), never retried:
    a refusal that never heals must not stall the partition. Any other
    failure (timeouts, a broker away) is an outage: :class:`ServiceUnavailable`,
    which the pipeline retries (dead letters are at-least-once).
    """

    def __init__(self, topic: faust.types.TopicT, *, max_request_bytes: int) -> None:
        self._topic = topic
        self._max_bytes = max_request_bytes - 1024
        self.unpublishable = 0

    async def send(self, letters: Sequence[DeadLetter]) -> None:
        outage: BaseException | None = None
        pending: list[tuple[DeadLetter, Awaitable[object]]] = []
        for letter in letters:
            try:
                pending.append((letter, await self._enqueue(letter)))
            except _KAFKA_ERRORS as exc:
                outage = exc
                break
        results = await asyncio.gather(*(f for _, f in pending), return_exceptions=True)
        for (letter, _), result in zip(pending, results, strict=True):
            if not isinstance(result, BaseException):
                continue
            if not _is_size_error(result):
                outage = outage or result
                continue
            try:
                await (await self._enqueue(letter, minimal=True))
            except _KAFKA_ERRORS as exc:
                if not _is_size_error(exc):
                    outage = outage or exc
                    continue
                self._give_up(letter, exc)
        if outage is not None:
            raise ServiceUnavailable(f"dead-letter publish failed: {outage!r}") from outage

    async def _enqueue(self, letter: DeadLetter, *, minimal: bool = False) -> Awaitable[object]:
        """Hand one letter to the producer; the returned future resolves on the ack."""
        key, value, headers = letter.fitted(self._max_bytes, minimal=minimal)
        if value is not letter.record.value and value:
            log.warning(
                "dead letter from %s[%d]@%d is %d bytes: published truncated",
                letter.record.topic,
                letter.record.partition,
                letter.record.offset,
                len(letter.record.value or b""),
            )
        try:
            return await self._topic.send(key=key, value=value, headers=headers)
        except _KAFKA_ERRORS as exc:
            if minimal or not _is_size_error(exc):
                raise
        except Exception as exc:  # the client refused the record before Kafka saw it
            if minimal:
                return self._give_up(letter, exc)
        return await self._enqueue(letter, minimal=True)

    def _give_up(self, letter: DeadLetter, exc: BaseException) -> Awaitable[object]:
        self.unpublishable += 1
        log.critical(
            "dead letter from %s[%d]@%d (%s) cannot be published even without its value "
            "(%r); skipped: the record stays in the source topic for its retention",
            letter.record.topic,
            letter.record.partition,
            letter.record.offset,
            letter.reason,
            exc,
        )
        done: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done
