"""Dead letters too large for the producer go out truncated, never block."""

from __future__ import annotations

import hashlib

import pytest

from metering.usage.deadletters import TRUNCATED_VALUE_BYTES, DeadLetter, RawRecord


@pytest.mark.parametrize("size", [1_010_010, 5_000_000])
def test_oversized_dead_letters_are_truncated_with_size_and_digest(size: int) -> None:
    value = bytes(range(256)) * (size // 256 + 1)
    value = value[:size]
    rec = RawRecord(value=value, key=b"k", topic="t", partition=1, offset=7, headers=[("h", b"v")])
    key, kept, headers = DeadLetter(rec, "too_large", "big").fitted(1_000_000 - 1024)
    h = dict(headers)
    assert key == b"k" and kept == value[:TRUNCATED_VALUE_BYTES]
    assert h["x-dlq-truncated"] == b"1"
    assert h["x-dlq-original-size"] == str(size).encode()
    assert h["x-dlq-original-sha256"] == hashlib.sha256(value).hexdigest().encode()
    assert h["x-dlq-reason"] == b"too_large" and h["h"] == b"v"
    key, kept, headers = DeadLetter(rec, "too_large", "big").fitted(10_000, minimal=True)
    assert key is None and kept == b"" and dict(headers)["x-dlq-original-headers-dropped"] == b"1"


def test_dead_letters_that_fit_are_untouched() -> None:
    rec = RawRecord(value=b"{nope", key=b"k", topic="t", headers=[("trace", b"abc")])
    key, value, headers = DeadLetter(rec, "invalid_json", "x").fitted(1_000_000)
    assert (key, value) == (b"k", b"{nope") and "x-dlq-truncated" not in dict(headers)


def test_a_record_with_neither_key_nor_value_gets_an_empty_value() -> None:
    """Kafka producers refuse key=None and value=None together (aiokafka asserts)."""
    rec = RawRecord(value=None, key=None, topic="t", partition=0, offset=3)
    for minimal in (False, True):
        key, value, headers = DeadLetter(rec, "empty_record", "tombstone").fitted(
            1_000_000, minimal=minimal
        )
        assert key is None and value == b""
        assert dict(headers)["x-dlq-original-value"] == b"null"
