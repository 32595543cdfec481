"""The rules, applied in the usage consumer to every decoded batch.

In-process because ``usage.events`` is keyed by user: one worker already owns
and has decoded every event of a key (docs/decisions.md, "Detection").

:meth:`Detector.observe` is the per-event path (dictionary updates only);
the rules run once per touched key and batch. State is kept per source
partition and in ``buckets`` buckets per partition; the changelog
(:mod:`metering.detect.changelog`) stores each bucket with the source offset
it covers, so a replay after a crash skips what the restored state holds.
"""

from __future__ import annotations

import math
import time
import uuid
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from sys import intern
from typing import Any, Protocol

import orjson

from metering.addresses import address_of, prefix_of
from metering.detect.rules import Finding, Rules
from metering.detect.state import (
    SAMPLE,
    KeyState,
    NetCount,
    Partition,
    decayed,
    decode_key,
    decode_net,
    encode_key,
    encode_net,
)
from metering.events import UsageEvent

FAILED_AUTH = frozenset({"unauthorized", "auth_throttled"})
FORBIDDEN = frozenset({"forbidden_ip", "forbidden_throttled"})


class Source(Protocol):
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...


@dataclass(slots=True)
class DetectorStats:
    events: int = 0
    skipped: int = 0  # replayed events the restored state already holds
    findings: int = 0
    expired: int = 0


