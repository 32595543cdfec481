"""Traffic shapes for the anomaly rules: normal keys and one attack per rule.

Used by the integration tests and ``python -m bench.anomalies``. Events carry
their own event time, so hours of history (the keys' learned baselines) are
produced in seconds; the live part and the attacks are stamped "now".

Normal shapes (none may raise an alert):

* ``steady``: a server calling at a constant rate from two addresses;
* ``diurnal``: a rate that ramps up and down over the day;
* ``batch``: a nightly job bursting 20x its usual rate for half an hour;
* ``mobile``: an app whose clients call from hundreds of addresses;
* ``rotating``: a key rotated normally, still used from its own addresses
  during the grace period.

Attacks, one per rule: a leaked key hammered (``rate_spike``), used from many
addresses (``fan_out``), from outside its allowlist (``forbidden_ip``),
probed for scopes (``scope_probe``), a credential-stuffing address
(``auth_flood``), and a rotated key used from a new address
(``grace_new_address``).
"""

from __future__ import annotations

import math
import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

from metering.events import UsageEvent

NORMAL = ("steady", "diurnal", "batch", "mobile", "rotating")
ATTACKS = (
    "rate_spike",
    "fan_out",
    "forbidden_ip",
    "scope_probe",
    "auth_flood",
    "grace_new_address",
)


@dataclass
class Actor:
    name: str
    kind: str  # one of NORMAL, or the rule its attack targets
    user_id: uuid.UUID
    key_id: uuid.UUID
    ips: list[str] = field(default_factory=list)
    rate: float = 2.0  # requests a minute, normally
    attacker: str = "192.0.2.200"  # where its attack comes from (a /24 of its own)


def actor(name: str, kind: str, user_id: uuid.UUID, key_id: uuid.UUID, index: int) -> Actor:
    """An actor with its usual addresses and rate (``index`` keeps addresses apart)."""
    a, b = divmod(index, 200)
    ips = [f"10.{a}.{b}.1", f"10.{a}.{b}.2"]
    rate = {"mobile": 30.0, "batch": 10.0, "diurnal": 8.0}.get(kind, 2.0)
    if kind == "mobile":
        ips = [f"100.{64 + (index % 60)}.{i // 250}.{i % 250 + 1}" for i in range(1500)]
    return Actor(name, kind, user_id, key_id, ips, rate=rate, attacker=f"192.{a}.{b}.200")


def _event(
    a: Actor | None,
    t: float,
    ip: str,
    *,
    endpoint: str = "/v1/items",
    status: int = 200,
    rejected: str | None = None,
) -> UsageEvent:
    return UsageEvent(
        event_id=uuid.uuid4(),
        occurred_at=datetime.fromtimestamp(t, UTC),
        user_id=None if a is None else a.user_id,
        api_key_id=None if a is None else a.key_id,
        endpoint=endpoint,
        method="GET",
        status_code=status,
        response_time_ms=4.0,
        client_ip=ip,
        units=0 if rejected else 1,
        rejected=rejected,
    )


def rate_at(a: Actor, t: float, *, burst_from: float | None) -> float:
    """Requests a minute at time ``t`` for a normal actor."""
    if a.kind == "diurnal":
        hour = (t / 3600.0) % 24
        return a.rate * (0.6 + 0.4 * math.sin(2 * math.pi * hour / 24))
    if a.kind == "batch" and burst_from is not None and burst_from <= t < burst_from + 1800:
        return a.rate * 20
    return a.rate


def traffic(
    actors: list[Actor],
    start: float,
    end: float,
    rng: random.Random,
    *,
    burst_from: float | None = None,
) -> list[UsageEvent]:
    """Normal traffic of every actor between ``start`` and ``end`` (event time),
    in time order. A batch actor bursts 20x from ``burst_from`` for 30 minutes."""
    out: list[tuple[float, UsageEvent]] = []
    for a in actors:
        t = start + rng.uniform(0, 60.0 / max(a.rate, 0.1))
        while t < end:
            per_minute = rate_at(a, t, burst_from=burst_from)
            if a.kind == "mobile":  # a changing crowd: ~a third of the pool per window
                window = int(t // 300)
                pool = a.ips[(window * 97) % 1000 : (window * 97) % 1000 + 500]
                ip = rng.choice(pool)
            else:
                ip = rng.choice(a.ips)
            out.append((t, _event(a, t, ip)))
            t += rng.expovariate(per_minute / 60.0)
    out.sort(key=lambda pair: pair[0])
    return [e for _, e in out]


def attack(a: Actor, start: float, rng: random.Random) -> list[UsageEvent]:
    """The attack ``a.kind`` names, beginning at ``start`` and lasting a few seconds."""
    kind = a.kind
    if kind == "rate_spike":  # a leaked key hammered from the attacker's host
        return [_event(a, start + i * 0.01, "198.51.100.66") for i in range(400)]
    if kind == "fan_out":  # the key spread over a botnet
        return [
            _event(a, start + i * 0.05, f"203.0.{113 + i // 250}.{i % 250 + 1}") for i in range(60)
        ]
    if kind == "forbidden_ip":  # the key used from outside its allowlist
        return [
            _event(a, start + i * 0.1, "198.51.100.77", status=403, rejected="forbidden_ip")
            for i in range(20)
        ]
    if kind == "scope_probe":  # what else can this key do?
        return [
            _event(
                a,
                start + i * 0.1,
                "198.51.100.88",
                endpoint=f"/v1/admin/{['users', 'billing', 'keys', 'export', 'audit'][i % 5]}",
                status=403,
                rejected="missing_scope",
            )
            for i in range(20)
        ]
    if kind == "auth_flood":  # credential stuffing from one address
        return [
            _event(None, start + i * 0.01, a.attacker, status=401, rejected="unauthorized")
            for i in range(150)
        ]
    if kind == "grace_new_address":  # the rotated key, now in someone else's hands
        return [_event(a, start + i * 0.5, "198.51.100.99") for i in range(3)]
    raise ValueError(f"no attack named {kind!r}")
