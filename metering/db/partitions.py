"""Month partitions of ``usage_logs``: naming and bounds (mirrors sql/0002)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime


@dataclass(frozen=True, slots=True)
class MonthPartition:
    name: str
    start: datetime  # inclusive, UTC
    end: datetime  # exclusive, UTC


def month_partition(ts: datetime) -> MonthPartition:
    """The partition holding ``ts``: by the UTC month of the (aware) timestamp."""
    if ts.tzinfo is None:
        raise ValueError("partition lookup needs an aware datetime")
    utc = ts.astimezone(UTC)
    start = datetime(utc.year, utc.month, 1, tzinfo=UTC)
    end = datetime(utc.year + (utc.month == 12), utc.month % 12 + 1, 1, tzinfo=UTC)
    return MonthPartition(f"usage_logs_y{utc.year:04d}m{utc.month:02d}", start, end)
