"""Security actions on keys: quarantine, forced rotation, and their undoing.

The anomaly rules take them (through :mod:`metering.alerts`) and an operator
undoes them; each is one change of the accounts service (one transaction,
its audit row with the reason, the edge cache invalidated and refreshed),
so every edge applies it on its next request.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from metering.accounts import store
from metering.accounts.model import KeyInfo
from metering.accounts.service import AccountsService
from metering.errors import InputError


class KeySecurity:
    def __init__(self, accounts: AccountsService) -> None:
        self.accounts = accounts

    async def _act(
        self, ref: str, query: str, args: tuple[Any, ...], action: str, detail: dict[str, Any]
    ) -> tuple[KeyInfo, bool]:
        """Run the update on the locked key; (the key after it, whether it changed)."""

        async def work(conn: asyncpg.Connection) -> tuple[tuple[KeyInfo, bool], list[store.Stamp]]:
            key = await store.lock_key(conn, ref)
            stamp = await store.stamp(conn, query, key.id, *args)
            if stamp is None:
                return (key, False), []
            await store.audit(conn, key.id, action, detail)
            return (await store.get_key(conn, str(key.id)), True), [stamp]

        return await self.accounts.change(work)

    async def quarantine(self, ref: str, *, limit: int, reason: str) -> tuple[KeyInfo, bool]:
        """The key's per-minute limit drops to ``limit`` until lifted."""
        if limit < 1:
            raise InputError("a quarantine limit is at least 1 request a minute")
        return await self._act(
            ref, store.Q_QUARANTINE_KEY, (limit,), "quarantined", {"limit": limit, "reason": reason}
        )

    async def lift_quarantine(
        self, ref: str, *, reason: str, alert: int | None = None
    ) -> tuple[KeyInfo, bool]:
        """Lifted; for ``alert``'s sake only if no other open alert acted on the key."""
        return await self._act(
            ref, store.Q_LIFT_QUARANTINE, (alert,), "quarantine_lifted", {"reason": reason}
        )

    async def force_rotation(
        self, ref: str, *, deadline: datetime, reason: str
    ) -> tuple[KeyInfo, bool]:
        """The key works until ``deadline`` (or an earlier one already set), then stops."""
        return await self._act(
            ref,
            store.Q_FORCE_ROTATION,
            (deadline,),
            "rotation_forced",
            {"deadline": deadline.isoformat(), "reason": reason},
        )

    async def cancel_forced_rotation(
        self, ref: str, *, reason: str, alert: int | None = None
    ) -> tuple[KeyInfo, bool]:
        """Cancelled; for ``alert``'s sake only if no other unresolved alert forced it."""
        return await self._act(
            ref, store.Q_CANCEL_FORCED_ROTATION, (alert,), "rotation_cancelled", {"reason": reason}
        )

    async def reinstate(
        self, ref: str, *, reason: str, revoked_for: str = "alert %"
    ) -> tuple[KeyInfo, bool]:
        """Undo a revocation whose reason matches ``revoked_for`` (a LIKE pattern;
        by default any alert's): the key works again as it did before."""
        return await self._act(
            ref, store.Q_REINSTATE_KEY, (revoked_for,), "reinstated", {"reason": reason}
        )
