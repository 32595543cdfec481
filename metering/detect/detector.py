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

import time
import uuid
import zlib
from collections.abc import Iterable, Mapping, Sequence
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
from metering.detect.verdicts import key_rules, net_rules
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
                    if reason is None:  # served: counted, and known (unless known already)
                        known = st.known
                        if addr not in st.win_cur or (known is not None and addr not in known):
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
            key_rules(self._rules(st.user_id), self.rotating, key_id, st, found)
        for name, c in nets.items():
            net_rules(self.rules, name, c, found)
        self.stats.findings += len(found)
        return found

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

    def unsaved(self, number: int, buckets: Iterable[int]) -> None:
        """A snapshot's write failed: its buckets are dirty again (written next time)."""
        part = self.parts.get(number)
        if part is not None:
            part.dirty.update(buckets)

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
        # decayed to the partition's event time (a backlog's counts stay whole), but
        # never to more than an hour behind the clock (memory stays bounded)
        latest = max((c.t for c in part.nets.values()), default=now)
        at = max(min(latest, now), now - 3600)
        for name in [n for n, c in part.nets.items() if decayed(c.value, c.t, at, tau) < 0.5]:
            del part.nets[name]
            part.dirty.add(zlib.crc32(name.encode()) & mask)
            self.stats.expired += 1

    def size(self) -> tuple[int, int]:
        """(keys, addresses) held."""
        return (
            sum(len(p.keys) for p in self.parts.values()),
            sum(len(p.nets) for p in self.parts.values()),
        )
