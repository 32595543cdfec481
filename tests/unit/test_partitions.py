from datetime import UTC, datetime, timedelta, timezone

import pytest

from metering.db.partitions import month_partition


@pytest.mark.parametrize(
    ("ts", "name", "start", "end"),
    [
        (
            datetime(2026, 12, 31, 23, 59, 59, 999000, tzinfo=UTC),
            "usage_logs_y2026m12",
            datetime(2026, 12, 1, tzinfo=UTC),
            datetime(2027, 1, 1, tzinfo=UTC),
        ),
        (
            datetime(2027, 1, 1, 0, 0, tzinfo=UTC),
            "usage_logs_y2027m01",
            datetime(2027, 1, 1, tzinfo=UTC),
            datetime(2027, 2, 1, tzinfo=UTC),
        ),
        (
            datetime(2028, 2, 29, 12, tzinfo=UTC),
            "usage_logs_y2028m02",
            datetime(2028, 2, 1, tzinfo=UTC),
            datetime(2028, 3, 1, tzinfo=UTC),
        ),
        (
            datetime(2026, 11, 30, 23, 59, 59, 999999, tzinfo=UTC),
            "usage_logs_y2026m11",
            datetime(2026, 11, 1, tzinfo=UTC),
            datetime(2026, 12, 1, tzinfo=UTC),
        ),
    ],
)
def test_month_boundaries(ts, name, start, end):
    p = month_partition(ts)
    assert (p.name, p.start, p.end) == (name, start, end)
    assert p.start <= ts < p.end


def test_partition_is_chosen_by_utc_not_local_time():
    # 1 January 00:30 in UTC+2 is still 31 December in UTC.
    local = datetime(2027, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=2)))
    assert month_partition(local).name == "usage_logs_y2026m12"


def test_naive_datetimes_are_refused():
    with pytest.raises(ValueError):
        month_partition(datetime(2026, 12, 31))
