"""Alerts: findings recorded, the key's actions taken, operators' answers.

:meth:`AlertsService.record` turns a finding into its alert (one per subject
and rule until resolved, updated when the rule fires again) and, when the
alert is new or its severity rose, takes the severity's actions through
:class:`~metering.accounts.security.KeySecurity` and queues the signed
webhooks. Recording the same finding twice (a replay after a crash) changes
nothing but the alert's count: the actions and the webhook ids are
idempotent.

Operators: :meth:`acknowledge` lifts the quarantine (the issue's "until the
alert is acknowledged"); :meth:`resolve` closes the alert and, with
``undo``, reverses every action it took.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from metering.accounts.security import KeySecurity
from metering.db.connect import connection
from metering.db.queries import get
from metering.detect.detector import Finding
from metering.detect.rules import actions_for
from metering.errors import InputError

Q_UPSERT_ALERT = get("upsert_alert")
Q_ALERT_BY_ID = get("alert_by_id")
Q_LIST_ALERTS = get("list_alerts")
Q_LOCK_ALERT = get("lock_alert")
Q_SET_ALERT_ACTION = get("set_alert_action")
Q_ACKNOWLEDGE_ALERT = get("acknowledge_alert")
Q_RESOLVE_ALERT = get("resolve_alert")
Q_MARK_NOTIFIED = get("mark_notified")
Q_ENQUEUE_WEBHOOKS = get("enqueue_webhooks")

ACTION_ORDER = ("none", "quarantine", "force_rotation", "revoke")


@dataclass(frozen=True, slots=True)
class Alert:
    id: int
    subject: str
    api_key_id: uuid.UUID | None
    user_id: uuid.UUID | None
    rule: str
    severity: str
    status: str
    action: str
    evidence: dict[str, Any]
    occurrences: int
    first_seen: datetime
    last_seen: datetime
    created_at: datetime
    updated_at: datetime
    notified_severity: str | None
    notified_action: str | None
    acknowledged_by: str | None
    acknowledged_at: datetime | None
    resolved_by: str | None
    resolved_at: datetime | None
    note: str | None
    key_prefix: str | None
    user_email: str | None

    @classmethod
    def from_row(cls, r: asyncpg.Record) -> Alert:
        fields = dict(r)
        fields["evidence"] = json.loads(fields["evidence"])
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, datetime):
                value = value.astimezone(UTC).isoformat().replace("+00:00", "Z")
            elif isinstance(value, uuid.UUID):
                value = str(value)
            out[name] = value
        return out


def message(event_type: str, alert: Alert, **extra: Any) -> dict[str, Any]:
    """A webhook / ``keys.alerts`` payload (Standard Webhooks' type, timestamp, data)."""
    return {
        "type": event_type,
        "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "data": {**alert.to_dict(), **extra},
    }


class AlertsService:
    def __init__(
        self,
        db: asyncpg.Connection | asyncpg.Pool,
        security: KeySecurity,
        *,
        revoke_enabled: bool = False,
        forced_rotation: timedelta = timedelta(hours=24),
        rotation_url: str = "/keys/rotate",
    ) -> None:
        self._db = db
        self.security = security
        self.revoke_enabled = revoke_enabled
        self.forced_rotation = forced_rotation
        self.rotation_url = rotation_url

    def _conn(self) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection]:
        return connection(self._db)

    # -- the worker's side ------------------------------------------------------

    async def record(self, finding: Finding) -> tuple[Alert, str | None]:
        """The finding's alert, and the webhook event it raised (None for an update).

        Each step is re-derived from the stored alert, so a retry or a replay
        after a failure anywhere finishes what is missing: the actions its
        severity calls for, then the webhook for its severity and action."""
        async with self._conn() as conn:
            row = await conn.fetchrow(
                Q_UPSERT_ALERT,
                finding.subject,
                uuid.UUID(finding.api_key_id) if finding.api_key_id else None,
                uuid.UUID(finding.user_id) if finding.user_id else None,
                finding.rule,
                finding.severity,
                json.dumps(finding.evidence),
                datetime.fromtimestamp(finding.first_seen, UTC),
                datetime.fromtimestamp(finding.last_seen, UTC),
            )
            assert row is not None
            alert = await self.get(row["id"], conn)
        wanted = self._actions(alert)
        if _strongest(wanted) > ACTION_ORDER.index(alert.action):
            for action in wanted:
                await self._act(alert, action, finding.baseline_per_minute)
            alert = await self.get(alert.id)
        if (alert.notified_severity, alert.notified_action) == (alert.severity, alert.action):
            return alert, None
        event = "alert.opened" if alert.notified_action is None else "alert.escalated"
        async with self._conn() as conn, conn.transaction():
            await self._notify(conn, event, alert)
            await conn.execute(Q_MARK_NOTIFIED, alert.id, alert.severity, alert.action)
        return alert, event

    def _actions(self, alert: Alert) -> tuple[str, ...]:
        if alert.api_key_id is None or alert.status != "open":
            return ()
        return actions_for(alert.severity, revoke_enabled=self.revoke_enabled)

    async def _act(self, alert: Alert, action: str, baseline: int) -> None:
        ref = str(alert.api_key_id)
        reason = f"alert {alert.id}: {alert.rule} ({alert.severity})"
        if action == "quarantine":
            await self.security.quarantine(ref, limit=max(1, baseline), reason=reason)
        elif action == "force_rotation":
            deadline = datetime.now(UTC) + self.forced_rotation
            await self.security.force_rotation(ref, deadline=deadline, reason=reason)
        elif action == "revoke":
            key = await self.security.accounts.get_key(ref)
            if key.status not in ("revoked", "deleted"):
                await self.security.accounts.revoke_key(ref, reason=reason)
        async with self._conn() as conn:
            await conn.execute(Q_SET_ALERT_ACTION, alert.id, action)

    async def _notify(self, conn: asyncpg.Connection, event: str, alert: Alert) -> None:
        extra: dict[str, Any] = {}
        if alert.action in ("force_rotation", "revoke") and alert.api_key_id is not None:
            key = await self.security.accounts.get_key(str(alert.api_key_id))
            extra["key"] = {
                "prefix": key.prefix,
                "status": key.status,
                "rotate_by": key.rotate_by.isoformat() if key.rotate_by else None,
                "quarantine_limit": key.quarantine_limit,
                "rotate_url": self.rotation_url,
            }
        body = json.dumps(message(event, alert, **extra), separators=(",", ":"))
        msg_id = f"msg_alert{alert.id}_{event.split('.')[1]}_{alert.severity}_{alert.action}"
        await conn.execute(Q_ENQUEUE_WEBHOOKS, msg_id, event, body)

    # -- operators --------------------------------------------------------------

    async def get(self, alert_id: int, conn: asyncpg.Connection | None = None) -> Alert:
        if conn is None:
            async with self._conn() as c:
                return await self.get(alert_id, c)
        row = await conn.fetchrow(Q_ALERT_BY_ID, alert_id)
        if row is None:
            raise InputError(f"no alert {alert_id}")
        return Alert.from_row(row)

    async def list(
        self, *, status: str | None = None, key: uuid.UUID | None = None, limit: int = 50
    ) -> list[Alert]:
        async with self._conn() as conn:
            rows = await conn.fetch(Q_LIST_ALERTS, status, key, limit)
        return [Alert.from_row(r) for r in rows]

    async def acknowledge(self, alert_id: int, *, by: str, note: str | None = None) -> Alert:
        """Seen by a human: the quarantine is lifted (unless another open alert
        holds it); a forced rotation stands until resolved with ``undo``."""
        async with self._conn() as conn:
            if await conn.fetchval(Q_ACKNOWLEDGE_ALERT, alert_id, by, note) is None:
                alert = await self.get(alert_id, conn)
                raise InputError(f"alert {alert_id} is {alert.status}, not open")
            alert = await self.get(alert_id, conn)
        await self._lift(alert, f"alert {alert_id} acknowledged by {by}")
        async with self._conn() as conn:
            await self._notify(conn, "alert.acknowledged", alert)
        return alert

    async def resolve(
        self, alert_id: int, *, by: str, note: str | None = None, undo: bool = False
    ) -> Alert:
        """Closed. With ``undo`` (a false alarm), every action it took is reversed."""
        async with self._conn() as conn:
            if await conn.fetchval(Q_RESOLVE_ALERT, alert_id, by, note) is None:
                raise InputError(f"alert {alert_id} is already resolved")
            alert = await self.get(alert_id, conn)
        reason = f"alert {alert_id} resolved by {by}" + (" as a false alarm" if undo else "")
        await self._lift(alert, reason)
        if undo and alert.api_key_id is not None:
            ref = str(alert.api_key_id)
            if alert.action in ("force_rotation", "revoke"):
                await self.security.cancel_forced_rotation(ref, reason=reason, alert=alert.id)
            if alert.action == "revoke":  # only the revocation this alert made
                await self.security.reinstate(
                    ref, reason=reason, revoked_for=f"alert {alert.id}: %"
                )
        async with self._conn() as conn:
            await self._notify(conn, "alert.resolved", alert)
        return alert

    async def _lift(self, alert: Alert, reason: str) -> None:
        """The quarantine goes, unless another open alert acted on the key (one statement)."""
        if alert.api_key_id is not None and alert.action != "none":
            await self.security.lift_quarantine(
                str(alert.api_key_id), reason=reason, alert=alert.id
            )


def _strongest(actions: tuple[str, ...]) -> int:
    return max((ACTION_ORDER.index(a) for a in actions), default=0)
