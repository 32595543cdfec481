"""Per-key and per-address detection state: small, bounded, serialisable.

One :class:`KeyState` per active key holds what the rules need, no more:

* the request rate: the counts of the current and the previous event-time
  minute (a sliding one-minute estimate) and the learned peak minute, a
  maximum that decays with ``peak_half_life_hours``;
* the client addresses (IPv6 by /64) of the current and previous fan-out
  window, each capped at ``fanout_track_max``, and the learned peak per window;
* decaying counts of requests from outside the allowlist and of missing-scope
  answers (with the endpoints probed), and up to ``known_addresses_max``
  addresses ever seen (for keys in rotation grace);
* when each rule last reported.

Addresses with failed authentications have a :class:`NetCount` each.
Both encode to plain lists (:func:`encode_key`, :func:`decode_key`) for the
state's changelog.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

SAMPLE = 10  # addresses or endpoints quoted in evidence
EMPTY: frozenset[str] = frozenset()  # shared by every key without a previous window


def decayed(value: float, since: float, now: float, tau_s: float) -> float:
    if now <= since:
        return value
    return value * math.exp((since - now) / tau_s)


class KeyState:
    __slots__ = (
        "cur",
        "endpoints",
        "fan_peak",
        "first",
        "forbidden",
        "forbidden_from",
        "forbidden_t",
        "known",
        "last",
        "minute",
        "new_addrs",
        "peak",
        "prev",
        "probed",
        "probes",
        "probes_t",
        "reported",
        "user_id",
        "win",
        "win_cur",
        "win_prev",
    )  # fmt: skip

    def __init__(self, user_id: str, t: float, window_minutes: int) -> None:
        self.user_id = user_id
        self.first = t
        self.last = t
        self.minute = int(t // 60)
        self.cur = 0
        self.prev = 0
        self.peak = 0.0
        self.win = self.minute // window_minutes
        self.win_cur: set[str] = set()
        self.win_prev: AbstractSet[str] = EMPTY
        self.fan_peak = 0.0
        self.forbidden = 0.0
        self.forbidden_t = t
        self.forbidden_from: list[str] | None = None
        self.probes = 0.0
        self.probes_t = t
        self.probed: dict[str, int] | None = None
        # tuples, not sets: a handful of entries in a third of the memory
        self.known: tuple[str, ...] | None = ()  # None: too many to tell a new one
        self.new_addrs: list[tuple[str, float]] | None = None  # first seen since the last check
        self.endpoints: tuple[str, ...] = ()  # the first few (interned)
        self.reported: dict[str, float] | None = None

    # -- the per-event path (kept to dict and set operations) -----------------

    def roll(
        self, minute: int, decay: float, window_minutes: int, caps: tuple[float, float] | None
    ) -> None:
        """Move to a later minute: the finished minutes teach the peaks, after
        the warm-up at most ``caps`` (rate, fan-out) times the peak (an attack
        does not become the baseline)."""
        gap = minute - self.minute
        seen = float(self.cur) if caps is None else min(float(self.cur), caps[0] * self.peak)
        self.peak = max(self.peak * decay**gap, seen)
        self.prev = self.cur if gap == 1 else 0
        self.cur = 0
        self.minute = minute
        win = minute // window_minutes
        if win != self.win:
            wgap = win - self.win
            fan = float(len(self.win_cur))
            self.fan_peak = max(
                self.fan_peak * decay ** (wgap * window_minutes),
                fan if caps is None else min(fan, caps[1] * self.fan_peak),
            )
            self.win_prev = self.win_cur if wgap == 1 else EMPTY
            self.win_cur = set()
            self.endpoints = ()
            self.win = win

    def seen_at(self, addr: str, t: float, cap: int, known_max: int) -> None:
        if len(self.win_cur) < cap:
            self.win_cur.add(addr)
        known = self.known
        if known is not None and addr not in known:
            if len(known) >= known_max:
                self.known = None
                return
            self.known = (*known, addr)
            if not known:  # a key's first address is no news: it has no history yet
                return
            if self.new_addrs is None:
                self.new_addrs = [(addr, t)]
            else:  # the latest few
                self.new_addrs.append((addr, t))
                if len(self.new_addrs) > SAMPLE:
                    del self.new_addrs[0]

    def forbid(self, n: int, t: float, tau_s: float, ip: str) -> None:
        self.forbidden = decayed(self.forbidden, self.forbidden_t, t, tau_s) + n
        self.forbidden_t = max(t, self.forbidden_t)
        if self.forbidden_from is None:
            self.forbidden_from = [ip]
        elif ip not in self.forbidden_from and len(self.forbidden_from) < SAMPLE:
            self.forbidden_from.append(ip)

    def probe(self, n: int, t: float, tau_s: float, endpoint: str, cap: int) -> None:
        self.probes = decayed(self.probes, self.probes_t, t, tau_s) + n
        self.probes_t = max(t, self.probes_t)
        if self.probed is None:
            self.probed = {}
        if endpoint in self.probed or len(self.probed) < cap:
            self.probed[endpoint] = int(t)

    def rate(self, t: float) -> float:
        """Requests in the minute up to ``t`` (the previous minute weighted by its overlap)."""
        into = (t % 60.0) / 60.0
        return self.cur + self.prev * (1.0 - into)

    def distinct(self) -> int:
        if not self.win_prev:
            return len(self.win_cur)
        return len(self.win_cur | self.win_prev)


class NetCount:
    """Failed authentications from one address or prefix, decaying."""

    __slots__ = ("endpoints", "first", "reported", "t", "value")

    def __init__(self, t: float) -> None:
        self.value = 0.0
        self.t = t
        self.first = t
        self.reported = 0.0
        self.endpoints: tuple[str, ...] = ()  # the first few (interned)

    def add(self, n: int, t: float, tau_s: float, endpoint: str) -> None:
        if self.value < 0.5:  # a new run of failures starts here
            self.first = t
        self.value = decayed(self.value, self.t, t, tau_s) + n
        self.t = max(t, self.t)
        if endpoint not in self.endpoints and len(self.endpoints) < SAMPLE:
            self.endpoints = (*self.endpoints, sys.intern(endpoint))


@dataclass(slots=True)
class Partition:
    buckets: int
    keys: dict[int, KeyState] = field(default_factory=dict)  # by the key id's int
    nets: dict[str, NetCount] = field(default_factory=dict)
    floors: list[int] = field(default_factory=list)  # per bucket: offsets below are in the state
    dirty: set[int] = field(default_factory=set)
    offset: int = -1  # one past the last offset observed
    saved: int = -1  # offsets below this are in the changelog (-1: nothing pending yet)

    def __post_init__(self) -> None:
        if not self.floors:
            self.floors = [0] * self.buckets


# -- the changelog's encoding -------------------------------------------------


def encode_key(s: KeyState) -> list[Any]:
    return [
        s.user_id, s.first, s.last, s.minute, s.cur, s.prev, s.peak,
        s.win, sorted(s.win_cur), sorted(s.win_prev), s.fan_peak,
        s.forbidden, s.forbidden_t, s.forbidden_from,
        s.probes, s.probes_t, s.probed,
        s.known, s.new_addrs, s.endpoints, s.reported,
    ]  # fmt: skip


def decode_key(v: list[Any], window_minutes: int) -> KeyState:
    s = KeyState(v[0], v[1], window_minutes)
    (
        _, s.first, s.last, s.minute, s.cur, s.prev, s.peak,
        s.win, win_cur, win_prev, s.fan_peak,
        s.forbidden, s.forbidden_t, s.forbidden_from,
        s.probes, s.probes_t, s.probed,
        known, s.new_addrs, s.endpoints, s.reported,
    ) = v  # fmt: skip
    s.win_cur, s.win_prev = set(win_cur), set(win_prev) if win_prev else EMPTY
    s.endpoints = tuple(sys.intern(e) for e in s.endpoints)
    if s.new_addrs is not None:
        s.new_addrs = [(a, t) for a, t in s.new_addrs]
    s.known = None if known is None else tuple(known)
    return s


def encode_net(c: NetCount) -> list[Any]:
    return [c.value, c.t, c.first, c.reported, c.endpoints]


def decode_net(v: list[Any]) -> NetCount:
    c = NetCount(v[1])
    c.value, c.t, c.first, c.reported, endpoints = v
    c.endpoints = tuple(sys.intern(e) for e in endpoints)
    return c
