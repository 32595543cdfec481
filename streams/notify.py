"""What the worker tells people: the signed-webhook sender (security alerts
and usage notices share it) and the usage threshold checks.

Each runs beside the stream, never in its path, on a small pool that
connects lazily (the worker starts while PostgreSQL is down). A failed check
is logged and run again at the next interval; a notice is recorded with its
deliveries in one transaction, so nothing is told twice or lost
(:mod:`metering.billing.notices`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
import mode

from metering.alerts.webhooks import WebhookSender
from metering.billing.notices import Notices
from metering.settings import Settings

log = logging.getLogger(__name__)

SPEND_EVERY = 6  # spend limits are priced every this many quota checks


class Notifications(mode.Service):
    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.sender = WebhookSender(
            None, timeout_s=settings.webhook_timeout_s, max_attempts=settings.webhook_max_attempts
        )
        self._pool: asyncpg.Pool | None = None
        self.notices_sent = 0
        self.check_failures = 0

    async def on_start(self) -> None:
        s = self.settings
        self._pool = await asyncpg.create_pool(
            s.database_url, min_size=0, max_size=2, command_timeout=s.db_command_timeout_s
        )
        self.sender.db = self._pool
        self.add_future(self.sender.run())
        if s.usage_notices_enabled:
            self.add_future(self._check_loop())

    async def on_stop(self) -> None:
        await self.sender.close()
        if self._pool is not None:
            await self._pool.close()

    async def check(self, rounds: int) -> int:
        """One round of checks; how many notices it queued."""
        assert self._pool is not None
        notices = Notices(self._pool)
        sent = await notices.check_quotas()
        if rounds % SPEND_EVERY == 0:
            sent += await notices.check_spend()
        return sent

    async def _check_loop(self) -> None:
        rounds = 0
        while not self.should_stop:
            try:
                sent = await self.check(rounds)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # PostgreSQL away, a price missing: next round
                self.check_failures += 1
                log.warning("usage notices: check failed (retried): %s", exc)
                sent = 0
            if sent:
                self.notices_sent += sent
                self.sender.wake()
            rounds += 1
            await self.sleep(self.settings.usage_notices_check_s)
