"""Kafka records as the usage consumer sees them, and the dead letters made of them.

A dead letter is the original record (bytes, key and headers untouched)
plus ``x-dlq-*`` headers saying why and where it came from. One that does
not fit the producer's request size is cut down by :meth:`DeadLetter.fitted`
so it can always be published.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class RawRecord:
    """A Kafka record as consumed, before decoding."""

    value: bytes | None
    key: bytes | None = None
    topic: str = ""
    partition: int = -1
    offset: int = -1
    timestamp_ms: int | None = None
    headers: Headers = field(default_factory=list)


# A dead letter that does not fit the producer's request size keeps this much
# of the original value (and of its key), plus its size and SHA-256.
TRUNCATED_VALUE_BYTES = 8 * 1024
TRUNCATED_KEY_BYTES = 1024
TRUNCATED_HEADERS_BYTES = 8 * 1024
_RECORD_OVERHEAD = 128  # record framing, per record and per header (generous)


def record_size(key: bytes | None, value: bytes | None, headers: Headers) -> int:
    """An upper bound of a record's size in a produce request."""
    size = _RECORD_OVERHEAD + len(key or b"") + len(value or b"")
    return size + sum(_RECORD_OVERHEAD + len(k.encode()) + len(v or b"") for k, v in headers)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    record: RawRecord
    reason: str
    detail: str

    def headers(self) -> Headers:
        """Original headers plus the reason and where the record came from."""
        return [*self.record.headers, *self._dlq_headers()]

    def _dlq_headers(self) -> Headers:
        return [
            ("x-dlq-reason", self.reason.encode()),
            ("x-dlq-detail", self.detail.encode(errors="replace")[:1024]),
            ("x-dlq-source-topic", self.record.topic.encode(errors="replace")),
            ("x-dlq-source-partition", str(self.record.partition).encode()),
            ("x-dlq-source-offset", str(self.record.offset).encode()),
            ("x-dlq-failed-at", datetime.now(UTC).isoformat().encode()),
        ]

    def fitted(
        self, max_bytes: int, *, minimal: bool = False
    ) -> tuple[bytes | None, bytes | None, Headers]:
        """``(key, value, headers)`` to publish: the record untouched when it fits
        ``max_bytes``; otherwise the first bytes of the value (and key), with the
        original size and SHA-256 in ``x-dlq-original-*`` headers and
        ``x-dlq-truncated: 1``. ``minimal`` keeps an empty value, no key and
        none of the original headers (for a topic that refuses even the
        truncated form). Never both key and value None: producers refuse that."""
        rec = self.record
        headers = self.headers()
        if rec.key is None and rec.value is None:
            # Kafka producers refuse a record with neither key nor value
            return None, b"", [*headers, ("x-dlq-original-value", b"null")]
        if not minimal and record_size(rec.key, rec.value, headers) <= max_bytes:
            return rec.key, rec.value, headers
        value = rec.value or b""
        key = rec.key
        extra: Headers = [
            ("x-dlq-truncated", b"1"),
            ("x-dlq-original-size", str(len(value)).encode()),
            ("x-dlq-original-sha256", hashlib.sha256(value).hexdigest().encode()),
        ]
        if key is not None and (minimal or len(key) > TRUNCATED_KEY_BYTES):
            extra.append(("x-dlq-original-key-size", str(len(key)).encode()))
            extra.append(("x-dlq-original-key-sha256", hashlib.sha256(key).hexdigest().encode()))
            key = None if minimal else key[:TRUNCATED_KEY_BYTES]
        original = rec.headers
        if original and (minimal or record_size(None, None, original) > TRUNCATED_HEADERS_BYTES):
            extra.append(("x-dlq-original-headers-dropped", str(len(original)).encode()))
            original = []
        kept = b"" if minimal else value[:TRUNCATED_VALUE_BYTES]
        return key, kept, [*original, *self._dlq_headers(), *extra]


class DeadLetterSink(Protocol):
    async def send(self, letters: Sequence[DeadLetter]) -> None:
        """Durably publish the letters (return only once the broker has them)."""
