"""The rules on synthetic event streams (event time; no services needed).

Each attack is checked to be flagged, and each normal shape (steady keys,
a nightly batch job bursting 20x, a mobile app seen from many addresses, a
key rotating normally) to raise nothing. The integration tests run the same
through Kafka, the worker and PostgreSQL.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from metering.detect.detector import Detector, Finding
from metering.detect.rules import Rules, actions_for, parse_overrides
from metering.errors import InputError
from metering.events import UsageEvent

T0 = datetime(2026, 11, 2, tzinfo=UTC).timestamp()


@dataclass
class Src:
    partition: int
    offset: int


class Feed:
    """Builds events and feeds them to a detector in batches, with offsets."""

    def __init__(self, detector: Detector) -> None:
        self.detector = detector
        self.offset = 0
        self.findings: list[Finding] = []

    def event(
        self,
        t: float,
        key: uuid.UUID | None,
        user: uuid.UUID | None,
        ip: str,
        *,
        endpoint: str = "/v1/items",
        status: int = 200,
        rejected: str | None = None,
        count: int = 1,
    ) -> UsageEvent:
        return UsageEvent(
            event_id=uuid.uuid4(),
            occurred_at=datetime.fromtimestamp(t, UTC),
            user_id=user,
            api_key_id=key,
            endpoint=endpoint,
            method="GET",
            status_code=status,
            response_time_ms=3.0,
            client_ip=ip,
            rejected=rejected,
            count=count,
        )

    def feed(self, events: list[UsageEvent]) -> list[Finding]:
        sources = {}
        for ev in events:
            sources[id(ev)] = Src(0, self.offset)
            self.offset += 1
        found = self.detector.observe(events, sources)
        self.findings += found
        return found


@dataclass
class Key:
    id: uuid.UUID
    user: uuid.UUID


def new_key() -> Key:
    return Key(uuid.uuid4(), uuid.uuid4())


def steady(feed: Feed, key: Key, start: float, minutes: int, per_minute: int, ips: list[str]):
    """Steady traffic, fed one minute per batch."""
    for m in range(minutes):
        batch = [
            feed.event(start + m * 60 + i * 60 / per_minute, key.id, key.user, ips[i % len(ips)])
            for i in range(per_minute)
        ]
        feed.feed(batch)


def rules_fired(found: list[Finding]) -> set[str]:
    return {f.rule for f in found}


@pytest.fixture
def feed() -> Feed:
    """Default rules, but a warm-up of an hour (the shapes test uses the default)."""
    return Feed(Detector(Rules(warmup_minutes=60), clock=lambda: T0 + 10 * 86400))


def test_normal_shapes_raise_nothing() -> None:
    # a steady key, a key that bursts 20x every night for an hour, a mobile
    # app seen from ~300 addresses per window, all over two days
    feed = Feed(Detector(Rules(), clock=lambda: T0 + 10 * 86400))
    plain, batch_job, mobile = new_key(), new_key(), new_key()
    mobile_ips = [f"10.{i // 250}.{i % 250}.7" for i in range(3000)]
    for hour in range(48):
        start = T0 + hour * 3600
        steady(feed, plain, start, 60, 20, ["192.0.2.10", "192.0.2.11"])
        burst = hour % 24 == 2
        steady(feed, batch_job, start, 60, 200 if burst else 10, ["198.51.100.4"])
        offset = (hour * 397) % 2700
        steady(feed, mobile, start, 60, 60, mobile_ips[offset : offset + 300])
    assert feed.findings == []


def test_rate_spike_against_the_learned_peak(feed: Feed) -> None:
    k = new_key()
    steady(feed, k, T0, 120, 30, ["192.0.2.10"])
    start = T0 + 120 * 60
    found = feed.feed(
        [feed.event(start + i * 0.02, k.id, k.user, "192.0.2.10") for i in range(200)]
    )
    assert rules_fired(found) == {"rate_spike"}
    f = found[0]
    assert f.severity == "medium" and f.api_key_id == str(k.id)
    assert f.evidence["threshold"] == 120  # max(floor 120, 4 x 30)
    assert f.baseline_per_minute == 60  # max(quarantine floor 60, peak 30)
    # the same spike again within update_every_s: no second finding
    assert feed.feed([feed.event(start + 5, k.id, k.user, "192.0.2.10")]) == []


def test_no_spike_during_warm_up(feed: Feed) -> None:
    k = new_key()
    found = feed.feed([feed.event(T0 + i * 0.01, k.id, k.user, "192.0.2.1") for i in range(1000)])
    assert found == []


def test_fan_out(feed: Feed) -> None:
    k = new_key()
    steady(feed, k, T0, 90, 10, ["192.0.2.10", "192.0.2.11"])
    start = T0 + 90 * 60
    ips = [f"203.0.113.{i}" for i in range(40)] + [f"2001:db8:{i:x}::1" for i in range(10)]
    found = feed.feed([feed.event(start + i * 0.1, k.id, k.user, ip) for i, ip in enumerate(ips)])
    assert "fan_out" in rules_fired(found)
    f = next(f for f in found if f.rule == "fan_out")
    assert f.evidence["distinct_addresses"] >= 20
    assert "2001:db8:9::/64" in feed.detector.parts[0].keys[k.id.int].win_cur


def test_ipv6_addresses_count_by_64(feed: Feed) -> None:
    k = new_key()
    steady(feed, k, T0, 90, 10, ["2001:db8::1"])
    start = T0 + 90 * 60
    # 100 addresses of one /64: one client network, no fan-out
    ips = [f"2001:db8::{i:x}" for i in range(1, 101)]
    assert (
        feed.feed([feed.event(start + i * 0.1, k.id, k.user, ip) for i, ip in enumerate(ips)]) == []
    )


def test_forbidden_ip_and_scope_probe(feed: Feed) -> None:
    k = new_key()
    found = feed.feed(
        [
            feed.event(T0 + i, k.id, k.user, "203.0.113.9", status=403, rejected="forbidden_ip")
            for i in range(11)  # decaying: 10 within a few seconds of each other
        ]
    )
    assert rules_fired(found) == {"forbidden_ip"}
    assert found[0].evidence["addresses"] == ["203.0.113.9"]
    probe = new_key()
    found = feed.feed(
        [
            feed.event(
                T0 + i,
                probe.id,
                probe.user,
                "198.51.100.1",
                endpoint=f"/v1/admin/{i % 5}",
                status=403,
                rejected="missing_scope",
            )
            for i in range(11)
        ]
    )
    assert rules_fired(found) == {"scope_probe"}
    # many missing-scope answers on one endpoint only: a misconfigured client
    one = new_key()
    assert (
        feed.feed(
            [
                feed.event(
                    T0 + i, one.id, one.user, "198.51.100.1", status=403, rejected="missing_scope"
                )
                for i in range(50)
            ]
        )
        == []
    )


def test_auth_flood_per_address_and_prefix(feed: Feed) -> None:
    found = feed.feed(
        [
            feed.event(
                T0 + i * 0.05, None, None, "203.0.113.50", status=401, rejected="unauthorized"
            )
            for i in range(110)
        ]
    )
    assert {f.subject for f in found} == {"net:203.0.113.50"}
    spread = feed.feed(
        [
            feed.event(
                T0 + 1000 + i * 0.05,
                None,
                None,
                f"198.51.100.{i % 250}",
                status=429,
                rejected="auth_throttled",
            )
            for i in range(330)
        ]
    )
    assert {f.subject for f in spread} == {"net:198.51.100.0/24"}
    # a summary record counts for all the requests it stands for
    summary = feed.feed(
        [
            feed.event(
                T0 + 2000,
                None,
                None,
                "192.0.2.99",
                status=429,
                rejected="auth_throttled",
                count=150,
            )
        ]
    )
    assert {f.subject for f in summary} == {"net:192.0.2.99"}


def test_grace_new_address(feed: Feed) -> None:
    k = new_key()
    steady(feed, k, T0, 10, 5, ["192.0.2.10"])
    # an address first seen before the rotation began is no news
    feed.feed([feed.event(T0 + 650, k.id, k.user, "192.0.2.20")])
    feed.detector.rotating = {str(k.id): T0 + 690}
    assert feed.feed([feed.event(T0 + 700, k.id, k.user, "192.0.2.10")]) == []
    assert feed.feed([feed.event(T0 + 700, k.id, k.user, "192.0.2.20")]) == []
    found = feed.feed([feed.event(T0 + 701, k.id, k.user, "203.0.113.77")])
    assert rules_fired(found) == {"grace_new_address"}
    assert found[0].severity == "critical"
    assert found[0].evidence["new_addresses"] == ["203.0.113.77"]


def test_grace_new_address_despite_a_late_watch_list_or_a_refused_first_request(feed: Feed) -> None:
    late, refused = new_key(), new_key()
    steady(feed, late, T0, 10, 5, ["192.0.2.10"])
    steady(feed, refused, T0, 10, 5, ["192.0.2.11"])
    # used from a new address after its rotation began, before the worker's
    # watch list knows of the rotation
    assert feed.feed([feed.event(T0 + 700, late.id, late.user, "203.0.113.5")]) == []
    # the first request from a new address is refused (rate limited), the next served
    first = feed.event(
        T0 + 700, refused.id, refused.user, "203.0.113.6", status=429, rejected="rate_limited"
    )
    assert feed.feed([first]) == []
    feed.detector.rotating = {str(late.id): T0 + 690, str(refused.id): T0 + 690}
    found = feed.feed(
        [
            feed.event(T0 + 710, late.id, late.user, "192.0.2.10"),
            feed.event(T0 + 710, refused.id, refused.user, "203.0.113.6"),
        ]
    )
    assert {(f.api_key_id, f.rule) for f in found} == {
        (str(late.id), "grace_new_address"),
        (str(refused.id), "grace_new_address"),
    }


def test_ipv4_mapped_clients_are_their_ipv4_address(feed: Feed) -> None:
    k = new_key()
    steady(feed, k, T0, 90, 10, ["::ffff:192.0.2.10", "192.0.2.10"])
    assert feed.detector.parts[0].keys[k.id.int].known == ("192.0.2.10",)
    found = feed.feed(
        [
            feed.event(
                T0 + 5400 + i * 0.05,
                None,
                None,
                f"::ffff:198.51.100.{i % 250}",
                status=401,
                rejected="unauthorized",
            )
            for i in range(310)
        ]
    )
    assert {f.subject for f in found} == {"net:198.51.100.0/24"}


def test_snapshot_restore_and_replay_skip() -> None:
    clock = lambda: T0 + 86400  # noqa: E731
    first = Feed(Detector(Rules(warmup_minutes=60), clock=clock))
    k = new_key()
    steady(first, k, T0, 120, 30, ["192.0.2.10"])
    offset, records = first.detector.snapshot(0)
    assert offset == first.offset and records
    first.detector.saved(0, offset)
    # a restarted worker restores, then sees a replay of the last minute and the spike
    second = Feed(Detector(Rules(warmup_minutes=60), clock=clock))
    second.detector.restore(0, records)
    restored = second.detector.parts[0].keys[k.id.int]
    original = first.detector.parts[0].keys[k.id.int]
    assert restored.peak == original.peak and restored.cur == original.cur
    second.offset = offset - 30  # the last 30 events again: already in the state
    steady(second, k, T0 + 119 * 60, 1, 30, ["192.0.2.10"])
    assert second.detector.stats.skipped == 30
    assert second.detector.parts[0].keys[k.id.int].cur == original.cur
    start = T0 + 120 * 60
    found = second.feed(
        [second.event(start + i * 0.02, k.id, k.user, "192.0.2.10") for i in range(200)]
    )
    assert rules_fired(found) == {"rate_spike"}


def test_commits_wait_for_the_changelog() -> None:
    d = Feed(Detector(Rules()))
    k = new_key()
    steady(d, k, T0, 1, 10, ["192.0.2.1"])
    assert d.detector.committable(0, 10) == 0  # nothing saved yet
    offset, _ = d.detector.snapshot(0)
    d.detector.saved(0, offset)
    assert d.detector.committable(0, 10) == 10
    assert d.detector.committable(1, 5) == 5  # a partition it never saw
    # a snapshot whose write failed: its buckets go out with the next one
    steady(d, k, T0 + 60, 1, 10, ["192.0.2.1"])
    _, failed = d.detector.snapshot(0)
    assert failed and d.detector.snapshot(0)[1] == []
    d.detector.unsaved(0, (b for b, _ in failed))
    assert [b for b, _ in d.detector.snapshot(0)[1]] == [b for b, _ in failed]
    assert d.detector.committable(0, 20) == 10  # still capped at what was saved


def test_idle_state_expires() -> None:
    now = [T0]
    d = Feed(Detector(Rules(idle_expiry_hours=1), clock=lambda: now[0]))
    steady(d, new_key(), T0, 1, 5, ["192.0.2.1"])
    d.feed([d.event(T0, None, None, "203.0.113.1", status=401, rejected="unauthorized")])
    assert d.detector.size() == (1, 2)
    now[0] = T0 + 2 * 3600
    _, records = d.detector.snapshot(0)
    assert d.detector.size() == (0, 0) and records  # the emptied buckets are written


def test_overrides_are_checked() -> None:
    assert Rules().with_overrides({"spike_factor": 10}).spike_factor == 10.0
    assert parse_overrides('{"fanout_floor": 500}') == {"fanout_floor": 500}
    for bad in ('{"nope": 1}', '{"spike_floor": 0}', '{"severity_fan_out": "huge"}', "[1]", "{"):
        with pytest.raises(InputError):
            parse_overrides(bad)
    assert actions_for("critical", revoke_enabled=True) == ("revoke",)
    assert actions_for("critical", revoke_enabled=False) == ("quarantine", "force_rotation")
    assert actions_for("medium", revoke_enabled=True) == ("quarantine",)


def test_a_rewritten_bucket_keeps_the_offset_it_was_restored_with() -> None:
    """Idle state expiring on a restored partition (no new events yet) rewrites
    its bucket: the bucket must not claim less than it holds, or a replay
    would count those events twice."""
    now = [T0]
    first = Feed(Detector(Rules(idle_expiry_hours=1), clock=lambda: now[0]))
    old, young = new_key(), new_key()
    steady(first, old, T0, 1, 5, ["192.0.2.1"])
    steady(first, young, T0 + 3 * 3600, 1, 5, ["192.0.2.2"])
    _, records = first.detector.snapshot(0)
    second = Detector(Rules(idle_expiry_hours=1), clock=lambda: T0 + 3.5 * 3600)
    second.restore(0, records)
    _, rewritten = second.snapshot(0)
    assert rewritten  # the old key expired: its bucket is written again
    third = Detector(Rules())
    third.restore(0, rewritten)
    assert min(third.parts[0].floors[b] for b, _ in rewritten) == first.offset
