"""Refused requests of no known user: a few records per client, then summaries.

Keyless 401s, unknown keys, throttled guesses and exhausted anonymous
allowances cost nothing to send. One usage record each would let anyone grow
the topic and ``usage_logs`` without bound and slow the worker (which delays
quota enforcement). :class:`UnidentifiedSummary` lets the first
``allowance`` such requests per client (address, or IPv6 prefix) and minute
through as records of their own, and counts the rest per client, minute,
reason and status; :meth:`flush` turns each count into one record with
``count`` set (the event contract's summary form), once its minute is over.
"""

from __future__ import annotations

import ipaddress
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from metering.events import UsageEvent


def client_bucket(ip: str, ipv6_prefix: int) -> str:
    """The client a refused request is charged to: its IPv4 address, or its
    IPv6 address's network of ``ipv6_prefix`` bits (written as an address)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return "0.0.0.0"
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.ip_network(f"{addr}/{ipv6_prefix}", strict=False).network_address)
    return str(addr)


@dataclass(slots=True)
class _Tally:
    count: int = 0
    endpoint: str = ""
    method: str = "GET"
    response_ms: float = 0.0
    extra_endpoints: bool = False


@dataclass(slots=True)
class UnidentifiedSummary:
    allowance: int = 10  # records of their own per client and minute
    ipv6_prefix: int = 64
    max_clients: int = 100_000  # beyond: the rest of the minute goes to one "0.0.0.0" client
    _seen: dict[tuple[str, int], int] = field(default_factory=dict)
    _tallies: dict[tuple[int, str, str, int], _Tally] = field(default_factory=dict)
    summarised: int = 0  # requests folded into summaries so far

    def admit(self, event: UsageEvent) -> bool:
        """True: emit this event itself. False: it was counted into a summary."""
        if event.user_id is not None or event.rejected is None:
            return True
        minute = int(event.occurred_at.timestamp() // 60)
        client = client_bucket(event.client_ip, self.ipv6_prefix)
        if (client, minute) not in self._seen and len(self._seen) >= self.max_clients:
            client = "0.0.0.0"
        seen = self._seen.get((client, minute), 0) + 1
        self._seen[(client, minute)] = seen
        if seen <= self.allowance:
            return True
        key = (minute, client, event.rejected, event.status_code)
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies[key] = _Tally(endpoint=event.endpoint, method=event.method)
        elif event.endpoint != tally.endpoint:
            tally.extra_endpoints = True
        tally.count += 1
        tally.response_ms += event.response_time_ms
        self.summarised += 1
        return False

    def flush(self, now: datetime | None = None, *, everything: bool = False) -> list[UsageEvent]:
        """Summaries of the minutes that are over (all of them with ``everything``)."""
        current = int((now or datetime.now(UTC)).timestamp() // 60)
        done = [k for k in self._tallies if everything or k[0] < current]
        out = []
        for key in done:
            minute, client, reason, status = key
            tally = self._tallies.pop(key)
            start = datetime.fromtimestamp(minute * 60, UTC)
            out.append(
                UsageEvent(
                    # random: two edge processes may summarise the same client
                    # and minute (the producer re-sends the same bytes, id included)
                    event_id=uuid.uuid4(),
                    occurred_at=start + timedelta(seconds=59, microseconds=999_000),
                    user_id=None,
                    api_key_id=None,
                    endpoint="*" if tally.extra_endpoints else tally.endpoint,
                    method=tally.method,
                    status_code=status,
                    response_time_ms=round(tally.response_ms / tally.count, 3),
                    client_ip=client,
                    bytes_out=None,
                    units=0,
                    rejected=reason,
                    count=tally.count,
                )
            )
        for k in [k for k in self._seen if everything or k[1] < current]:
            del self._seen[k]
        return out
