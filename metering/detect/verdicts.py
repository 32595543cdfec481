"""The rules' verdicts: a key's or an address's state after a batch in, findings out.

Each rule compares the state with its thresholds (:class:`~metering.detect.rules.Rules`)
and reports at most every ``update_every_s`` while it keeps firing.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from typing import Any

from metering.detect.rules import Finding, Rules
from metering.detect.state import SAMPLE, KeyState, NetCount, decayed

NEW_ADDRESS_MEMORY_S = 30.0  # new addresses wait this long for the rotation watch list (5 s)


def key_rules(
    r: Rules,
    rotating: Mapping[str, float],
    key_id: int,
    st: KeyState,
    found: list[Finding],
) -> None:
    """The rules about a key, on its state after a batch; findings appended."""
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
        since = rotating.get(kid)
        if since is None:  # kept a while: the watch list learns of a rotation late
            st.new_addrs = [(a, t) for a, t in st.new_addrs if t >= now - NEW_ADDRESS_MEMORY_S]
            if not st.new_addrs:
                st.new_addrs = None
            return
        fresh = [a for a, t in st.new_addrs if t >= since]
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


def net_rules(r: Rules, name: str, c: NetCount, found: list[Finding]) -> None:
    """The failed-authentication rule about an address or prefix."""
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


def _top(endpoints: tuple[str, ...]) -> list[str]:
    return list(endpoints[:SAMPLE])
