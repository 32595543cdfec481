"""Refused requests: a few records per client and minute, then summaries.

A refused request costs its sender nothing: keyless 401s, guessed keys, a
key hammering past its rate limit, a leaked key used from outside its
allowlist. One usage record each would let anyone grow the topic and
``usage_logs`` without bound and slow the worker (which delays quota
enforcement). :class:`RefusedSummary` lets the first ``allowance`` refused
requests per client and minute through as records of their own (a client:
the key when one was identified, else the address or IPv6 prefix), and at
most ``cap`` such records per minute in all; the rest are counted per
client, minute, reason and status, and :meth:`flush` turns each count into
one record with ``count`` set (the event contract's summary form) once its
minute is over, or sooner for a client still refused in numbers (``partial_*``:
the anomaly rules see a flood within seconds, not at the minute's end).
Served requests are never summarised.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from metering.addresses import client_bucket
from metering.events import UsageEvent


@dataclass(slots=True)
class _Tally:
    first: UsageEvent  # who (user, key, address), endpoint and method of the first one
    last: datetime  # when the latest one came
    count: int = 0
    response_ms: float = 0.0
    extra_endpoints: bool = False


@dataclass(slots=True)
class RefusedSummary:
    allowance: int = 10  # records of their own per client and minute
    ipv6_prefix: int = 64
    cap: int = 1_000  # records of their own per minute in all, whatever the clients
    max_clients: int = 100_000  # tallies beyond: the rest of the minute goes to one client
    # a tally this old (event time) with at least this many requests goes out before its
    # minute ends, and a new one begins: at most one record per client and partial_after_s
    partial_after_s: float = 2.0
    partial_min_count: int = 10
    _seen: dict[tuple[str, int], int] = field(default_factory=dict)
    _records: dict[int, int] = field(default_factory=dict)  # minute -> records let through
    _tallies: dict[tuple[int, str, str, int], _Tally] = field(default_factory=dict)
    summarised: int = 0  # requests folded into summaries so far

    def admit(self, event: UsageEvent) -> bool:
        """True: emit this event itself. False: it was counted into a summary."""
        if event.rejected is None:
            return True
        minute = int(event.occurred_at.timestamp() // 60)
        if event.api_key_id is not None:
            client = f"key:{event.api_key_id}"
        elif event.user_id is not None:
            client = f"user:{event.user_id}"
        else:
            client = client_bucket(event.client_ip, self.ipv6_prefix)
        if (client, minute) not in self._seen and len(self._seen) >= self.max_clients:
            client = "0.0.0.0"
        seen = self._seen.get((client, minute), 0) + 1
        self._seen[(client, minute)] = seen
        if seen <= self.allowance and self._records.get(minute, 0) < self.cap:
            self._records[minute] = self._records.get(minute, 0) + 1
            return True
        key = (minute, client, event.rejected, event.status_code)
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies[key] = _Tally(event, event.occurred_at)
        elif event.endpoint != tally.first.endpoint:
            tally.extra_endpoints = True
        tally.last = max(tally.last, event.occurred_at)
        tally.count += 1
        tally.response_ms += event.response_time_ms
        self.summarised += 1
        return False

    def flush(self, now: datetime | None = None, *, everything: bool = False) -> list[UsageEvent]:
        """Summaries of the minutes that are over, and of the busy clients of the
        current one (all of them with ``everything``)."""
        now = now or datetime.now(UTC)
        current = int(now.timestamp() // 60)
        early = now - timedelta(seconds=self.partial_after_s)
        done = [
            k
            for k, t in self._tallies.items()
            if everything
            or k[0] < current
            or (t.count >= self.partial_min_count and t.first.occurred_at <= early)
        ]
        out = []
        for key in done:
            _, client, reason, status = key
            tally = self._tallies.pop(key)
            first = tally.first
            identified = first.user_id is not None
            out.append(
                UsageEvent(
                    # random: two edge processes may summarise the same client
                    # and minute (the producer re-sends the same bytes, id included)
                    event_id=uuid.uuid4(),
                    occurred_at=tally.last,  # within its minute
                    user_id=first.user_id,
                    api_key_id=first.api_key_id,
                    endpoint="*" if tally.extra_endpoints else first.endpoint,
                    method=first.method,
                    status_code=status,
                    response_time_ms=round(tally.response_ms / tally.count, 3),
                    # a key's summary shows the first address it came from; else the client
                    client_ip=first.client_ip if identified else client,
                    bytes_out=None,
                    units=0,
                    rejected=reason,
                    count=tally.count,
                )
            )
        for k in [k for k in self._seen if everything or k[1] < current]:
            del self._seen[k]
        for m in [m for m in self._records if everything or m < current]:
            del self._records[m]
        return out