class Detector:
    def __init__(self, rules: Rules, *, buckets: int = 256, clock: Any = time.time) -> None:
        if buckets & (buckets - 1):
            raise ValueError("buckets must be a power of two")
        self.rules = rules
        self.buckets = buckets
        self._mask = buckets - 1
        self._clock = clock
        # users whose tier overrides thresholds, by id (uuid.UUID and str both)
        self.user_rules: Mapping[uuid.UUID | str | None, Rules] = {}
        # keys in their rotation grace: key id -> when the rotation began (unix)
        self.rotating: Mapping[str, float] = {}
        self.parts: dict[int, Partition] = {}
        self.stats = DetectorStats()

    def partition(self, number: int) -> Partition:
        part = self.parts.get(number)
        if part is None:
            part = self.parts[number] = Partition(self.buckets)
        return part

    def _rules(self, user_id: str) -> Rules:
        return self.user_rules.get(user_id, self.rules)

    # -- the per-event path ---------------------------------------------------

    def observe(self, events: Sequence[UsageEvent], sources: Mapping[int, Source]) -> list[Finding]:
        """Fold a decoded batch into the state; the findings it raises."""
        keys: dict[int, KeyState] = {}
        nets: dict[str, NetCount] = {}
        mask = self._mask
        default = self.rules
        user_rules = self.user_rules
        parts = self.parts
        skipped = 0
        number, part = -1, Partition(1)
        for ev in events:
            src = sources[id(ev)]
            if src.partition != number:  # records come grouped by partition
                number = src.partition
                part = parts.get(number) or self.partition(number)
            off = src.offset
            if off >= part.offset:
                part.offset = off + 1
            if part.saved < 0:
                part.saved = off
            t = ev.occurred_at.timestamp()
            n = ev.count
            key_uuid = ev.api_key_id
            if key_uuid is not None:
                key_id = key_uuid.int  # an int key: hashed in C, a third of a UUID's memory
                b = key_id & mask
                if off < part.floors[b]:
                    skipped += 1
                    continue
                r = user_rules.get(ev.user_id, default) if user_rules else default
                st = part.keys.get(key_id)
                if st is None:
                    st = part.keys[key_id] = KeyState(str(ev.user_id), t, r.fanout_window_minutes)
                m = int(t // 60)
                if m > st.minute:
                    warm = t - st.first >= r.warmup_minutes * 60
                    caps = (r.spike_factor, r.fanout_factor) if warm else None
                    st.roll(m, r.peak_decay_per_minute(), r.fanout_window_minutes, caps)
                    st.cur += n
                elif m == st.minute:
                    st.cur += n
                elif m == st.minute - 1:
                    st.prev += n
                if t > st.last:
                    st.last = t
                ip = ev.client_ip
                reason = ev.rejected
                if reason is None or reason not in FORBIDDEN:
                    addr = ip if ":" not in ip else address_of(ip)
                    if addr in st.win_cur:
                        pass  # seen in this window: counted, and known if it was served
                    elif reason is None:
                        st.seen_at(addr, t, r.fanout_track_max, r.known_addresses_max)
                    elif len(st.win_cur) < r.fanout_track_max:
                        st.win_cur.add(addr)
                    if reason == "missing_scope":
                        st.probe(n, t, r.decay_minutes * 60, ev.endpoint, 4 * r.probe_endpoints)
                else:
                    st.forbid(n, t, r.decay_minutes * 60, ip)
                eps = st.endpoints
                ep = ev.endpoint
                if len(eps) < SAMPLE and ep not in eps:
                    st.endpoints = (*eps, intern(ep))
                if key_id not in keys:
                    keys[key_id] = st
                    part.dirty.add(b)
            elif ev.rejected in FAILED_AUTH:
                ip = ev.client_ip
                tau = default.decay_minutes * 60
                for name in ("a:" + ip, "p:" + prefix_of(ip)):
                    b = zlib.crc32(name.encode()) & mask
                    if off < part.floors[b]:
                        skipped += 1
                        continue
                    c = part.nets.get(name)
                    if c is None:
                        c = part.nets[name] = NetCount(t)
                    c.add(n, t, tau, ev.endpoint)
                    nets[name] = c
                    part.dirty.add(b)
        self.stats.events += len(events)
        self.stats.skipped += skipped
        found: list[Finding] = []
        for key_id, st in keys.items():
            self._key_rules(key_id, st, found)
        for name, c in nets.items():
            self._net_rules(name, c, found)
        self.stats.findings += len(found)
        return found

    # -- the rules ------------------------------------------------------------

    def _key_rules(self, key_id: int, st: KeyState, found: list[Finding]) -> None:
        r = self._rules(st.user_id)
        now = st.last
        kid = str(uuid.UUID(int=key_id))
        baseline = max(r.quarantine_floor, math.ceil(st.peak))

        def report(rule: str, since: float, evidence: dict[str, Any]) -> None:
            reported = st.reported if st.reported is not None else {}
            last = reported.get(rule)
            if last is not None and now - last < r.update_every_s:
                return
            reported[rule] = now
            st.reported = reported
            found.append(
                Finding(
                    rule=rule,
                    severity=r.severity(rule),
                    subject=f"key:{kid}",
                    api_key_id=kid,
                    user_id=st.user_id,
                    first_seen=max(st.first, since),
                    last_seen=now,
                    evidence=evidence,
                    baseline_per_minute=baseline,
                )
            )

        if now - st.first >= r.warmup_minutes * 60:
            rate = st.rate(now)
            limit = max(r.spike_floor, r.spike_factor * st.peak)
            if rate >= limit:
                report(
                    "rate_spike",
                    now - 60,
                    {
                        "requests_last_minute": round(rate),
                        "threshold": round(limit),
                        "learned_peak_per_minute": round(st.peak, 1),
                        "window_s": 60,
                        "addresses": sorted(st.win_cur)[:SAMPLE],
                        "endpoints": _top(st.endpoints),
                    },
                )
            limit_f = max(r.fanout_floor, r.fanout_factor * st.fan_peak)
            if len(st.win_cur) + len(st.win_prev) >= limit_f:
                distinct = st.distinct()
                if distinct >= limit_f:
                    report(
                        "fan_out",
                        now - 2 * r.fanout_window_minutes * 60,
                        {
                            "distinct_addresses": distinct,
                            "threshold": round(limit_f),
                            "learned_peak_per_window": round(st.fan_peak, 1),
                            "window_s": r.fanout_window_minutes * 60,
                            "addresses": sorted(st.win_cur)[:SAMPLE],
                            "endpoints": _top(st.endpoints),
                        },
                    )
        tau = r.decay_minutes * 60
        forbidden = decayed(st.forbidden, st.forbidden_t, now, tau)
        # decaying counts are compared rounded: ten in quick succession are ten
        if forbidden + 0.5 >= r.forbidden_count:
            report(
                "forbidden_ip",
                now - tau,
                {
                    "requests_outside_allowlist": round(forbidden),
                    "threshold": r.forbidden_count,
                    "decay_s": tau,
                    "addresses": st.forbidden_from or [],
                    "endpoints": _top(st.endpoints),
                },
            )
        if st.probed is not None:
            recent = {ep: t for ep, t in st.probed.items() if t >= now - 3 * tau}
            st.probed = recent
            probes = decayed(st.probes, st.probes_t, now, tau)
            if probes + 0.5 >= r.probe_count and len(recent) >= r.probe_endpoints:
                report(
                    "scope_probe",
                    now - tau,
                    {
                        "missing_scope_answers": round(probes),
                        "endpoints_probed": len(recent),
                        "threshold": r.probe_count,
                        "threshold_endpoints": r.probe_endpoints,
                        "endpoints": sorted(recent)[:SAMPLE],
                        "addresses": sorted(st.win_cur)[:SAMPLE],
                    },
                )
        if st.new_addrs is not None:
            since = self.rotating.get(kid)
            fresh = [a for a, t in st.new_addrs if since is not None and t >= since]
            if fresh:
                report(
                    "grace_new_address",
                    now,
                    {
                        "new_addresses": fresh,
                        "rotation_began": since,
                        "known_addresses": len(st.known or ()),
                        "endpoints": _top(st.endpoints),
                    },
                )
            st.new_addrs = None

    def _net_rules(self, name: str, c: NetCount, found: list[Finding]) -> None:
        r = self.rules
        per_address = name.startswith("a:")
        limit = r.auth_flood_per_address if per_address else r.auth_flood_per_prefix
        if c.value + 0.5 < limit or (c.reported and c.t - c.reported < r.update_every_s):
            return
        c.reported = c.t
        found.append(
            Finding(
                rule="auth_flood",
                severity=r.severity("auth_flood"),
                subject=f"net:{name[2:]}",
                api_key_id=None,
                user_id=None,
                first_seen=c.first,
                last_seen=c.t,
                evidence={
                    "failed_authentications": round(c.value),
                    "threshold": limit,
                    "decay_s": r.decay_minutes * 60,
                    "scope": "address" if per_address else "prefix",
                    "endpoints": _top(c.endpoints),
                },
                baseline_per_minute=0,
            )
        )

    # -- the changelog's side -------------------------------------------------

    def snapshot(self, number: int) -> tuple[int, list[tuple[int, bytes]]]:
        """The partition's dirty buckets, encoded, and the offset they cover.
        Idle state is dropped first (its bucket is written without it)."""
        part = self.parts.get(number)
        if part is None:
            return -1, []
        self._expire(part)
        dirty, part.dirty = part.dirty, set()
        if not dirty:
            return part.offset, []
        mask = self._mask
        groups: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {b: ({}, {}) for b in dirty}
        for key_id, st in part.keys.items():
            g = groups.get(key_id & mask)
            if g is not None:
                g[0][str(uuid.UUID(int=key_id))] = encode_key(st)
        for name, c in part.nets.items():
            g = groups.get(zlib.crc32(name.encode()) & mask)
            if g is not None:
                g[1][name] = encode_net(c)
        offset = part.offset
        # a bucket restored with a higher offset than this run has reached keeps it
        out = [
            (b, orjson.dumps({"o": max(offset, part.floors[b]), "k": keys, "n": nets}))
            for b, (keys, nets) in sorted(groups.items())
        ]
        return offset, out

    def saved(self, number: int, offset: int) -> None:
        """The snapshot that covered ``offset`` is in the changelog."""
        part = self.parts.get(number)
        if part is not None and offset > part.saved:
            part.saved = offset

    def committable(self, number: int, offset: int) -> int:
        """How far the usage consumer may commit: not past unsaved detection state
        (a crash then replays what the changelog lacks)."""
        part = self.parts.get(number)
        if part is None or part.saved < 0 or part.offset <= part.saved:
            return offset
        return min(offset, part.saved)

    def restore(self, number: int, records: Sequence[tuple[int, bytes]]) -> None:
        """Replace the partition's state with the changelog's latest bucket records."""
        part = Partition(self.buckets)
        latest: dict[int, bytes] = {}
        for bucket, value in records:
            latest[bucket] = value
        for bucket, value in latest.items():
            data = orjson.loads(value)
            part.floors[bucket] = int(data["o"])
            for kid, enc in data["k"].items():
                st = decode_key(enc, self._rules(enc[0]).fanout_window_minutes)
                part.keys[uuid.UUID(kid).int] = st
            for name, enc in data["n"].items():
                part.nets[name] = decode_net(enc)
        self.parts[number] = part

    def drop(self, number: int) -> None:
        self.parts.pop(number, None)

    def _expire(self, part: Partition) -> None:
        now = self._clock()
        mask = self._mask
        for key_id in [
            k for k, st in part.keys.items()
            if now - st.last > self._rules(st.user_id).idle_expiry_hours * 3600
        ]:  # fmt: skip
            del part.keys[key_id]
            part.dirty.add(key_id & mask)
            self.stats.expired += 1
        tau = self.rules.decay_minutes * 60
        for name in [n for n, c in part.nets.items() if decayed(c.value, c.t, now, tau) < 0.5]:
            del part.nets[name]
            part.dirty.add(zlib.crc32(name.encode()) & mask)
            self.stats.expired += 1

    def size(self) -> tuple[int, int]:
        """(keys, addresses) held."""
        return (
            sum(len(p.keys) for p in self.parts.values()),
            sum(len(p.nets) for p in self.parts.values()),
        )


def _top(endpoints: tuple[str, ...]) -> list[str]:
    return list(endpoints[:SAMPLE])
