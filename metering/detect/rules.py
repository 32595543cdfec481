"""The anomaly rules' thresholds: defaults, overrides, and what a finding does.

Every threshold lives here, named, with its default; ``METERING_DETECTION_RULES``
(a JSON object) overrides them for the whole deployment and a tier's
``features.detection`` object overrides them for that tier's keys. The
detector never carries a literal threshold of its own.

Times are event times (the events' ``occurred_at``), so a replay after a
crash reaches the same verdicts as the first pass.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from metering.errors import InputError

SEVERITIES = ("low", "medium", "high", "critical")

# The rules, by the name their alerts carry.
RULES = ("rate_spike", "fan_out", "forbidden_ip", "scope_probe", "auth_flood", "grace_new_address")


@dataclass(frozen=True, slots=True)
class Rules:
    # rate_spike: requests in the last minute (sliding) against the key's learned
    # peak minute; a new key learns for warmup_minutes before the rule applies
    # (a day: a nightly job's burst is learned before it could alarm)
    spike_factor: float = 4.0
    spike_floor: int = 120  # never below this many requests a minute: small keys are noise
    warmup_minutes: int = 1440  # event time since the key's first request
    peak_half_life_hours: float = 168.0  # a weekly batch job is still remembered
    # fan_out: distinct client addresses (IPv6: /64) in a window against the
    # key's learned peak per window
    fanout_window_minutes: int = 5
    fanout_factor: float = 4.0
    fanout_floor: int = 20
    fanout_track_max: int = 4096  # addresses held per key and window (bounds memory)
    # forbidden_ip: requests from outside the key's allowlist (403/429 forbidden),
    # counted with a decay of decay_minutes
    forbidden_count: int = 10
    # scope_probe: 403 missing-scope answers, across this many endpoints
    probe_count: int = 10
    probe_endpoints: int = 4
    # auth_flood: failed authentications (401, and the 429s of the throttle)
    # from one address, or from one prefix (IPv4 /24, IPv6 /48)
    auth_flood_per_address: int = 100
    auth_flood_per_prefix: int = 300
    decay_minutes: float = 5.0
    # grace_new_address: a key in its rotation grace used from an address it
    # was never seen at; only keys seen at no more than this many addresses
    known_addresses_max: int = 32
    # what a finding does: the rule's severity picks the action (see ACTIONS)
    severity_rate_spike: str = "medium"
    severity_fan_out: str = "high"
    severity_forbidden_ip: str = "high"
    severity_scope_probe: str = "high"
    severity_auth_flood: str = "high"
    severity_grace_new_address: str = "critical"
    quarantine_floor: int = 60  # a quarantined key keeps at least this many requests a minute
    # an open alert's evidence is refreshed at most this often while the rule keeps firing
    update_every_s: float = 30.0
    idle_expiry_hours: float = 336.0  # state of a key or address silent this long is dropped

    def severity(self, rule: str) -> str:
        return str(getattr(self, f"severity_{rule}"))

    def peak_decay_per_minute(self) -> float:
        return 0.5 ** (1.0 / (self.peak_half_life_hours * 60.0))

    def with_overrides(self, overrides: dict[str, Any] | None) -> Rules:
        """These rules with ``overrides`` applied; :class:`InputError` naming the
        first unknown or out-of-range field."""
        if not overrides:
            return self
        if not isinstance(overrides, dict):
            raise InputError("detection rules must be a JSON object of threshold: value")
        known = {f.name: f for f in fields(self)}
        values: dict[str, Any] = {}
        for name, value in overrides.items():
            if name not in known:
                raise InputError(
                    f"unknown detection threshold {name!r}; known: {', '.join(sorted(known))}"
                )
            values[name] = _check(name, value, type(getattr(self, name)))
        return replace(self, **values)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(name: str, value: Any, kind: type) -> Any:
    if kind is str:
        if value not in SEVERITIES:
            raise InputError(f"{name} must be one of {', '.join(SEVERITIES)}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"{name} must be a number")
    if kind is int:
        if value != int(value) or not 1 <= value <= 100_000_000:
            raise InputError(f"{name} must be a whole number from 1 to 100000000")
        return int(value)
    if not (math.isfinite(value) and 0 < value <= 100_000_000):
        raise InputError(f"{name} must be a positive number")
    return float(value)


def parse_overrides(text: str) -> dict[str, Any]:
    """A JSON object of overrides (``METERING_DETECTION_RULES``), checked."""
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InputError(f"detection rules are not JSON: {exc}") from None
    Rules().with_overrides(data)  # raises on anything wrong
    return dict(data)


# What each severity does to the key (the accounts service takes the action;
# an operator can undo each): medium quarantines it, high also forces its
# rotation, critical revokes it where revocation is enabled (else as high).
ACTIONS = {
    "low": (),
    "medium": ("quarantine",),
    "high": ("quarantine", "force_rotation"),
    "critical": ("quarantine", "force_rotation"),
}


def actions_for(severity: str, *, revoke_enabled: bool) -> tuple[str, ...]:
    if severity == "critical" and revoke_enabled:
        return ("revoke",)
    return ACTIONS[severity]


@dataclass(slots=True)
class Finding:
    rule: str
    severity: str
    subject: str  # key:<id> or net:<address or prefix>
    api_key_id: str | None
    user_id: str | None
    first_seen: float  # event time, unix seconds
    last_seen: float
    evidence: dict[str, Any]
    baseline_per_minute: int  # what a quarantine leaves the key

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "severity": self.severity,
            "subject": self.subject,
            "api_key_id": self.api_key_id,
            "user_id": self.user_id,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "evidence": self.evidence,
            "baseline_per_minute": self.baseline_per_minute,
        }
